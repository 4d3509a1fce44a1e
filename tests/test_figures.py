"""Figures and maps: every function renders from small frames built here, and what it draws is checked."""

from __future__ import annotations

import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection, PatchCollection, PathCollection, QuadMesh
from matplotlib.colors import to_rgb
from matplotlib.image import AxesImage
from matplotlib.text import Text
from PIL import Image
from pyproj import Transformer

from lageo_utils import figures, maps
from lageo_utils.geo import haversine_km
from lageo_utils.metrics import confusion, reliability_table

# EPSG:3310 coordinates of LA County: eastings about 100-200 km, northings about -380 to -500 km.
LA_X = (100_000, 200_000)
LA_Y = (-500_000, -380_000)
PROBE = maps.tiles_reachable  # the real probe; the autouse fixture below replaces it in every test
TO_3310 = Transformer.from_crs("EPSG:4326", "EPSG:3310", always_xy=True)


def make_predictions(regions, per_region: int = 6, seed: int = 0, skip: tuple[str, ...] = ()) -> pd.DataFrame:
    """Points inside each box (except ``skip``), with seeded top-3 predictions and their errors."""
    rng = np.random.default_rng(seed)
    ids = regions["id"].to_numpy()
    centres = regions.set_index("id")[["centroid_lat", "centroid_lon"]]
    rows = []
    for rid, geom in zip(regions["id"], regions.geometry):
        if rid in skip:
            continue
        west, south, east, north = geom.bounds
        for k in range(per_region):
            top = list(rng.choice(ids, size=3, replace=False))
            if k % 2 == 0 and rid not in top:  # about half correct, so both marks appear
                top[0] = rid
            probs = sorted(rng.dirichlet([1, 1, 1, 1]).tolist()[:3], reverse=True)
            rows.append(
                {
                    "image_path": f"{rid}_{k}.png",
                    "latitude": rng.uniform(south, north),
                    "longitude": rng.uniform(west, east),
                    "true_region": rid,
                    "pred_region": top[0],
                    "top_regions": top,
                    "top_probs": probs,
                    "confidence": probs[0],
                    "location_id": f"{rid}-{k // 2}",
                    "heading": float(90 * (k % 4)),
                }
            )
    pred = pd.DataFrame(rows)
    pred["pred_lat"] = centres.loc[pred["pred_region"], "centroid_lat"].to_numpy()
    pred["pred_lon"] = centres.loc[pred["pred_region"], "centroid_lon"].to_numpy()
    pred["error_km"] = haversine_km(pred["latitude"], pred["longitude"], pred["pred_lat"], pred["pred_lon"])
    pred["correct"] = pred["true_region"] == pred["pred_region"]
    return pred


def make_metrics(regions, accuracy: float, with_ci: bool) -> dict:
    m = {
        "n_images": 90,
        "accuracy": accuracy,
        "f1_macro": accuracy - 0.05,
        "f1_weighted": accuracy - 0.02,
        "acc_at_km": {"1": 0.1, "5": accuracy, "10": 0.7, "25": 0.95},
        "per_region": {
            rid: {"precision": 0.5, "recall": 0.5, "f1": (i + 1) / 20 * accuracy, "support": i}
            for i, rid in enumerate(regions["id"])
        },
    }
    if with_ci:
        m["ci"] = {"accuracy": [accuracy - 0.05, accuracy + 0.04], "acc_at_km": {"5": [accuracy - 0.1, accuracy + 0.1]}}
    return m


def assert_png(path, min_std: float = 10.0) -> np.ndarray:
    """The file is a readable PNG whose pixels are not one flat colour."""
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img.convert("RGB"), dtype=float)
    assert pixels.std() > min_std, f"{path.name} looks blank (pixel std {pixels.std():.1f})"
    return pixels


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Tests never reach a tile server; the default is the offline path."""
    monkeypatch.setattr(maps, "tiles_reachable", lambda *a, **k: False)


@pytest.fixture(scope="module")
def predictions(regions):
    return make_predictions(regions, skip=("malibu", "santa_clarita"))


# ---------------------------------------------------------------- maps


def test_regions_map_projected_with_labels_and_split_points(regions, predictions, tmp_path):
    manifest = predictions.rename(columns={"true_region": "region_id"})[["latitude", "longitude", "region_id"]]
    manifest = manifest.assign(split=np.resize(["train", "val", "test"], len(manifest)))
    fig = figures.regions_map(regions, manifest)
    ax = fig.axes[0]
    assert LA_X[0] < ax.get_xlim()[0] < ax.get_xlim()[1] < LA_X[1]
    assert LA_Y[0] < ax.get_ylim()[0] < ax.get_ylim()[1] < LA_Y[1]
    # Capture points are drawn at their EPSG:3310 coordinates.
    points = [c for c in ax.collections if isinstance(c, PathCollection)][0]
    expected = np.column_stack(TO_3310.transform(manifest["longitude"], manifest["latitude"]))
    np.testing.assert_allclose(points.get_offsets(), expected, atol=0.01)
    # Coloured by split, every region named once, split counts in the legend.
    colors = {tuple(np.round(c, 3)) for c in points.get_facecolors()}
    assert len(colors) == 3
    labels = texts(fig)
    assert all(labels.count(name) == 1 for name in regions["name"])
    counts = manifest["split"].value_counts()
    assert {f"{s} ({counts[s]})" for s in ("train", "val", "test")} <= set(labels)
    assert plt.get_fignums() == []  # built outside pyplot: nothing to show or close
    assert_png(figures.save_figure(fig, tmp_path / "maps" / "regions.png"))


def test_regions_map_colours_points_by_region_palette(regions, predictions):
    manifest = predictions.rename(columns={"true_region": "region_id"})[["latitude", "longitude", "region_id"]]
    fig = figures.regions_map(regions, manifest, basemap=None)
    points = [c for c in fig.axes[0].collections if isinstance(c, PathCollection)][0]
    palette = figures.region_palette(regions)
    expected = [palette[r] for r in manifest["region_id"]]
    np.testing.assert_allclose(points.get_facecolors()[:, :3], [to_rgb(c) for c in expected])


def test_region_palette_is_stable_and_distinct(regions):
    palette = figures.region_palette(regions)
    assert list(palette) == list(regions["id"])
    assert len(set(palette.values())) == len(regions)
    assert figures.region_palette(regions.iloc[::-1].iloc[::-1]) == palette


def test_error_lines_sampled_with_seed_and_drawn_exactly(regions, predictions, tmp_path):
    n, cap = len(predictions), 25
    first = figures.error_lines(predictions, max_lines=cap, seed=1)
    again = figures.error_lines(predictions, max_lines=cap, seed=1)
    other = figures.error_lines(predictions, max_lines=cap, seed=2)
    assert len(first) == cap and set(first["image_path"]) == set(again["image_path"])
    assert set(first["image_path"]) != set(other["image_path"])
    assert set(first["image_path"]) <= set(predictions["image_path"])
    assert first["error_km"].is_monotonic_increasing  # largest errors drawn last, on top
    row = first.iloc[0]
    assert list(row.geometry.coords) == [(row["longitude"], row["latitude"]), (row["pred_lon"], row["pred_lat"])]
    assert len(figures.error_lines(predictions, max_lines=10_000)) == n

    for max_lines, expected in ((10_000, n), (cap, cap)):
        fig = figures.error_map(predictions, regions, max_lines=max_lines, seed=1)
        ax = fig.axes[0]
        (lines,) = [c for c in ax.collections if c.get_gid() == maps.ERROR_LINES_GID]
        assert isinstance(lines, LineCollection) and len(lines.get_paths()) == expected
        assert sorted(lines.get_array()) == pytest.approx(
            sorted(figures.error_lines(predictions, max_lines=max_lines, seed=1)["error_km"])
        )
        assert LA_X[0] < ax.get_xlim()[0] and ax.get_xlim()[1] < LA_X[1]
        assert any("Error (km)" in a.get_ylabel() for a in fig.axes[1:])  # the colorbar
    assert f"{cap} of {n} images, sampled with seed 1" in fig.axes[0].get_title()
    assert_png(figures.save_figure(fig, tmp_path / "errors.png"))


def test_error_map_skips_rows_without_coordinates_with_a_warning(regions, predictions):
    broken = predictions.copy()
    broken.loc[broken.index[:3], "pred_lat"] = np.nan
    with pytest.warns(UserWarning, match="skipped 3 predictions"):
        lines = figures.error_lines(broken)
    assert len(lines) == len(predictions) - 3
    empty = figures.error_map(predictions.iloc[:0], regions, basemap=None)  # nothing to draw is not an error
    assert not [c for c in empty.axes[0].collections if c.get_gid() == maps.ERROR_LINES_GID]
    assert "(0 images)" in empty.axes[0].get_title()


def test_region_error_table_numbers(regions):
    pred = pd.DataFrame(
        {
            "true_region": ["hollywood", "hollywood", "hollywood", "long_beach"],
            "error_km": [1.0, 2.0, 6.0, 10.0],
            "correct": [True, True, False, False],
        }
    )
    table = figures.region_error_table(pred, regions).set_index("id")
    assert list(table.index) == list(regions["id"])  # all regions, class order kept
    assert table.loc["hollywood", "mean_error_km"] == pytest.approx(3.0)
    assert table.loc["hollywood", "median_error_km"] == pytest.approx(2.0)
    assert table.loc["hollywood", "accuracy"] == pytest.approx(2 / 3)
    assert table.loc["long_beach", "mean_error_km"] == pytest.approx(10.0)
    assert table.loc["hollywood", "n_test"] == 3 and table.loc["long_beach", "n_test"] == 1
    untested = table.drop(index=["hollywood", "long_beach"])
    assert (untested["n_test"] == 0).all() and untested["mean_error_km"].isna().all()


def test_region_error_map_colours_by_mean_and_marks_untested(regions, predictions, tmp_path):
    fig = figures.region_error_map(predictions, regions)
    ax = fig.axes[0]
    table = figures.region_error_table(predictions, regions)
    tested = table[table["n_test"] > 0]
    choropleth = [c for c in ax.collections if isinstance(c, PatchCollection) and c.get_array() is not None]
    np.testing.assert_allclose(choropleth[0].get_array(), tested["mean_error_km"])
    labels = texts(fig)
    assert sum(maps.NO_TEST_LABEL in t for t in labels) == 3  # Malibu, Santa Clarita and the legend
    for name, err, n in zip(tested["name"], tested["mean_error_km"], tested["n_test"]):
        assert f"{name}\n{err:.1f} km (n={n})" in labels
    assert LA_Y[0] < ax.get_ylim()[0] and ax.get_ylim()[1] < LA_Y[1]
    assert_png(figures.save_figure(fig, tmp_path / "region_errors.png"))


def test_offline_basemap_falls_back_with_scale_bar_and_note(regions, monkeypatch):
    import contextily

    def no_tiles(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(maps, "tiles_reachable", lambda *a, **k: True)  # the server seems up ...
    monkeypatch.setattr(contextily, "add_basemap", no_tiles)  # ... but fetching fails
    fig = figures.regions_map(regions)
    labels = texts(fig)
    assert maps.OFFLINE_NOTE in labels
    (scale,) = [t for t in labels if t.endswith(" km")]
    length_km = int(scale.split()[0])
    width_km = np.diff(fig.axes[0].get_xlim())[0] / 1000
    assert length_km in maps._SCALE_STEPS_KM and width_km / 10 <= length_km <= width_km / 3
    assert "N" in labels  # north arrow
    assert fig.axes[0].get_facecolor()[:3] == pytest.approx(to_rgb(maps.PLAIN_BACKGROUND))


def test_basemap_none_never_tries_tiles(regions, monkeypatch):
    import contextily

    def fail(*args, **kwargs):
        raise AssertionError("tiles must not be requested")

    monkeypatch.setattr(maps, "tiles_reachable", fail)
    monkeypatch.setattr(contextily, "add_basemap", fail)
    fig = figures.regions_map(regions, basemap=None)
    labels = texts(fig)
    assert maps.OFFLINE_NOTE not in labels and any(t.endswith(" km") for t in labels)
    with pytest.raises(ValueError, match="basemap"):
        figures.regions_map(regions, basemap="satellite")


@pytest.fixture
def tile_server():
    """A local tile server answering every request with one flat 256 px PNG tile."""
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 220, 180)).save(buffer, "PNG")
    tile = buffer.getvalue()

    class Tiles(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(tile)))
            self.end_headers()
            self.wfile.write(tile)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Tiles)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/{{z}}/{{x}}/{{y}}.png"
    server.shutdown()
    server.server_close()


def test_tiles_are_drawn_in_the_map_crs_when_the_server_answers(regions, monkeypatch, tile_server):
    monkeypatch.setattr(maps, "tiles_reachable", PROBE)  # the real probe, against the local server
    monkeypatch.setattr(maps, "TILE_URL", tile_server)
    fig = figures.regions_map(regions)
    ax = fig.axes[0]
    (tiles,) = ax.get_images()
    west, east, south, north = tiles.get_extent()  # reprojected to EPSG:3310, covering the map
    assert west <= ax.get_xlim()[0] and east >= ax.get_xlim()[1]
    assert south <= ax.get_ylim()[0] and north >= ax.get_ylim()[1]
    labels = texts(fig)
    assert maps.OFFLINE_NOTE not in labels and maps.TILE_ATTRIBUTION in labels
    assert plt.get_fignums() == []  # contextily's pyplot.draw() left no stray figure behind


def test_tile_probe_is_a_quick_socket_check():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert PROBE.__wrapped__("127.0.0.1", port, 1.0) is True
    assert PROBE.__wrapped__("127.0.0.1", port, 1.0) is False  # closed now


def test_map_inputs_are_checked(regions):
    with pytest.raises(ValueError, match=r"points is missing column\(s\) \['region_id'\]"):
        figures.regions_map(regions, pd.DataFrame({"latitude": [34.0], "longitude": [-118.3]}))
    with pytest.raises(ValueError, match="error_km"):
        figures.error_map(pd.DataFrame({"latitude": [34.0]}), regions)


# ---------------------------------------------------------------- charts


def test_confusion_matrix_normalised_and_counts(regions, predictions, tmp_path):
    table = confusion(predictions, regions)
    fig = figures.confusion_matrix_figure(table, "Zero-shot")
    mesh = [c for c in fig.axes[0].collections if isinstance(c, QuadMesh)][0]
    shares = np.asarray(mesh.get_array()).reshape(table.shape)
    row_sums = np.nansum(shares, axis=1)
    supported = table.sum(axis=1).to_numpy() > 0
    np.testing.assert_allclose(row_sums[supported], 1.0)
    assert np.isnan(shares[~supported]).all()  # regions without test images: blank rows, not zeros
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert ticks[0] == f"{regions['name'][0]} (n={int(table.iloc[0].sum())})"
    assert fig.axes[0].get_title() == "Zero-shot"
    assert_png(figures.save_figure(fig, tmp_path / "confusion.png"))

    counts = figures.confusion_matrix_figure(table, "Counts", normalize=False)
    mesh = [c for c in counts.axes[0].collections if isinstance(c, QuadMesh)][0]
    np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(table.shape), table.to_numpy())


def test_training_curves_mark_best_epoch(tmp_path):
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3, 4],
            "train_loss": [2.0, 1.5, 1.1, 0.8],
            "val_loss": [2.1, 1.6, 1.4, 1.5],
            "val_acc": [0.2, 0.35, 0.41, 0.39],
            "lr": [1e-4, 1e-4, 5e-5, 1e-5],
            "seconds": [60, 60, 60, 60],
        }
    )
    fig = figures.training_curves(history)
    assert len(fig.axes) == 3
    for ax in fig.axes:
        vlines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert vlines and vlines[0].get_xdata()[0] == 3
    assert "best: epoch 3, 41.0%" in texts(fig)
    assert "4.0 min" in fig.texts[0].get_text()
    assert_png(figures.save_figure(fig, tmp_path / "curves.png"))
    with pytest.raises(ValueError, match="val_acc"):
        figures.training_curves(history.drop(columns="val_acc"))


def test_reliability_diagram_bars_match_table(predictions, tmp_path):
    table = reliability_table(predictions, n_bins=10)
    fig = figures.reliability_diagram(table, ece=0.1234, title="Fine-tuned")
    top = fig.axes[0]
    used = table[table["count"] > 0]
    acc_bars = top.containers[0]
    np.testing.assert_allclose([b.get_height() for b in acc_bars], used["accuracy"])
    np.testing.assert_allclose([b.get_x() for b in acc_bars], used["lower"])
    np.testing.assert_allclose([b.get_height() for b in fig.axes[1].containers[0]], used["count"])
    assert "ECE 0.123" in top.get_title()
    assert_png(figures.save_figure(fig, tmp_path / "reliability.png"))


def test_topk_bar_highlights_true_region(tmp_path):
    names, probs = ["Santa Monica", "Venice Beach", "Malibu"], [0.6, 0.3, 0.1]
    fig = figures.topk_bar(names, probs, true_region="Venice Beach")
    ax = fig.axes[0]
    bars = list(ax.patches)
    assert [round(b.get_width(), 6) for b in bars] == probs
    green = to_rgb(figures.CORRECT_COLOR)
    assert [b.get_facecolor()[:3] == pytest.approx(green) for b in bars] == [False, True, False]
    assert "rank 2" in ax.get_title()
    assert "not in the top 3" in figures.topk_bar(names, probs, "Pasadena").axes[0].get_title()
    assert_png(figures.save_figure(fig, tmp_path / "topk.png"))


def test_example_grid_skips_unreadable_images(regions, predictions, tmp_path):
    rng = np.random.default_rng(0)
    for path in predictions["image_path"]:
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / path)
    sample = predictions.sample(frac=1.0, random_state=3)
    corrupt = sample["image_path"].iloc[0]
    (tmp_path / corrupt).write_bytes(b"not an image")
    with pytest.warns(UserWarning, match=corrupt):
        fig = figures.example_grid(predictions, tmp_path, regions, n=6, seed=3)
    images = [im for ax in fig.axes for im in ax.get_images() if isinstance(im, AxesImage)]
    assert len(images) == 6
    shown = sample.iloc[1:7]  # the corrupt first pick is replaced by the next one
    titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_images()]
    names = figures.region_names(regions)
    for title, (_, row) in zip(titles, shown.iterrows()):
        assert title == ("✓" if row["correct"] else "✗") + f" true: {names[row['true_region']]}"
    first = shown.iloc[0]
    assert f"1. {names[first['top_regions'][0]]}  {first['top_probs'][0]:.0%}" in " ".join(texts(fig))
    assert_png(figures.save_figure(fig, tmp_path / "out" / "grid.png"))


def test_region_examples_one_cell_per_region_and_image(regions, tmp_path):
    rng = np.random.default_rng(1)
    ids = list(regions["id"][:3])
    manifest = pd.DataFrame(
        {
            "image_path": [f"{rid}_{k}.png" for rid in ids for k in range(3)],
            "region_id": [rid for rid in ids for _ in range(3)],
            "heading": [0.0, 90.0, 180.0] * 3,
        }
    )
    for path in manifest["image_path"]:
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / path)
    broken = [f"{ids[0]}_0.png", f"{ids[0]}_1.png", f"{ids[1]}_0.png", f"{ids[1]}_1.png", f"{ids[1]}_2.png"]
    for path in broken:  # the first region keeps one readable image, the second none
        (tmp_path / path).write_bytes(b"")
    with pytest.warns(UserWarning, match="empty file"):
        fig = figures.region_examples(manifest, tmp_path, regions, seed=0)
    assert len(fig.axes) == len(regions)
    assert [bool(ax.get_images()) for ax in fig.axes[:3]] == [True, False, True]
    assert fig.axes[0].get_title() == f"{regions['name'][0]} · 180°"  # the only readable one of its three
    assert sum("no readable image" in t for t in texts(fig)) == len(regions) - 2
    palette = figures.region_palette(regions)
    assert fig.axes[1].spines["top"].get_edgecolor()[:3] == pytest.approx(to_rgb(palette[ids[1]]))
    assert_png(figures.save_figure(fig, tmp_path / "region_examples.png"))


def test_comparison_bar_with_and_without_intervals(regions, tmp_path):
    metrics = {"zero-shot": make_metrics(regions, 0.3, with_ci=True), "fine-tuned": make_metrics(regions, 0.6, False)}
    table = figures.comparison_table(metrics).set_index(["model", "metric"])
    assert table.loc[("zero-shot", "ACC@5 km"), "ci_low"] == pytest.approx(0.2)
    assert np.isnan(table.loc[("fine-tuned", "Accuracy"), "ci_low"])
    fig = figures.comparison_bar(metrics)
    ax = fig.axes[0]
    heights = [b.get_height() for c in ax.containers[:2] for b in c]
    np.testing.assert_allclose(heights, figures.comparison_table(metrics)["value"])
    errorbars = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert sum(len(c.get_segments()) for c in errorbars) == 2  # zero-shot accuracy and ACC@5 km
    assert "CI" in ax.get_title()
    assert_png(figures.save_figure(fig, tmp_path / "comparison.png"))
    plain = figures.comparison_bar({"zero-shot": make_metrics(regions, 0.3, with_ci=False)})
    assert not [c for c in plain.axes[0].collections if isinstance(c, LineCollection)]
    with pytest.raises(ValueError, match="f1_macro"):
        figures.comparison_table({"x": {"accuracy": 0.5}})
    outside = make_metrics(regions, 0.3, with_ci=True)
    outside["ci"]["accuracy"] = [0.32, 0.5]  # a percentile interval above its own estimate
    segments = [seg for c in figures.comparison_bar({"m": outside}).axes[0].collections
                if isinstance(c, LineCollection) for seg in c.get_segments()]
    assert any(np.isclose(seg[0][1], 0.3) and np.isclose(seg[1][1], 0.5) for seg in segments)


def test_per_region_bars_use_names_and_order(regions, tmp_path):
    metrics = {"zero-shot": make_metrics(regions, 0.3, False), "fine-tuned": make_metrics(regions, 0.6, False)}
    fig = figures.per_region_bars(metrics, regions)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{n} (n={i})" for i, n in enumerate(regions["name"])]
    np.testing.assert_allclose(
        [b.get_width() for b in ax.containers[1]], [metrics["fine-tuned"]["per_region"][r]["f1"] for r in regions["id"]]
    )
    assert_png(figures.save_figure(fig, tmp_path / "per_region.png"))


def test_split_counts_stack_every_region(regions, predictions, tmp_path):
    manifest = predictions.rename(columns={"true_region": "region_id"})
    manifest["split"] = np.where(np.arange(len(manifest)) % 3 == 0, "test", "train")
    fig = figures.split_counts_figure(manifest, regions)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(regions["name"])  # empty regions too
    totals = [t.get_text().strip() for t in ax.texts]
    expected = manifest["region_id"].value_counts().reindex(regions["id"], fill_value=0)
    assert totals == [f"{v:,}" for v in expected]
    n_test = int((manifest["split"] == "test").sum())
    assert f"train {len(manifest) - n_test}, test {n_test}" in ax.get_title()
    assert_png(figures.save_figure(fig, tmp_path / "splits.png"))
    with pytest.raises(ValueError, match="split"):
        figures.split_counts_figure(manifest.drop(columns="split"), regions)


def test_heading_figure_counts_sectors(tmp_path):
    manifest = pd.DataFrame({"heading": [0, 5, 355, 90, 90, 180, 270, np.nan]})
    fig = figures.heading_figure(manifest)
    heights = [b.get_height() for b in fig.axes[0].patches]
    assert len(heights) == 16 and sum(heights) == 7
    assert heights[0] == 3 and heights[4] == 2 and heights[8] == 1 and heights[12] == 1  # N, E, S, W
    assert "1 without heading" in fig.axes[0].get_title()
    assert_png(figures.save_figure(fig, tmp_path / "headings.png"))


def test_save_figure_makes_png_and_closes(tmp_path):
    fig = plt.figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    path = figures.save_figure(fig, tmp_path / "a" / "b" / "line.png")
    assert path.exists() and plt.get_fignums() == []
    with Image.open(path) as img:
        assert img.format == "PNG"
    with pytest.raises(ValueError, match="PNG"):
        figures.save_figure(maps.new_figure((2, 2)), tmp_path / "x.jpg")


def test_coordinate_error_map_panels_share_one_colour_scale(regions, predictions):
    near = predictions.assign(pred_lat=predictions["latitude"] + 0.001, pred_lon=predictions["longitude"])
    near["error_km"] = haversine_km(near["latitude"], near["longitude"], near["pred_lat"], near["pred_lon"])
    fig = maps.coordinate_error_map({"centroid": predictions, "retrieval": near}, regions, basemap=None)
    panels = [ax for ax in fig.axes if any(c.get_gid() == maps.ERROR_LINES_GID for c in ax.collections)]
    assert len(panels) == 2
    scales = [[c for c in ax.collections if c.get_gid() == maps.ERROR_LINES_GID][0].norm for ax in panels]
    assert [(s.vmin, s.vmax) for s in scales] == [(0, pytest.approx(predictions["error_km"].max()))] * 2
    assert panels[1].get_title().startswith("retrieval: median 0.11 km, 100% within 1 km")
    plt.close(fig)


def test_risk_coverage_figure_draws_every_curve_and_checks_the_threshold():
    curve = {"coverage": [0.5, 1.0], "acc_at_km": {"1": [1.0, 0.5]}, "median_error_km": [0.2, 3.0],
             "aurc": {"1": 0.25}}
    curves = {"zeroshot": {"centroid": curve}, "finetuned": {"centroid": curve, "retrieval": curve}}
    fig = figures.risk_coverage_figure(curves, {"zeroshot": "Zero-shot", "finetuned": "Fine-tuned"})
    acc_ax = fig.axes[0]
    assert len(acc_ax.lines) == 3 and [line.get_linestyle() for line in acc_ax.lines] == ["--", "-", "-"]
    assert np.array_equal(acc_ax.lines[0].get_ydata(), [1.0, 0.5])
    assert "Fine-tuned · retrieval (AURC 0.250)" in [t.get_text() for t in fig.legends[0].get_texts()]
    with pytest.raises(ValueError, match=r"no ACC@5 km"):
        figures.risk_coverage_figure(curves, threshold_km="5")


def test_neighbour_figure_captions_similarity_and_distance(tmp_path):
    for name, colour in (("q.png", "red"), ("g1.png", "blue"), ("g2.png", "green")):
        Image.new("RGB", (32, 32), colour).save(tmp_path / name)
    answers = pd.DataFrame({"image_path": ["q.png"], "latitude": [34.0], "longitude": [-118.3], "error_km": [0.5],
                            "method": ["retrieval"], "nearest": [["g1.png", "g2.png"]],
                            "nearest_similarities": [[0.9, 0.8]]})
    gallery = pd.DataFrame({"image_path": ["g1.png", "g2.png"], "latitude": [34.0, 34.1], "longitude": [-118.3, -118.3]})
    fig = figures.neighbour_figure(answers, gallery, tmp_path)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["query (retrieval answer 0.50 km off)", "#1: similarity 0.900\n0.00 km from the query",
                      f"#2: similarity 0.800\n{haversine_km(34.0, -118.3, 34.1, -118.3):.2f} km from the query"]
    with pytest.raises(ValueError, match="lack"):
        figures.neighbour_figure(answers.drop(columns="nearest"), gallery, tmp_path)
    plt.close(fig)
