"""Capture points and the Street View collector, against the local fake API (tests/fake_maps_api.py)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import pytest
from fake_maps_api import FakeMapsApi
from PIL import Image

from lageo_utils.cli import main
from lageo_utils.collect import (
    AuthError,
    CollectError,
    RetryPolicy,
    StreetViewOptions,
    collect_streetview,
    sample_points,
)
from lageo_utils.collect.http import parse_retry_after
from lageo_utils.data import MANIFEST_COLUMNS, read_manifest
from lageo_utils.geo import haversine_km
from lageo_utils.regions import assign_regions

REGION_IDS = ["downtown_la", "hollywood"]
HEADINGS = (0.0, 90.0, 180.0, 270.0)
FAST = RetryPolicy(max_retries=5, backoff_s=0.001, max_backoff_s=0.01)
SMALL = StreetViewOptions(size="48x32")


@pytest.fixture
def api():
    with FakeMapsApi() as server:
        yield server


@pytest.fixture
def subset(regions):
    return regions[regions["id"].isin(REGION_IDS)].reset_index(drop=True)


@pytest.fixture
def points(subset):
    return sample_points(subset, 4)


def expected_images(api: FakeMapsApi, points: pd.DataFrame, headings=HEADINGS) -> set[tuple[str, float]]:
    """(pano, heading) pairs a complete run must produce: covered points, each panorama once."""
    panos = {found[0] for found in (api.pano_for(p.latitude, p.longitude) for p in points.itertuples()) if found}
    return {(pano, h) for pano in panos for h in headings}


def manifest_pairs(out: Path) -> list[tuple[str, float]]:
    table = pd.read_csv(out / "manifest.csv", dtype={"pano_id": str})
    return list(zip(table["pano_id"], table["heading"].astype(float)))


def assert_folder_consistent(out: Path) -> pd.DataFrame:
    """Every manifest row names a complete image of the recorded size, once; no temp files remain."""
    table = pd.read_csv(out / "manifest.csv", dtype={"pano_id": str})
    assert not table["image_path"].duplicated().any()
    for row in table.itertuples():
        path = out / row.image_path
        assert path.stat().st_size == row.file_size_bytes, row.image_path
        with Image.open(path) as img:
            img.load()
    assert not list(out.rglob("*.part")) and not list(out.rglob(".*.tmp*"))
    listed = {out / p for p in table["image_path"]}
    assert set((out / "images").glob("*.jpg")) == listed  # no stray image either
    return table


def assert_secret_absent(secret: str, root: Path | None = None, *texts: str) -> None:
    needles = {secret, quote(secret, safe=""), quote(secret)}
    files = [p for p in root.rglob("*") if p.is_file()] if root is not None else []
    for path in files:
        data = path.read_bytes()
        assert not any(n.encode() in data for n in needles), f"secret written to {path}"
    for text in texts:
        assert not any(n in text for n in needles), "secret in captured output"


# -- capture points ----------------------------------------------------------------------------

def test_grid_points_fill_each_box_evenly_and_far_enough_apart(regions):
    three = regions.iloc[:3]
    pts = sample_points(three, 9, "grid", min_distance_m=10)
    assert list(pts.columns) == ["point_id", "region_id", "latitude", "longitude"]
    assert pts.groupby("region_id").size().to_dict() == dict.fromkeys(three["id"], 9)
    assert (assign_regions(pts["latitude"], pts["longitude"], regions) == pts["region_id"]).all()
    assert pts["point_id"].is_unique
    downtown = pts[pts["region_id"] == "downtown_la"]  # 2.3 x 2.2 km box: a 3 x 3 grid
    assert downtown["latitude"].round(9).nunique() == 3 and downtown["longitude"].round(9).nunique() == 3
    pd.testing.assert_frame_equal(pts, sample_points(three, 9, "grid", min_distance_m=10))


def test_random_points_are_seeded_and_respect_the_minimum_distance(regions):
    box = regions.iloc[:2]
    a = sample_points(box, 40, "random", min_distance_m=150, seed=3)
    pd.testing.assert_frame_equal(a, sample_points(box, 40, "random", min_distance_m=150, seed=3))
    assert not np.allclose(a["latitude"], sample_points(box, 40, "random", min_distance_m=150, seed=4)["latitude"])
    assert (assign_regions(a["latitude"], a["longitude"], regions) == a["region_id"]).all()
    for _, group in a.groupby("region_id"):
        lat, lon = group["latitude"].to_numpy(), group["longitude"].to_numpy()
        d = haversine_km(lat[:, None], lon[:, None], lat[None, :], lon[None, :]) * 1000
        np.fill_diagonal(d, np.inf)
        assert d.min() >= 150


@pytest.mark.parametrize("method, n, metres", [("grid", 100_000, 10), ("random", 60, 600)])
def test_points_that_cannot_fit_raise_naming_the_region(regions, method, n, metres):
    with pytest.raises(ValueError, match=r"region 'downtown_la'"):
        sample_points(regions.iloc[:1], n, method, min_distance_m=metres)


# -- retries and Retry-After -------------------------------------------------------------------

def test_retry_policy_doubles_and_honours_retry_after():
    policy = RetryPolicy(backoff_s=0.5, max_backoff_s=3, max_retry_after_s=30)
    assert [policy.wait_s(i, None) for i in (1, 2, 3, 4, 5)] == [0.5, 1, 2, 3, 3]
    assert policy.wait_s(1, 7.0) == 7.0
    with pytest.raises(CollectError, match="asked to wait 60 s"):
        policy.wait_s(1, 60.0)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after(format_datetime(now + timedelta(seconds=42), usegmt=True), now=now) == 42
    assert parse_retry_after("5") == 5 and parse_retry_after("soon") is None and parse_retry_after(None) is None


# -- Street View -------------------------------------------------------------------------------

def test_streetview_run_writes_a_manifest_the_la_profile_reads(api, points, regions, tmp_path, caplog, capsys):
    first = points.iloc[0]
    api.no_coverage = lambda lat, lon: (round(lat, 6), round(lon, 6)) == (round(first.latitude, 6),
                                                                            round(first.longitude, 6))
    want = expected_images(api, points)
    out = tmp_path / "sv"
    caplog.set_level(logging.DEBUG)
    summary = collect_streetview(points, out, api.key, options=SMALL, base_url=api.url, rate=None, retry=FAST)

    assert summary["metadata_status"] == {"ZERO_RESULTS": 1, "OK": len(points) - 1}
    covered_points = len(points) - 1
    assert summary["duplicate_panoramas"] == covered_points - len(want) // 4 > 0  # the fake shares panoramas
    assert summary["images_downloaded"] == summary["image_requests"] == len(want)
    assert set(manifest_pairs(out)) == want and len(manifest_pairs(out)) == len(want)

    manifest, report = read_manifest(out / "manifest.csv", regions, image_root=out)
    assert list(manifest.columns[:7]) == MANIFEST_COLUMNS
    assert report.missing_files == [] and report.duplicates == []
    assert (manifest["source"] == "streetview").all() and (manifest["location_id"] == manifest["pano_id"]).all()
    assert manifest.groupby("location_id")["heading"].apply(set).map(lambda s: s == set(HEADINGS)).all()
    assert manifest["image_path"].str.match(r"images/sv_FAKE\w+_h\d{3}\.jpg$").all()
    snapped = manifest.apply(lambda r: api.pano_for(r.requested_lat, r.requested_lon)[1:], axis=1)
    assert np.allclose(np.stack(snapped.to_numpy()), manifest[["latitude", "longitude"]].to_numpy())
    assert set(manifest["region_id"]) == set(REGION_IDS) and (manifest["date"] == "2024-05").all()
    table = assert_folder_consistent(out)
    with Image.open(out / table["image_path"][0]) as img:
        assert img.size == (48, 32)

    meta = api.sent("metadata")[0].params
    assert meta["radius"] == "50" and "," in meta["location"] and meta["key"] == api.key
    image = api.sent("image")[0].params
    assert {k: image[k] for k in ("size", "fov", "pitch", "return_error_code")} == {
        "size": "48x32", "fov": "90", "pitch": "0", "return_error_code": "true"}
    assert {r.params["heading"] for r in api.sent("image")} == {"0", "90", "180", "270"}

    assert "GET /maps/api/streetview" in caplog.text  # urllib3 logged every request line, redacted
    captured = capsys.readouterr()
    assert_secret_absent(api.key, out, caplog.text, captured.out, captured.err, repr(summary))

    again = collect_streetview(points, out, api.key, options=SMALL, base_url=api.url, rate=None, retry=FAST)
    assert again["image_requests"] == 0 and again["metadata_requests"] == 0
    assert again["images_already_present"] == len(want)


def test_streetview_retries_429_5xx_dropped_and_corrupt_bodies(api, points, tmp_path, caplog):
    api.fail("metadata", ("api_status", "OVER_QUERY_LIMIT"), ("status", 503), ("api_status", "UNKNOWN_ERROR"))
    api.fail("image", ("status", 429, 2), ("status", 500), ("drop",), ("corrupt",))
    waits: list[float] = []
    out = tmp_path / "sv"
    summary = collect_streetview(points, out, api.key, options=SMALL, base_url=api.url, rate=None,
                                 retry=FAST, sleep=waits.append)
    want = expected_images(api, points)
    assert summary["images_downloaded"] == len(want) and summary["image_requests"] == len(want) + 4
    assert len(api.sent("metadata")) == len(points) + 3
    # Doubling backoff for the metadata's three transient answers, then the image's four; Retry-After: 2 honoured.
    assert waits == pytest.approx([0.001, 0.002, 0.004, 2, 0.002, 0.004, 0.008])
    assert set(manifest_pairs(out)) == want
    assert_folder_consistent(out)
    for problem in ("HTTP 429", "HTTP 500", "IncompleteRead", "does not decode", "OVER_QUERY_LIMIT"):
        assert problem in caplog.text


def test_streetview_gives_up_after_the_retries_and_resumes_later(api, points, tmp_path):
    out = tmp_path / "sv"
    # The first point's images come through; then one image fails on every attempt.
    collect_streetview(points.iloc[:1], out, api.key, options=SMALL, base_url=api.url, rate=None, retry=FAST)
    api.fail("image", *[("status", 502)] * 3)
    with pytest.raises(CollectError, match=r"gave up after 3 attempts \(last: HTTP 502\); re-run to resume"):
        collect_streetview(points, out, api.key, options=SMALL, base_url=api.url, rate=None,
                           retry=RetryPolicy(max_retries=2, backoff_s=0.001))
    assert_folder_consistent(out)
    collect_streetview(points, out, api.key, options=SMALL, base_url=api.url, rate=None, retry=FAST)
    assert set(manifest_pairs(out)) == expected_images(api, points)
    assert_folder_consistent(out)


def test_a_server_asking_for_a_long_wait_stops_the_run(api, points, tmp_path):
    api.fail("metadata", ("status", 429, 3600))
    with pytest.raises(CollectError, match=r"asked to wait 3600 s \(Retry-After\)"):
        collect_streetview(points, tmp_path / "sv", api.key, base_url=api.url, rate=None, retry=FAST)


def test_request_denied_stops_with_the_status_and_never_shows_the_key(api, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("GOOGLE_MAPS_API_KEY", "wrong-key-ABC123")
    out = tmp_path / "sv"
    code = main(["collect", "streetview", "--region-ids", "downtown_la", "--out", str(out), "--points-per-region",
                 "2", "--base-url", api.url, "--rate", "1000"])
    captured = capsys.readouterr()
    assert code == 2
    assert "REQUEST_DENIED" in captured.err and "The provided API key is invalid." in captured.err
    assert len(api.sent("metadata")) == 1  # denied is final: no retry
    assert_secret_absent("wrong-key-ABC123", out, captured.out, captured.err, caplog.text)


def test_a_refused_image_request_stops_naming_the_status(api, points, tmp_path):
    api.fail("image", ("status", 403))
    with pytest.raises(AuthError, match=r"REQUEST_DENIED, HTTP 403"):
        collect_streetview(points, tmp_path / "sv", api.key, options=SMALL, base_url=api.url, rate=None, retry=FAST)


def test_connection_errors_are_redacted(points, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "key-with|odd chars"
    with pytest.raises(CollectError) as info:
        collect_streetview(points, tmp_path / "sv", secret, base_url=f"http://127.0.0.1:{port}", rate=None,
                           retry=RetryPolicy(max_retries=1, backoff_s=0.001))
    assert "ConnectionError" in str(info.value) and "key=***" in str(info.value)
    assert_secret_absent(secret, tmp_path, str(info.value), repr(info.value))


@pytest.mark.parametrize("options, message", [
    ({"size": "1024x640"}, r"size must be WIDTHxHEIGHT with sides 1\.\.640, not '1024x640'"),
    ({"headings": (0.0, 400.0)}, r"headings must be degrees in \[0, 360\]"),
    ({"fov": 150.0}, r"fov must be in \(0, 120\]"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        StreetViewOptions(**options)


def test_points_without_coordinates_are_refused(points, tmp_path):
    with pytest.raises(ValueError, match=r"points lack columns \['latitude'\]"):
        collect_streetview(points.drop(columns="latitude"), tmp_path, "k", dry_run=True)


def test_missing_key_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("GOOGLE_MAPS_API_KEY", raising=False)
    code = main(["collect", "streetview", "--region-ids", "downtown_la", "--out", str(tmp_path), "--points-per-region", "2"])
    assert code == 2 and "set GOOGLE_MAPS_API_KEY in the environment" in capsys.readouterr().err


def test_budget_caps_image_requests_even_with_retries(api, points, tmp_path):
    api.fail("image", ("status", 500), ("status", 500))
    out = tmp_path / "sv"
    summary = collect_streetview(points, out, api.key, options=SMALL, base_url=api.url, rate=None, retry=FAST,
                                 max_images=5)
    assert summary["budget_reached"] and len(api.sent("image")) == 5 == summary["image_requests"]
    assert len(manifest_pairs(out)) == 3
    assert_folder_consistent(out)
    rest = collect_streetview(points, out, api.key, options=SMALL, base_url=api.url, rate=None, retry=FAST)
    want = expected_images(api, points)
    assert rest["image_requests"] == len(want) - 3 and not rest["budget_reached"]
    assert set(manifest_pairs(out)) == want


def test_dry_run_counts_requests_without_any_image_request(api, points, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sv"
    want = expected_images(api, points)
    plan = collect_streetview(points, out, api.key, dry_run=True, base_url=api.url, rate=None)
    assert plan["image_requests_planned"] == len(want) and plan["metadata_requests"] == len(points)
    assert plan["estimated_cost_usd"] == round(len(want) * 0.007, 2)
    assert api.sent("image") == [] and not out.exists()
    capped = collect_streetview(points, out, api.key, dry_run=True, base_url=api.url, rate=None, max_images=3)
    assert capped["image_requests_planned"] == 3

    monkeypatch.delenv("GOOGLE_MAPS_API_KEY", raising=False)  # no key: the upper bound, no request at all
    before = len(api.requests)
    assert main(["collect", "streetview", "--region-ids", ",".join(REGION_IDS), "--out", str(out),
                 "--points-per-region", "4", "--dry-run", "--base-url", api.url]) == 0
    assert '"image_requests_planned": 32' in capsys.readouterr().out
    assert len(api.requests) == before and not out.exists()


def test_a_rerun_repairs_every_state_a_kill_can_leave(api, points, tmp_path):
    out = tmp_path / "sv"
    collect_streetview(points, out, api.key, options=SMALL, base_url=api.url, rate=None, retry=FAST)
    table = pd.read_csv(out / "manifest.csv")
    truncated = table["image_path"][1]
    data = (out / truncated).read_bytes()
    (out / truncated).write_bytes(data[: len(data) // 2])  # damaged after it was recorded
    table.drop(index=2).to_csv(out / "manifest.csv", index=False)  # renamed into place, row never written
    with open(out / "manifest.csv", "a") as fh:
        fh.write("images/sv_half_a_row.jpg,34.0")  # killed in the middle of a row
    (out / "images" / "sv_x_h000.jpg.part").write_bytes(b"\xff\xd8 half")  # killed mid-download
    with open(out / "points.csv", "a") as fh:
        fh.write("34.1,-118.3,hollywood_9")
    sent = len(api.sent("image"))

    summary = collect_streetview(points, out, api.key, options=SMALL, base_url=api.url, rate=None, retry=FAST)
    assert summary["repairs"]["partial_files_removed"] == 1
    assert summary["repairs"]["rows_dropped"] == [f"{truncated}: size {len(data) // 2} bytes, recorded {len(data)}"]
    assert summary["images_recovered"] == 1 and summary["images_downloaded"] == 1
    assert len(api.sent("image")) == sent + 1 and summary["metadata_requests"] == 0
    assert set(manifest_pairs(out)) == expected_images(api, points)
    assert_folder_consistent(out)
    assert (out / "points.csv").read_text().endswith("\n")


def test_killed_collector_resumes_without_loss_or_duplicates(api, subset, tmp_path):
    """SIGKILL a real collector process while an image is in transfer, then finish: nothing lost, nothing twice."""
    points = sample_points(subset, 6)
    want = expected_images(api, points)
    api.body_pause_s = 0.2  # each image stalls mid-body: the kill lands inside a transfer
    out = tmp_path / "sv"
    env = {**os.environ, "GOOGLE_MAPS_API_KEY": api.key}
    cmd = [sys.executable, "-c", "import sys; from lageo_utils.cli import main; sys.exit(main(sys.argv[1:]))",
           "collect", "streetview", "--region-ids", ",".join(REGION_IDS), "--out", str(out),
           "--points-per-region", "6", "--size", "48x32", "--base-url", api.url, "--rate", "1000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        done = (out / "manifest.csv").read_text().count("\n") - 1 if (out / "manifest.csv").exists() else 0
        if done >= 3 and len(api.sent("image")) > done:  # three images stored, the next one in flight
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the collector ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= len(manifest_pairs(out)) < len(want)
    api.body_pause_s = 0.0

    summary = collect_streetview(points, out, api.key, options=SMALL, base_url=api.url, rate=None, retry=FAST)
    pairs = manifest_pairs(out)
    assert len(pairs) == len(set(pairs)) and set(pairs) == want
    assert_folder_consistent(out)
    assert len(want) <= len(api.sent("image")) <= len(want) + 1  # at most the image in flight is asked twice
    assert summary["images_already_present"] >= 3 and summary["metadata_requests"] < len(points)
    assert_secret_absent(api.key, out)
