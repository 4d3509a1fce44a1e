import json
import time

import numpy as np
import pandas as pd
import pytest

from lageo_utils.cli import main
from lageo_utils.regions import RegionsError, assign_regions, load_regions

SEED_ORDER = [
    "Downtown Los Angeles", "Hollywood", "Beverly Hills", "Santa Monica", "Venice Beach", "Malibu",
    "Griffith Park & Observatory", "Koreatown", "Pasadena", "Long Beach", "Silver Lake", "West Hollywood",
    "Manhattan Beach", "Culver City", "Santa Clarita",
]
NEW_REFERENCE_POINTS = {
    "malibu": (34.0380, -118.6776),
    "griffith_park": (34.1184, -118.3004),
    "silver_lake": (34.0955, -118.2626),
    "west_hollywood": (34.0900, -118.3617),
    "manhattan_beach": (33.8843, -118.4126),
    "culver_city": (34.0211, -118.3965),
    "santa_clarita": (34.4200, -118.5200),
}


def test_fifteen_regions_in_seed_order(regions):
    assert regions["name"].tolist() == SEED_ORDER
    assert regions.crs.to_epsg() == 4326
    assert list(regions.columns) == ["id", "name", "description", "geometry", "centroid_lat", "centroid_lon", "area_km2"]
    assert regions["description"].str.len().min() > 20


def test_shared_regions_kept_exactly(regions, reference_dir):
    authors = load_regions(reference_dir / "la_county_regions.json")
    ours = regions.set_index("id")
    for row in authors.itertuples():
        assert ours.loc[row.id, "name"] == row.name
        assert ours.loc[row.id, "description"] == row.description
        assert ours.loc[row.id, "geometry"].equals(row.geometry)


def test_areas_match_authors_sampling_summary(regions, reference_dir):
    published = pd.read_csv(reference_dir / "sampling_summary.csv").set_index("region_id")["area_km2"]
    ours = regions.set_index("id")["area_km2"].loc[published.index]
    assert np.all(np.abs(ours / published - 1) < 0.005)


def test_new_regions_sized_and_centred_on_their_places(regions):
    from lageo_utils.geo import haversine_km

    r = regions.set_index("id")
    for rid, (lat, lon) in NEW_REFERENCE_POINTS.items():
        west, south, east, north = r.loc[rid, "geometry"].bounds
        assert 2 <= r.loc[rid, "area_km2"] <= 12, rid
        assert south <= lat <= north and west <= lon <= east, rid
        assert haversine_km(lat, lon, r.loc[rid, "centroid_lat"], r.loc[rid, "centroid_lon"]) <= 3, rid


def test_centroid_is_box_centre_and_no_overlaps(regions):
    b = regions.geometry.bounds
    assert np.allclose(regions["centroid_lat"], (b.miny + b.maxy) / 2)
    assert np.allclose(regions["centroid_lon"], (b.minx + b.maxx) / 2)
    pairs = [(i, j) for i in range(15) for j in range(i + 1, 15)
             if regions.geometry[i].intersection(regions.geometry[j]).area > 0]
    assert pairs == []


def test_assign_regions_vectorised(regions):
    rng = np.random.default_rng(0)
    lat = rng.uniform(33.7, 34.5, 30_000)
    lon = rng.uniform(-118.8, -118.1, 30_000)
    start = time.perf_counter()
    ids = assign_regions(lat, lon, regions)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0
    # Cross-check against shapely point-in-polygon on a subset.
    import geopandas as gpd

    pts = gpd.GeoDataFrame(geometry=gpd.points_from_xy(lon[:2000], lat[:2000]), crs=4326)
    joined = gpd.sjoin(pts, regions[["id", "geometry"]], predicate="intersects", how="left")
    expected = joined.groupby(level=0)["id"].first().reindex(range(2000))
    assert [e if isinstance(e, str) else None for e in expected] == list(ids[:2000])
    assert assign_regions([34.045], [-118.25], regions)[0] == "downtown_la"
    assert assign_regions([0.0], [0.0], regions)[0] is None


def _write(tmp_path, features):
    p = tmp_path / "r.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return p


def _feature(rid, s, w, n, e, **props):
    return {"type": "Feature", "properties": {"id": rid, "name": rid, "description": "d", **props},
            "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}}


@pytest.mark.parametrize(
    "features, message",
    [
        ([_feature("", 34.0, -118.3, 34.1, -118.2)], "no 'id'"),
        ([_feature("a", 34.0, -118.3, 34.1, -118.2), _feature("a", 33.0, -118.3, 33.1, -118.2)], "duplicate region id 'a'"),
        ([_feature("flat", 34.0, -118.3, 34.0, -118.2)], "'flat' box is inverted or degenerate"),
        ([_feature("a", 34.0, -118.3, 34.1, -118.2), _feature("b", 34.05, -118.25, 34.2, -118.1)], "'a' and 'b' overlap"),
        ([_feature("a", 34.0, -118.3, 34.1, -118.2), _feature("inner", 34.02, -118.28, 34.05, -118.25)],
         "'a' and 'inner' overlap"),
        ([_feature("a", 34.0, -118.3, 34.1, -118.2), _feature("same", 34.0, -118.3, 34.1, -118.2)],
         "'a' and 'same' overlap"),
        ([_feature("far", 34.0, -218.3, 34.1, -118.2)], "'far' longitude out of range"),
        ([_feature("lat", 89.0, -118.3, 91.0, -118.2)], "'lat' latitude out of range"),
    ],
)
def test_malformed_region_files_are_rejected_by_name(tmp_path, features, message):
    with pytest.raises(RegionsError, match=message.replace("(", r"\(")):
        load_regions(_write(tmp_path, features))


def test_inverted_box_in_authors_format(tmp_path, reference_dir):
    doc = json.loads((reference_dir / "la_county_regions.json").read_text())
    corners = {c["name"]: c for c in doc["regions"][2]["bbox"]["corners"]}
    corners["northeast"]["latitude"], corners["southwest"]["latitude"] = 34.06, 34.085
    p = tmp_path / "authors.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(RegionsError, match="'beverly_hills' box is inverted"):
        load_regions(p)


def test_touching_boxes_are_not_overlaps(tmp_path):
    regions = load_regions(_write(tmp_path, [_feature("a", 34.0, -118.3, 34.1, -118.2),
                                             _feature("b", 34.1, -118.3, 34.2, -118.2)]))
    assert len(regions) == 2


def test_cli_regions_check(capsys, tmp_path):
    assert main(["regions", "check", "regions/la_county_regions.geojson"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["regions"] == 15 and out["overlaps"] == [] and len(out["area_km2"]) == 15
    bad = _write(tmp_path, [_feature("a", 34.0, -118.3, 34.1, -118.2), _feature("a", 33.0, -118.3, 33.1, -118.2)])
    assert main(["regions", "check", str(bad)]) != 0
    assert "duplicate region id" in capsys.readouterr().err
