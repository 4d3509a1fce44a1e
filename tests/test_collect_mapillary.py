"""The Mapillary collector against the local fake API (tests/fake_maps_api.py)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from fake_maps_api import FakeMapsApi
from test_collect import assert_folder_consistent, assert_secret_absent

from lageo_utils.cli import main
from lageo_utils.collect import AuthError, RetryPolicy, collect_mapillary
from lageo_utils.data import read_manifest
from lageo_utils.geo import haversine_km

FAST = RetryPolicy(max_retries=4, backoff_s=0.001, max_backoff_s=0.01)
REGION_IDS = ["downtown_la", "hollywood"]
STEP_DEG = 0.00003  # ~3 m between photos of a sequence


def _sequence(start_id: int, lat0: float, lon0: float, dlat: float, dlon: float, n: int, seq: str, pano=False):
    return [{"id": str(start_id + i), "lat": lat0 + i * dlat, "lon": lon0 + i * dlon, "compass": float(i * 7 % 360),
             "captured_at": 1_700_000_000_000 + i * 1000, "is_pano": pano, "sequence": seq, "creator": "mapper_a"}
            for i in range(n)]


@pytest.fixture
def api():
    with FakeMapsApi() as server:
        server.mapillary_images = (
            _sequence(100000, 34.045, -118.262, 0, STEP_DEG, 150, "seqA")  # downtown, west-east
            + _sequence(200000, 34.040, -118.250, STEP_DEG, 0, 100, "seqB")  # downtown, south-north
            + _sequence(300000, 34.050, -118.262, 0, 0.0005, 20, "seqP", pano=True)  # downtown panoramas
            + _sequence(400000, 34.100, -118.345, 0, STEP_DEG, 120, "seqH")  # hollywood
            + _sequence(500000, 33.000, -117.000, 0, STEP_DEG, 30, "seqX")  # outside every region
        )
        yield server


@pytest.fixture
def subset(regions):
    return regions[regions["id"].isin(REGION_IDS)].reset_index(drop=True)


def _collect(api, subset, out, **kw):
    options = {"per_region": 6, "min_distance_m": 25, "page_limit": 40, "tile_deg": 0.01, "thumb_size": "256",
               "rate": None, "retry": FAST, "base_url": api.url, **kw}
    return collect_mapillary(subset, out, api.token, **options)


def _min_distance_m(table: pd.DataFrame) -> float:
    lat, lon = table["latitude"].to_numpy(), table["longitude"].to_numpy()
    d = haversine_km(lat[:, None], lon[:, None], lat[None, :], lon[None, :]) * 1000
    np.fill_diagonal(d, np.inf)
    return float(d.min())


def test_mapillary_run_writes_an_attributed_spread_out_manifest(api, subset, regions, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    api.fail("search", ("status", 429, 1))
    api.fail("thumb", ("drop",))
    waits = []
    out = tmp_path / "mly"
    summary = _collect(api, subset, out, sleep=waits.append)

    assert {rid: r["new"] for rid, r in summary["regions"].items()} == {"downtown_la": 6, "hollywood": 6}
    assert summary["images_downloaded"] == 12 and summary["image_requests"] == 13 and waits[0] == 1
    manifest, report = read_manifest(out / "manifest.csv", regions, image_root=out)
    assert report.missing_files == [] and report.duplicates == [] and len(manifest) == 12
    assert (manifest["source"] == "mapillary").all() and (manifest["licence"] == "CC BY-SA 4.0").all()
    assert (manifest["creator_username"] == "mapper_a").all()
    assert manifest.groupby("region_id").apply(_min_distance_m, include_groups=False).min() >= 25
    assert not manifest["mapillary_id"].astype(str).str.startswith(("3", "5")).any()  # no panoramas, none outside
    truth = {im["id"]: im for im in api.mapillary_images}
    for row in manifest.itertuples():
        im = truth[str(row.mapillary_id)]
        assert (row.latitude, row.longitude) == pytest.approx((im["lat"], im["lon"]))  # computed_geometry
        assert row.heading == pytest.approx(im["compass"] + 0.5)  # computed_compass_angle
    assert_folder_consistent(out)

    searches, thumbs = api.sent("search"), api.sent("thumb")
    assert all(r.headers.get("Authorization") == f"OAuth {api.token}" for r in searches)
    assert not any("access_token" in r.params for r in searches + thumbs)
    assert not any("Authorization" in r.headers for r in thumbs)  # the token never goes to the image host
    assert any("after" in r.params for r in searches)  # paging.next was followed
    for r in searches:
        if "bbox" in r.params:
            w, s, e, n = map(float, r.params["bbox"].split(","))
            assert (e - w) * (n - s) < 0.01
    assert {r.params["size"] for r in thumbs} == {"256"}

    captured = capsys.readouterr()
    assert_secret_absent(api.token, out, caplog.text, captured.out, captured.err, repr(summary))
    _collect(api, subset, tmp_path / "mly2")  # same seed, same choice
    assert pd.read_csv(tmp_path / "mly2" / "manifest.csv")["mapillary_id"].tolist() == manifest["mapillary_id"].tolist()


def test_mapillary_resume_tops_up_regions_and_keeps_the_spacing(api, subset, tmp_path):
    out = tmp_path / "mly"
    _collect(api, subset, out, per_region=4)
    first = pd.read_csv(out / "manifest.csv")
    damaged = out / first["image_path"][0]
    damaged.write_bytes(damaged.read_bytes()[:100])

    summary = _collect(api, subset, out, per_region=7)
    assert summary["repairs"]["rows_dropped"][0].startswith(first["image_path"][0])
    assert {rid: r["new"] for rid, r in summary["regions"].items()} == {"downtown_la": 4, "hollywood": 3}
    table = assert_folder_consistent(out)
    assert table.groupby("region_id").size().to_dict() == {"downtown_la": 7, "hollywood": 7}
    assert set(first["mapillary_id"][1:]) <= set(table["mapillary_id"])
    assert table.groupby("region_id").apply(_min_distance_m, include_groups=False).min() >= 25

    sent = len(api.sent("thumb"))
    assert _collect(api, subset, out, per_region=7)["images_downloaded"] == 0
    assert len(api.sent("thumb")) == sent


def test_mapillary_budget_and_dry_run(api, subset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "mly"
    plan = _collect(api, subset, out, dry_run=True)
    assert plan["image_requests_planned"] == 12 and api.sent("thumb") == [] and not out.exists()

    api.fail("thumb", ("status", 500))
    summary = _collect(api, subset, out, max_images=3)
    assert summary["budget_reached"] and len(api.sent("thumb")) == 3 and summary["images_in_manifest"] == 2

    monkeypatch.delenv("MAPILLARY_ACCESS_TOKEN", raising=False)
    assert main(["collect", "mapillary", "--region-ids", ",".join(REGION_IDS), "--out", str(out),
                 "--images-per-region", "6", "--dry-run", "--base-url", api.url]) == 0
    assert '"image_requests_planned": 10' in capsys.readouterr().out  # 12 wanted, 2 already there


def test_a_refused_token_stops_with_the_api_message(api, subset, tmp_path, monkeypatch, capsys):
    with pytest.raises(AuthError, match=r"HTTP 401: Invalid OAuth access token"):
        collect_mapillary(subset, tmp_path / "a", "MLY|wrong|token", per_region=2, base_url=api.url, rate=None)
    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", "MLY|wrong|secret")
    code = main(["collect", "mapillary", "--region-ids", "hollywood", "--out", str(tmp_path / "b"),
                 "--images-per-region", "2", "--base-url", api.url])
    captured = capsys.readouterr()
    assert code == 2 and "refused the access token (HTTP 401" in captured.err
    assert_secret_absent("MLY|wrong|secret", tmp_path, captured.out, captured.err)
