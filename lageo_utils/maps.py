"""Maps of regions, capture points and prediction errors (geopandas, EPSG:3310).

Every function takes data and returns a matplotlib ``Figure`` built without pyplot, so nothing
is shown or kept open behind the caller's back; in Jupyter, display the returned figure.

Maps are drawn in California Albers (EPSG:3310): metres, equal-area, and little distortion
across Los Angeles County, so the scale bar is true everywhere on the map. ``basemap="auto"``
draws contextily tiles when the tile server answers and otherwise a plain background with a
note; ``basemap=None`` never tries the network.
"""

from __future__ import annotations

import functools
import math
import socket
import threading
import warnings
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
from shapely.geometry import LineString

MAP_CRS = "EPSG:3310"  # California Albers: metres, equal-area
TILE_URL = "https://a.basemaps.cartocdn.com/light_all/{z}/{x}/{y}.png"  # CartoDB Positron
TILE_ATTRIBUTION = "(C) OpenStreetMap contributors (C) CARTO"
TILE_PROBE_TIMEOUT_S = 1.0
PLAIN_BACKGROUND = "#eef1f4"
OFFLINE_NOTE = "Basemap unavailable offline"
SPLIT_COLORS = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868"}
UNKNOWN_COLOR = "#9a9a9a"
ERROR_LINES_GID = "error-lines"
NO_TEST_LABEL = "no test images"
RING_COST = 0.5  # label placement: penalty per ring away from the box (covering a whole box costs 10)
_SCALE_STEPS_KM = (1, 2, 5, 10, 20, 25, 50, 100, 200, 500)


def region_palette(regions: pd.DataFrame) -> dict[str, str]:
    """A fixed colour per region id (hex), in region order, shared by every figure.

    tab20's dark shades come first, then its light ones, so neighbours in the class order get
    distinct hues; tab20b and tab20c continue past 20 regions.
    """
    tab20 = colormaps["tab20"].colors
    colors = [*tab20[0::2], *tab20[1::2], *colormaps["tab20b"].colors, *colormaps["tab20c"].colors]
    return {rid: to_hex(colors[i % len(colors)]) for i, rid in enumerate(regions["id"])}


def region_names(regions: pd.DataFrame) -> dict[str, str]:
    """Region id -> display name."""
    return dict(zip(regions["id"], regions["name"]))


def regions_map(regions: gpd.GeoDataFrame, points: pd.DataFrame | None = None, basemap: str | None = "auto") -> Figure:
    """The region boxes with their names, and optionally capture points.

    ``points`` is a manifest (latitude, longitude, region_id); points are coloured by split when
    it has a ``split`` column, else by region.
    """
    boxes = regions.to_crs(MAP_CRS)
    palette = region_palette(regions)
    fig, ax = _map_axes(figsize=(10, 11))
    pts = None
    if points is not None:
        _require_columns(points, ["latitude", "longitude", "region_id"], "points")
        pts = _points_gdf(points["longitude"], points["latitude"], points)
    _set_extent(ax, boxes, pts)
    boxes.plot(
        ax=ax,
        facecolor=[palette[r] for r in boxes["id"]],
        edgecolor=[palette[r] for r in boxes["id"]],
        alpha=0.25,
        linewidth=0,
        zorder=2,
    )
    boxes.boundary.plot(ax=ax, color=[palette[r] for r in boxes["id"]], linewidth=1.4, zorder=3)
    title = f"Regions ({len(regions)})"
    if pts is not None and len(pts):
        if "split" in pts.columns:
            splits = _split_order(pts["split"])
            colors = pts["split"].map(lambda s: SPLIT_COLORS.get(s, UNKNOWN_COLOR))
            handles = [
                Line2D(
                    [],
                    [],
                    marker="o",
                    linestyle="",
                    markersize=6,
                    color=SPLIT_COLORS.get(s, UNKNOWN_COLOR),
                    label=f"{s} ({(pts['split'] == s).sum():,})",
                )
                for s in splits
            ]
            ax.legend(handles=handles, title="Split (images)", loc="upper left", frameon=True, fontsize=9)
        else:
            colors = pts["region_id"].map(lambda r: palette.get(r, UNKNOWN_COLOR))
        size = float(np.clip(20_000 / len(pts), 3, 14))  # bigger dots when there are few
        pts.plot(ax=ax, color=list(colors), markersize=size, edgecolor="white", linewidth=0.2, zorder=4)
        n_locations = len(pts[["latitude", "longitude"]].drop_duplicates())
        title += f" and capture points ({len(pts):,} images at {n_locations:,} locations)"
    ax.set_title(title, fontsize=13, pad=10)
    _finish_map(ax, basemap)
    _label_regions(ax, boxes, list(boxes["name"]), [palette[r] for r in boxes["id"]], inside_ok=pts is None)
    return fig


def error_lines(predictions: pd.DataFrame, max_lines: int = 2000, seed: int = 0) -> gpd.GeoDataFrame:
    """One LineString per prediction from the true point to the predicted centroid (EPSG:4326).

    More than ``max_lines`` rows are sampled without replacement with ``seed``; rows without
    coordinates are skipped with a warning. Rows are sorted by error so the largest draw on top.
    """
    _require_columns(predictions, ["latitude", "longitude", "pred_lat", "pred_lon", "error_km"], "predictions")
    coords = ["latitude", "longitude", "pred_lat", "pred_lon", "error_km"]
    usable = predictions.dropna(subset=coords)
    if len(usable) < len(predictions):
        warnings.warn(
            f"error map: skipped {len(predictions) - len(usable)} predictions without coordinates", stacklevel=2
        )
    if len(usable) > max_lines:
        usable = usable.sample(n=max_lines, random_state=seed)
    geometry = [
        LineString([(lon, lat), (plon, plat)])
        for lat, lon, plat, plon in usable[["latitude", "longitude", "pred_lat", "pred_lon"]].to_numpy(float)
    ]
    lines = gpd.GeoDataFrame(usable.copy(), geometry=geometry, crs="EPSG:4326")
    return lines.sort_values("error_km", kind="stable")


def error_map(
    predictions: pd.DataFrame,
    regions: gpd.GeoDataFrame,
    max_lines: int = 2000,
    seed: int = 0,
    basemap: str | None = "auto",
) -> Figure:
    """A line from each true point to its predicted region centroid, coloured by error (km)."""
    lines = error_lines(predictions, max_lines=max_lines, seed=seed).to_crs(MAP_CRS)
    boxes = regions.to_crs(MAP_CRS)
    fig, ax = _map_axes(figsize=(10, 11))
    _set_extent(ax, boxes, lines)
    boxes.boundary.plot(ax=ax, color="#7a7a7a", linewidth=0.8, alpha=0.6, zorder=2)
    if len(lines):
        lines.plot(
            ax=ax,
            column="error_km",
            cmap="plasma",
            vmin=0,  # colours mean the same distance on every map
            linewidth=0.9,
            alpha=0.8,
            zorder=3,
            legend=True,
            legend_kwds={"label": "Error (km): true point to predicted region centre", "shrink": 0.6, "pad": 0.02},
        )
        ax.collections[-1].set_gid(ERROR_LINES_GID)
        starts = gpd.GeoSeries(gpd.points_from_xy(lines["longitude"], lines["latitude"]), crs="EPSG:4326")
        starts.to_crs(MAP_CRS).plot(ax=ax, color="#303030", markersize=2, zorder=4)
        centres = lines[["pred_lat", "pred_lon"]].drop_duplicates()
        ends = gpd.GeoSeries(gpd.points_from_xy(centres["pred_lon"], centres["pred_lat"]), crs="EPSG:4326")
        ends.to_crs(MAP_CRS).plot(
            ax=ax, marker="X", color="black", edgecolor="white", linewidth=0.6, markersize=70, zorder=5
        )
        ax.legend(
            handles=[
                Line2D([], [], marker="o", linestyle="", color="#303030", markersize=3, label="true capture point"),
                Line2D([], [], marker="X", linestyle="", color="black", markersize=8, label="predicted region centre"),
            ],
            loc="upper left",
            fontsize=9,
        )
    noun = "image" if len(predictions) == 1 else "images"
    shown = (
        f"{len(lines):,} of {len(predictions):,} {noun}" if len(lines) < len(predictions) else f"{len(lines):,} {noun}"
    )
    sampled = f", sampled with seed {seed}" if len(predictions) > max_lines else ""
    median = f"; median {np.median(predictions['error_km']):.1f} km" if len(predictions) else ""
    ax.set_title(f"Prediction errors ({shown}{sampled}{median})", fontsize=13, pad=10)
    _finish_map(ax, basemap)
    _label_regions(ax, boxes, list(boxes["name"]), ["#9a9a9a"] * len(boxes), fontsize=7, inside_ok=False)
    return fig


def coordinate_error_map(
    answers: Mapping[str, pd.DataFrame],
    regions: gpd.GeoDataFrame,
    max_lines: int = 2000,
    seed: int = 0,
    basemap: str | None = "auto",
    title: str = "Coordinate errors",
) -> Figure:
    """One map per coordinate method, side by side: a line from each true point to its answer.

    ``answers`` maps a method name to its answers table (``latitude``, ``longitude``,
    ``pred_lat``, ``pred_lon``, ``error_km``). Every panel shares the extent and the colour
    scale (0 to the largest error shown), so the same colour means the same distance.
    """
    if not answers:
        raise ValueError("coordinate_error_map needs at least one answers table")
    lines = {name: error_lines(table, max_lines=max_lines, seed=seed).to_crs(MAP_CRS) for name, table in answers.items()}
    boxes = regions.to_crs(MAP_CRS)
    vmax = max([float(frame["error_km"].max()) for frame in lines.values() if len(frame)] or [1.0])
    fig = new_figure((7.5 * len(lines), 8.5))
    axes = fig.subplots(1, len(lines), squeeze=False)[0]
    mappable = None
    for ax, (name, frame) in zip(axes, lines.items()):
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        _set_extent(ax, boxes, *lines.values())
        boxes.boundary.plot(ax=ax, color="#7a7a7a", linewidth=0.8, alpha=0.6, zorder=2)
        if len(frame):
            frame.plot(ax=ax, column="error_km", cmap="plasma", vmin=0, vmax=vmax, linewidth=0.9, alpha=0.8, zorder=3)
            mappable = ax.collections[-1]
            mappable.set_gid(ERROR_LINES_GID)
            starts = gpd.GeoSeries(gpd.points_from_xy(frame["longitude"], frame["latitude"]), crs="EPSG:4326")
            starts.to_crs(MAP_CRS).plot(ax=ax, color="#303030", markersize=2, zorder=4)
        errors = answers[name]["error_km"]
        within = float((errors <= 1).mean()) if len(errors) else float("nan")
        ax.set_title(f"{name}: median {np.median(errors):.2f} km, {within:.0%} within 1 km", fontsize=12, pad=8)
        _finish_map(ax, basemap)
    if mappable is not None:
        fig.colorbar(mappable, ax=list(axes), shrink=0.6, pad=0.02, label="Error (km): true point to the answer")
    fig.suptitle(f"{title} on {len(next(iter(answers.values()))):,} test images (line: true point to answer)",
                 fontsize=13)
    return fig


def region_error_table(predictions: pd.DataFrame, regions: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """The regions with n_test, mean_error_km, median_error_km and accuracy of their test images.

    Grouped by the true region; regions without test images get n_test 0 and NaN statistics.
    """
    _require_columns(predictions, ["true_region", "error_km", "correct"], "predictions")
    stats = predictions.groupby("true_region").agg(
        n_test=("error_km", "size"),
        mean_error_km=("error_km", "mean"),
        median_error_km=("error_km", "median"),
        accuracy=("correct", "mean"),
    )
    table = regions.merge(stats, how="left", left_on="id", right_index=True)
    table["n_test"] = table["n_test"].fillna(0).astype(int)
    return table


def region_error_map(predictions: pd.DataFrame, regions: gpd.GeoDataFrame, basemap: str | None = "auto") -> Figure:
    """Regions coloured by the mean error (km) of their test images; regions without any are hatched."""
    table = region_error_table(predictions, regions).to_crs(MAP_CRS)
    fig, ax = _map_axes(figsize=(10, 11))
    _set_extent(ax, table)
    tested = table[table["n_test"] > 0]
    untested = table[table["n_test"] == 0]
    if len(tested):
        tested.plot(
            ax=ax,
            column="mean_error_km",
            cmap="YlOrRd",
            edgecolor="#444444",
            linewidth=0.8,
            zorder=2,
            legend=True,
            legend_kwds={"label": "Mean error of the region's test images (km)", "shrink": 0.6, "pad": 0.02},
        )
    if len(untested):
        untested.plot(ax=ax, facecolor="#d9d9d9", edgecolor="#8a8a8a", hatch="////", linewidth=0.8, zorder=2)
        ax.legend(
            handles=[Patch(facecolor="#d9d9d9", edgecolor="#8a8a8a", hatch="////", label=NO_TEST_LABEL)],
            loc="upper left",
            fontsize=9,
        )
    labels = [
        f"{name}\n{err:.1f} km (n={n})" if n else f"{name}\n{NO_TEST_LABEL}"
        for name, err, n in zip(table["name"], table["mean_error_km"], table["n_test"])
    ]
    ax.set_title(
        f"Mean prediction error per true region ({int(table['n_test'].sum()):,} test images)", fontsize=13, pad=10
    )
    _finish_map(ax, basemap)
    _label_regions(ax, table, labels, ["#444444"] * len(table))
    return fig


@functools.cache
def tiles_reachable(host: str, port: int, timeout_s: float = TILE_PROBE_TIMEOUT_S) -> bool:
    """Whether the tile server accepts a TCP connection; probed once per process."""
    reached: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                reached.append(True)
        except OSError:
            pass

    # A thread bounds the whole probe: DNS lookups do not honour socket timeouts.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return bool(reached)


def add_basemap(ax, basemap: str | None = "auto") -> bool:
    """Draw tiles under the map when ``basemap="auto"`` and they can be fetched; True when drawn.

    Any failure (offline, timeout, server error, missing reprojection support) means a plain
    background and a small note instead: a report must never fail for want of a basemap.
    """
    if basemap not in ("auto", None):
        raise ValueError(f"basemap must be 'auto' or None, not {basemap!r}")
    drawn = False
    server = urlsplit(TILE_URL)
    if basemap == "auto" and tiles_reachable(server.hostname, server.port or 443):
        try:
            drawn = _draw_tiles(ax)
        except Exception:  # any tile failure at all: the plain map below (see the docstring)
            drawn = False
    if not drawn:
        ax.set_facecolor(PLAIN_BACKGROUND)
    if basemap == "auto" and not drawn:
        ax.text(
            0.99,
            0.01,
            OFFLINE_NOTE,
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=8,
            style="italic",
            color="#555555",
            zorder=10,
        )
    return drawn


def _draw_tiles(ax) -> bool:
    import contextily as ctx
    import matplotlib.pyplot as plt

    open_before = set(plt.get_fignums())
    try:
        with warnings.catch_warnings():  # rasterio's own deprecation notices are noise in a report
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            ctx.add_basemap(
                ax,
                crs=MAP_CRS,
                source=TILE_URL,
                attribution=TILE_ATTRIBUTION,
                attribution_size=6,
                timeout=(1, 5),
                zorder=0,
            )
    finally:
        # add_basemap calls pyplot.draw(), which opens an empty pyplot figure when none is current.
        for number in set(plt.get_fignums()) - open_before:
            plt.close(number)
    return True


def add_scale_bar(ax) -> AnchoredSizeBar:
    """A labelled bar of a round length, about a fifth of the map width, at the lower left.

    matplotlib's own AnchoredSizeBar, since matplotlib-scalebar is not a dependency; in
    EPSG:3310 one data unit is one metre, so the bar is exactly its labelled length.
    """
    x0, x1 = ax.get_xlim()
    target_km = (x1 - x0) / 1000 / 5
    length_km = max([s for s in _SCALE_STEPS_KM if s <= target_km], default=_SCALE_STEPS_KM[0])
    bar = AnchoredSizeBar(
        ax.transData,
        length_km * 1000,
        f"{length_km} km",
        loc="lower left",
        pad=0.5,
        borderpad=0.8,
        sep=4,
        frameon=True,
        size_vertical=(x1 - x0) / 250,
        color="black",
        fontproperties={"size": 9},
    )
    bar.patch.set_alpha(0.85)
    bar.set_zorder(10)
    ax.add_artist(bar)
    return bar


def add_north_arrow(ax) -> None:
    """An arrow marked N at the upper right (grid north; within about 1.5 degrees of true north in LA)."""
    ax.annotate(
        "N",
        xy=(0.96, 0.97),
        xytext=(0.96, 0.89),
        xycoords="axes fraction",
        ha="center",
        va="center",
        fontsize=12,
        fontweight="bold",
        arrowprops={"facecolor": "black", "edgecolor": "black", "width": 3, "headwidth": 10, "headlength": 10},
        zorder=10,
    )


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A Figure on an Agg canvas, outside pyplot: never shown, never left open."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _map_axes(figsize: tuple[float, float]):
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return fig, ax


def _set_extent(ax, *frames: gpd.GeoDataFrame | None, pad: float = 0.06) -> None:
    bounds = np.array([f.total_bounds for f in frames if f is not None and len(f)])
    minx, miny = bounds[:, 0].min(), bounds[:, 1].min()
    maxx, maxy = bounds[:, 2].max(), bounds[:, 3].max()
    margin = pad * max(maxx - minx, maxy - miny)
    ax.set_xlim(minx - margin, maxx + margin)
    ax.set_ylim(miny - margin, maxy + margin)


def _finish_map(ax, basemap: str | None) -> None:
    ax.set_ylabel("")  # geopandas labels axes from the CRS; the ticks are hidden, so name the CRS once
    ax.set_xlabel("EPSG:3310 (California Albers)", fontsize=8, color="#555555", loc="right")
    add_basemap(ax, basemap)
    add_scale_bar(ax)
    add_north_arrow(ax)


def _points_gdf(lon, lat, frame: pd.DataFrame) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(
        frame.reset_index(drop=True), geometry=gpd.points_from_xy(lon, lat), crs="EPSG:4326"
    ).to_crs(MAP_CRS)


def _split_order(splits: pd.Series) -> list[str]:
    present = list(dict.fromkeys(splits.astype(str)))
    return [s for s in SPLIT_COLORS if s in present] + sorted(s for s in present if s not in SPLIT_COLORS)


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} is missing column(s) {missing}; it has {list(frame.columns)}")


def _label_regions(
    ax, boxes: gpd.GeoDataFrame, labels: list[str], colors: list[str], fontsize: float = 8, inside_ok: bool = True
) -> None:
    """Name each box inside it when the label fits and ``inside_ok``, else nearby with a leader line.

    Hand-written greedy placement, since adjustText is not a dependency and a few dozen labels
    need nothing more: candidates on growing rings around the box are scored (overlaps with
    labels, boxes, leader lines and the map edge) and the first free one, else the best, is kept.
    """
    renderer = ax.figure.canvas.get_renderer()
    to_data = ax.transData.inverted()
    (x_lo, x_hi), (y_lo, y_hi) = ax.get_xlim(), ax.get_ylim()
    frame = shapely.box(x_lo, y_lo, x_hi, y_hi)
    regions = np.array(list(boxes.geometry))
    taken = _reserved_areas(ax, renderer)  # legend, scale bar, north arrow, notes, then labels
    leaders: list[LineString] = []
    centres = [(g.centroid.x, g.centroid.y) for g in regions]
    for i in _most_crowded_first(centres):
        cx, cy = centres[i]
        text = ax.annotate(
            labels[i],
            xy=(cx, cy),
            xytext=(cx, cy),
            ha="center",
            va="center",
            fontsize=fontsize,
            zorder=9,
            bbox={
                "boxstyle": "round,pad=0.25",
                "facecolor": "white",
                "edgecolor": colors[i],
                "alpha": 0.9,
                "linewidth": 0.8,
            },
            arrowprops={"arrowstyle": "-", "color": colors[i], "linewidth": 0.8, "shrinkA": 0, "shrinkB": 0},
        )
        extent = text.get_window_extent(renderer).expanded(1.08, 1.25)
        (x0, y0), (x1, y1) = to_data.transform([[extent.x0, extent.y0], [extent.x1, extent.y1]])
        w, h = abs(x1 - x0), abs(y1 - y0)
        others = np.delete(regions, i)
        best = (math.inf, None, None)
        for ring, x, y in _candidates(regions[i], w, h):
            if best[0] <= RING_COST * ring:
                break  # no farther ring can beat the best position found
            rect = shapely.box(x - w / 2, y - h / 2, x + w / 2, y + h / 2)
            leader = None if inside_ok and regions[i].contains(rect) else LineString([(cx, cy), (x, y)])
            obstacles = others if leader is None else regions
            cost = RING_COST * ring + _label_cost(rect, leader, frame, obstacles, taken, leaders)
            if cost < best[0]:
                best = (cost, rect, leader)
        _, rect, leader = best
        text.set_position(rect.centroid.coords[0])
        if leader is None:
            text.arrow_patch.set_visible(False)  # the label sits inside its own box
        else:
            leaders.append(leader)
        taken.append(rect)


def _label_cost(rect, leader, frame, region_boxes, taken, leaders) -> float:
    """Penalty of a label position: leaving the map >> covering labels > covering boxes > crossing lines."""
    cost = 0.0 if frame.contains(rect) else 1000.0
    if taken:
        cost += 100 * shapely.area(shapely.intersection(rect, taken)).sum() / rect.area
    cost += 10 * shapely.area(shapely.intersection(rect, region_boxes)).sum() / rect.area
    if leader is not None:
        cost += 5 * shapely.intersects(leader, taken).sum() if taken else 0.0
        if leaders:
            cost += 5 * shapely.intersects(rect, leaders).sum() + 2 * shapely.crosses(leader, leaders).sum()
    return float(cost)


def _reserved_areas(ax, renderer) -> list:
    to_data = ax.transData.inverted()
    artists = [*ax.texts, *ax.artists, *([ax.get_legend()] if ax.get_legend() else [])]
    areas = []
    for artist in artists:
        ext = artist.get_window_extent(renderer)
        (x0, y0), (x1, y1) = to_data.transform([[ext.x0, ext.y0], [ext.x1, ext.y1]])
        areas.append(shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    return areas


def _most_crowded_first(centres: list[tuple[float, float]]) -> list[int]:
    xy = np.asarray(centres, dtype=float)
    dists = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
    np.fill_diagonal(dists, np.inf)
    return list(np.argsort(dists.min(axis=1), kind="stable"))


def _candidates(region, w: float, h: float, rings: int = 14):
    minx, miny, maxx, maxy = region.bounds
    cx, cy = (minx + maxx) / 2, (miny + maxy) / 2
    yield 0, cx, cy
    for ring in range(1, rings + 1):
        # Just clear of the box on the first ring, then about a label height further per ring.
        reach_x = (maxx - minx) / 2 + w / 2 + (ring - 1) * h * 0.8
        reach_y = (maxy - miny) / 2 + h / 2 + (ring - 1) * h * 1.1
        for angle in np.linspace(0, 2 * np.pi, 12 + 4 * ring, endpoint=False):
            yield ring, cx + math.cos(angle) * reach_x, cy + math.sin(angle) * reach_y
