"""The notebook steps accept what the collectors write (the `la` profile's data path)."""

from __future__ import annotations

import json

import pandas as pd
from test_collect_byo import photo

from lageo_utils.collect import import_images
from lageo_utils.runs import new_run_dir, resolve_params, write_params
from lageo_utils.steps import load_labelled_splits, prepare_data, quick_summary, split_table


def test_la_profile_reads_an_imported_photo_folder(tmp_path, monkeypatch, regions):
    monkeypatch.setenv("LAGEO_OUTPUTS", str(tmp_path / "outputs"))
    album = tmp_path / "album"
    for rid, lat, lon in regions[["id", "centroid_lat", "centroid_lon"]].itertuples(index=False):
        for point in range(3):
            for heading in (0, 180):
                photo(album / f"{rid}_{point}_{heading}.jpg", lat + point * 1e-3, lon, heading=heading)
    data_dir = tmp_path / "la-data"
    import_images(album, data_dir, regions, copy=True)

    params = resolve_params("la", overrides={"data_dir": str(data_dir), "area_normalize": False, "buffer_m": 0})
    run = new_run_dir()
    write_params(run, params)
    data = prepare_data(run, params)

    assert data["counts"]["train"] + data["counts"]["val"] + data["counts"]["test"] == 15 * 3 * 2
    labelled = load_labelled_splits(run)
    assert labelled.groupby("location_id")["split"].nunique().max() == 1  # headings of a point stay together
    table = split_table(labelled, regions)
    assert table.loc["total", "total"] == 90 and list(table.columns) == ["train", "val", "test", "total"]
    assert json.loads((run / "audit.json").read_text())["exact_train_coordinate"] == 0


def test_quick_summary_counts_skipped_images():
    preds = pd.DataFrame({"correct": [True, False], "error_km": [0.5, 12.0]})
    preds.attrs["failures"] = [{"image_path": "bad.jpg", "reason": "corrupt"}]
    summary = quick_summary(preds)
    assert summary["images"] == 2 and summary["unreadable_skipped"] == 1
    assert summary["accuracy"] == 0.5 and summary["ACC@1 km"] == 0.5 and summary["ACC@25 km"] == 1.0
