"""Report figures: charts (seaborn) and, re-exported from ``maps``, the geopandas maps.

Every function takes data and returns a matplotlib ``Figure`` built without pyplot (never
shown, never left open); in Jupyter, display the returned figure. ``save_figure`` writes a PNG.
Regions are labelled by display name and keep the same colour everywhere (``region_palette``).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from lageo_utils.maps import (
    SPLIT_COLORS,
    UNKNOWN_COLOR,
    error_lines,
    error_map,
    new_figure,
    region_error_map,
    region_error_table,
    region_names,
    region_palette,
    regions_map,
)

__all__ = [
    "comparison_bar",
    "comparison_table",
    "confusion_matrix_figure",
    "error_lines",
    "error_map",
    "example_grid",
    "heading_figure",
    "neighbour_figure",
    "per_region_bars",
    "region_error_map",
    "region_error_table",
    "region_examples",
    "region_names",
    "region_palette",
    "regions_map",
    "reliability_diagram",
    "risk_coverage_figure",
    "save_figure",
    "split_counts_figure",
    "topk_bar",
    "training_curves",
]

DPI = 120
CORRECT_COLOR = "#2e7d32"
WRONG_COLOR = "#c62828"
BAR_COLOR = "#4c72b0"
MODEL_COLORS = ("#8c8c8c", "#4c72b0", "#dd8452", "#55a868")  # e.g. zero-shot grey, fine-tuned blue
# (label, path into the metrics dict M)
COMPARISON_METRICS = (
    ("Accuracy", ("accuracy",)),
    ("Macro F1", ("f1_macro",)),
    ("Weighted F1", ("f1_weighted",)),
    ("ACC@1 km", ("acc_at_km", "1")),
    ("ACC@5 km", ("acc_at_km", "5")),
    ("ACC@10 km", ("acc_at_km", "10")),
    ("ACC@25 km", ("acc_at_km", "25")),
)


def _themed(style: str = "whitegrid"):
    """Draw inside a seaborn style without changing the caller's global rcParams."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            with sns.axes_style(style), sns.plotting_context("notebook", font_scale=0.9):
                return func(*args, **kwargs)

        return wrapper

    return decorate


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG (120 dpi, tight bounding box), creating folders; the figure is closed."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: figures are saved as PNG; use a .png file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", format="png")
    import matplotlib.pyplot as plt  # only to release figures created through pyplot by callers

    plt.close(fig)
    return path


@_themed("white")
def confusion_matrix_figure(confusion_df: pd.DataFrame, title: str, normalize: bool = True) -> Figure:
    """Heatmap of a confusion table (rows true, columns predicted); row shares when ``normalize``.

    Row labels carry each true region's image count; empty cells are left blank for legibility.
    """
    counts = confusion_df.astype(float)
    support = counts.sum(axis=1)
    values = counts.div(support.where(support > 0), axis=0) if normalize else counts
    labels = values.map(lambda v: "" if not np.isfinite(v) or v == 0 else (f"{v:.0%}" if normalize else f"{v:.0f}"))
    n_rows, n_cols = values.shape
    fig = new_figure((max(5.0, 0.62 * n_cols + 3.5), max(4.0, 0.5 * n_rows + 2.5)))
    ax = fig.add_subplot()
    sns.heatmap(
        values,
        annot=labels.to_numpy(),
        fmt="",
        cmap="Blues",
        vmin=0,
        vmax=1 if normalize else None,
        linewidths=0.5,
        linecolor="white",
        square=False,
        cbar_kws={"label": "share of the true region's images" if normalize else "images", "shrink": 0.8},
        annot_kws={"fontsize": 8},
        ax=ax,
    )
    ax.set_facecolor("#f2f2f2")  # rows of regions without test images (NaN shares)
    for i, name in enumerate(values.index):
        if name in values.columns:  # outline the correct-prediction cell of each row
            j = values.columns.get_loc(name)
            ax.add_patch(Rectangle((j, i), 1, 1, fill=False, edgecolor="#333333", linewidth=0.9))
    ax.set_yticks(np.arange(n_rows) + 0.5, [f"{name} (n={int(n)})" for name, n in support.items()], rotation=0)
    ax.set_xticks(np.arange(n_cols) + 0.5, list(values.columns), rotation=40, ha="right", rotation_mode="anchor")
    ax.set_xlabel("Predicted region")
    ax.set_ylabel("True region")
    ax.set_title(title, fontsize=12, pad=10)
    return fig


@_themed()
def training_curves(history_df: pd.DataFrame) -> Figure:
    """Train/val loss, validation accuracy and learning rate per epoch; the best epoch (highest val_acc) marked."""
    missing = [c for c in ("epoch", "train_loss", "val_loss", "val_acc") if c not in history_df.columns]
    if missing:
        raise ValueError(f"training history is missing column(s) {missing}; it has {list(history_df.columns)}")
    history = history_df.sort_values("epoch")
    panels = 3 if "lr" in history.columns else 2
    fig = new_figure((4.4 * panels, 3.8))
    axes = fig.subplots(1, panels)
    loss = history.melt(id_vars="epoch", value_vars=["train_loss", "val_loss"], var_name="split", value_name="loss")
    loss["split"] = loss["split"].map({"train_loss": "train", "val_loss": "validation"})
    sns.lineplot(loss, x="epoch", y="loss", hue="split", marker="o", palette=[BAR_COLOR, "#dd8452"], ax=axes[0])
    axes[0].set_title("Loss")
    sns.lineplot(history, x="epoch", y="val_acc", marker="o", color="#55a868", ax=axes[1])
    axes[1].set_title("Validation accuracy")
    axes[1].set_ylabel("accuracy")
    if panels == 3:
        sns.lineplot(history, x="epoch", y="lr", marker="o", color="#8172b3", ax=axes[2])
        axes[2].set_title("Learning rate")
        if (history["lr"] > 0).all() and history["lr"].max() > 10 * history["lr"].min():
            axes[2].set_yscale("log")
    scored = history.dropna(subset=["val_acc"])
    if len(scored):
        best = scored.loc[scored["val_acc"].idxmax()]
        for ax in axes:
            ax.axvline(best["epoch"], color="#555555", linestyle="--", linewidth=1)
        axes[1].plot([best["epoch"]], [best["val_acc"]], marker="*", markersize=15, color="#c44e52", zorder=5)
        axes[1].legend(
            handles=[
                Line2D(
                    [],
                    [],
                    marker="*",
                    linestyle="--",
                    color="#555555",
                    markerfacecolor="#c44e52",
                    markersize=12,
                    label=f"best: epoch {int(best['epoch'])}, {best['val_acc']:.1%}",
                )
            ],
            loc="lower right",
            fontsize=8,
        )
    epochs = history["epoch"].to_numpy()
    for ax in axes:
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
    minutes = f", {history['seconds'].sum() / 60:.1f} min" if "seconds" in history.columns else ""
    fig.suptitle(f"Fine-tuning ({len(history)} epochs{minutes})", fontsize=12)
    fig.tight_layout()
    return fig


@_themed()
def reliability_diagram(
    reliability_df: pd.DataFrame, ece: float, title: str = "Reliability", n_bins: int = 15
) -> Figure:
    """Accuracy per confidence bin against the diagonal, with the images per bin below.

    ``reliability_df`` is ``metrics.reliability_table``: bin, confidence (mean top-1 probability),
    accuracy, count, and the bin edges lower/upper; without the edges, bins are taken as
    ``n_bins`` equal-width bins on [0, 1]. Empty bins are not drawn.
    """
    missing = [c for c in ("bin", "confidence", "accuracy", "count") if c not in reliability_df.columns]
    if missing:
        raise ValueError(f"reliability table is missing column(s) {missing}; it has {list(reliability_df.columns)}")
    table = reliability_df[reliability_df["count"] > 0]
    if {"lower", "upper"} <= set(table.columns):
        lefts, width = table["lower"].to_numpy(float), (table["upper"] - table["lower"]).to_numpy(float)
    else:
        bins = table["bin"].to_numpy(int)
        if len(bins) and (bins.min() < 0 or bins.max() >= n_bins):
            raise ValueError(f"reliability bins must lie in 0..{n_bins - 1}; got {bins.min()}..{bins.max()}")
        lefts, width = bins / n_bins, np.full(len(bins), 1.0 / n_bins)
    fig = new_figure((6.0, 6.6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(lefts, table["accuracy"], width=width, align="edge", color=BAR_COLOR, edgecolor="white", label="accuracy")
    gap_low = np.minimum(table["accuracy"], table["confidence"])
    gap = np.abs(table["confidence"] - table["accuracy"])
    top.bar(
        lefts,
        gap,
        bottom=gap_low,
        width=width,
        align="edge",
        facecolor=(0.77, 0.31, 0.32, 0.25),
        edgecolor="#c44e52",
        hatch="//",
        linewidth=0.5,
        label="gap to mean confidence",
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="#555555", linewidth=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8, title=f"ECE = {ece:.3f}", title_fontsize=9)
    top.set_title(f"{title} (ECE {ece:.3f}, {int(table['count'].sum()):,} images)", fontsize=12)
    bottom.bar(lefts, table["count"], width=width, align="edge", color="#8c8c8c", edgecolor="white")
    bottom.set_ylabel("images")
    bottom.set_xlabel("confidence (top-1 probability)")
    fig.tight_layout()
    return fig


@_themed()
def topk_bar(region_names: Sequence[str], probs: Sequence[float], true_region: str | None = None) -> Figure:
    """Horizontal bars of one image's top-k regions (best on top); the true region in green."""
    names, probs = list(region_names), [float(p) for p in probs]
    if len(names) != len(probs):
        raise ValueError(f"topk_bar got {len(names)} region names but {len(probs)} probabilities")
    fig = new_figure((6.0, 0.45 * len(names) + 1.3))
    ax = fig.add_subplot()
    colors = [CORRECT_COLOR if n == true_region else BAR_COLOR for n in names]
    sns.barplot(x=probs, y=names, hue=names, palette=colors, saturation=1, legend=False, orient="h", ax=ax)
    for i, p in enumerate(probs):
        ax.text(p + 0.01, i, f"{p:.1%}", va="center", fontsize=9)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("probability")
    ax.set_ylabel("")
    if true_region is None:
        title = f"Top-{len(names)} predicted regions"
    elif true_region in names:
        title = f"Top-{len(names)} predicted regions (true: {true_region}, rank {names.index(true_region) + 1})"
    else:
        title = f"Top-{len(names)} predicted regions (true: {true_region}, not in the top {len(names)})"
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig


@_themed("white")
def example_grid(
    predictions: pd.DataFrame,
    image_root: str | os.PathLike,
    regions: pd.DataFrame,
    n: int = 8,
    seed: int = 0,
    top_k: int = 3,
) -> Figure:
    """A seeded sample of test images, each with its true region and its top-k predictions.

    Unreadable images are skipped with a warning naming the file; the next sampled row takes
    their place.
    """
    names = region_names(regions)
    shown = _readable_images(predictions.sample(frac=1.0, random_state=seed), image_root, n)
    cols = max(1, min(4, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    aspect = float(np.median([image.height / image.width for _, image in shown])) if shown else 1.0
    image_h, caption_h = 3.1 * aspect, 0.3 + 0.22 * top_k
    fig = new_figure((3.3 * cols, (image_h + caption_h + 0.5) * rows))
    if not shown:
        fig.text(0.5, 0.5, "No readable images to show", ha="center", va="center", fontsize=12)
        return fig
    # Each cell is an image axes above a caption axes, so captions never run into the next row.
    grid = fig.subplots(2 * rows, cols, gridspec_kw={"height_ratios": [image_h, caption_h] * rows}, squeeze=False)
    for ax in grid.ravel():
        ax.axis("off")
    for k, (row, image) in enumerate(shown):
        image_ax, caption_ax = grid[2 * (k // cols), k % cols], grid[2 * (k // cols) + 1, k % cols]
        image_ax.imshow(image)
        image_ax.set_anchor("SW")  # left-aligned with its caption
        true_name = names.get(row["true_region"], row["true_region"])
        mark, color = ("✓", CORRECT_COLOR) if row["correct"] else ("✗", WRONG_COLOR)
        image_ax.set_title(f"{mark} true: {true_name}", fontsize=10, color=color, fontweight="bold", loc="left")
        for rank, (rid, prob) in enumerate(list(zip(row["top_regions"], row["top_probs"]))[:top_k]):
            hit = rid == row["true_region"]
            caption_ax.text(
                0.0,
                1.0 - rank / top_k,
                f"{rank + 1}. {names.get(rid, rid)}  {float(prob):.0%}" + ("  ✓" if hit else ""),
                transform=caption_ax.transAxes,
                va="top",
                fontsize=9,
                color=CORRECT_COLOR if hit else "#333333",
                fontweight="bold" if hit else "normal",
            )
    fig.suptitle(f"Example test images with their top-{top_k} predictions (seed {seed})", fontsize=12)
    fig.tight_layout(h_pad=1.2)
    return fig


@_themed("white")
def region_examples(
    manifest: pd.DataFrame,
    image_root: str | os.PathLike,
    regions: pd.DataFrame,
    per_region: int = 1,
    seed: int = 0,
) -> Figure:
    """``per_region`` seeded example images of every region, titled with its name in its colour.

    Unreadable images are skipped with a warning and replaced by another of the region's;
    a region without readable images gets an empty, labelled cell.
    """
    names, palette = region_names(regions), region_palette(regions)
    shuffled = manifest.sample(frac=1.0, random_state=seed)
    cells = []
    for rid in regions["id"]:
        found = _readable_images(shuffled[shuffled["region_id"] == rid], image_root, per_region)
        cells += [(rid, row, image) for row, image in found] + [(rid, None, None)] * (per_region - len(found))
    cols = 5 if per_region == 1 else per_region
    rows = math.ceil(len(cells) / cols)
    fig = new_figure((2.7 * cols, 2.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, (rid, row, image) in zip(axes, cells):
        if image is None:
            ax.text(0.5, 0.5, "no readable image", ha="center", va="center", fontsize=9, color="#777777")
        else:
            ax.imshow(image)
        # A frame in the region's colour (light tab20 shades are unreadable as text colours).
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set(edgecolor=palette[rid], linewidth=4)
        heading = row.get("heading") if row is not None else None
        suffix = f" · {heading:.0f}°" if heading is not None and pd.notna(heading) else ""
        ax.set_title(f"{names[rid]}{suffix}", fontsize=9, color="#222222")
    fig.suptitle(f"Example images per region (seed {seed})", fontsize=12)
    fig.tight_layout(h_pad=1.5)
    return fig


def _readable_images(rows: pd.DataFrame, image_root: str | os.PathLike, limit: int) -> list[tuple[pd.Series, object]]:
    """The first ``limit`` rows whose image opens, as (row, thumbnail); failures warn with the file and reason."""
    from lageo_utils.images import ImageReadError, open_rgb  # imported here: it loads torch

    found = []
    for _, row in rows.iterrows():
        if len(found) == limit:
            break
        try:
            image = open_rgb(Path(image_root) / row["image_path"])
        except ImageReadError as exc:
            warnings.warn(f"skipped unreadable image {exc.path}: {exc.reason}", stacklevel=3)
            continue
        image.thumbnail((384, 384))
        found.append((row, image))
    return found


METHOD_COLORS = {"centroid": "#8c8c8c", "expected": "#937860", "retrieval": "#4c72b0",
                 "region_retrieval": "#55a868", "geocell": "#dd8452", "geoclip": "#8172b3", "geoclip_finetuned": "#da8bc3"}
MODEL_LINESTYLES = ("--", "-")  # the first model dashed (zero-shot), the second solid (fine-tuned)


@_themed()
def risk_coverage_figure(curves: Mapping[str, Mapping[str, Mapping]], model_labels: Mapping[str, str] | None = None,
                         threshold_km: str = "1") -> Figure:
    """Risk-coverage curves: ACC@``threshold_km`` and median error of the most confident answers as coverage grows.

    ``curves`` is ``metrics["risk_coverage"]`` ({model: {method: curve}}, see
    ``coordinate_metrics.risk_coverage``); colour names the method, line style the model; the
    legend gives each curve's AURC (area under the risk curve, risk = 1 - ACC; lower is better).
    """
    fig = new_figure((12.0, 5.0))
    acc_ax, err_ax = fig.subplots(1, 2)
    labels = dict(model_labels or {})
    for style, (model, methods) in zip(MODEL_LINESTYLES * len(curves), curves.items()):
        for method, curve in methods.items():
            if threshold_km not in curve["acc_at_km"]:
                raise ValueError(f"risk-coverage curve {model}/{method} has no ACC@{threshold_km} km "
                                 f"(it has {sorted(curve['acc_at_km'])})")
            color = METHOD_COLORS.get(method, BAR_COLOR)
            label = f"{labels.get(model, model)} · {method} (AURC {curve['aurc'][threshold_km]:.3f})"
            acc_ax.plot(curve["coverage"], curve["acc_at_km"][threshold_km], style, color=color, label=label)
            err_ax.plot(curve["coverage"], curve["median_error_km"], style, color=color, label=label)
    acc_ax.set(xlabel="coverage (share of answers kept, most confident first)", ylabel=f"ACC@{threshold_km} km",
               xlim=(0, 1.02), ylim=(0, 1.02), title=f"Accuracy within {threshold_km} km as coverage grows")
    err_ax.set(xlabel="coverage (share of answers kept, most confident first)", ylabel="median error (km)",
               xlim=(0, 1.02), title="Median error as coverage grows")
    err_ax.set_ylim(bottom=0)
    handles, names = acc_ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * math.ceil(len(names) / 2), 1, 1))
    return fig


@_themed("white")
def neighbour_figure(answers: pd.DataFrame, gallery_rows: pd.DataFrame, image_root: str | os.PathLike, n: int = 4,
                     neighbours: int = 3, seed: int = 0) -> Figure:
    """For a seeded sample of test images, the query beside its nearest gallery images.

    ``answers``: per-image answers of one method with their nearest gallery images (``image_path``,
    ``latitude``, ``longitude``, ``error_km``, ``nearest`` as gallery image paths,
    ``nearest_similarities``; see ``geolocate.answer_all``); ``gallery_rows``: the gallery's
    manifest rows (``image_path``, ``latitude``, ``longitude``). Each neighbour is captioned with
    its cosine similarity and its distance from the query's true point.
    """
    from lageo_utils.geo import haversine_km
    from lageo_utils.images import ImageReadError, open_rgb

    missing = [c for c in ("nearest", "nearest_similarities") if c not in answers.columns]
    if missing:
        raise ValueError(f"neighbour_figure needs answers with their nearest gallery images; they lack {missing}")
    where = gallery_rows.set_index(gallery_rows["image_path"].astype(str))[["latitude", "longitude"]]
    shown = _readable_images(answers.sample(frac=1.0, random_state=seed), image_root, n)
    fig = new_figure((2.9 * (neighbours + 1), 3.3 * max(1, len(shown)) + 0.4))
    if not shown:
        fig.text(0.5, 0.5, "No readable images to show", ha="center", va="center", fontsize=12)
        return fig
    grid = fig.subplots(len(shown), neighbours + 1, squeeze=False)
    for ax in grid.ravel():
        ax.axis("off")
    for r, (row, image) in enumerate(shown):
        grid[r, 0].imshow(image)
        grid[r, 0].set_title(f"query ({row['method']} answer {row['error_km']:.2f} km off)", fontsize=9,
                             fontweight="bold")
        for c, (path, sim) in enumerate(list(zip(row["nearest"], row["nearest_similarities"]))[:neighbours]):
            lat, lon = where.loc[str(path)]
            km = float(haversine_km(row["latitude"], row["longitude"], lat, lon))
            try:
                thumb = open_rgb(Path(image_root) / str(path))
            except ImageReadError as exc:
                grid[r, c + 1].text(0.5, 0.5, f"unreadable:\n{exc.reason}", ha="center", va="center", fontsize=8)
                continue
            thumb.thumbnail((384, 384))
            grid[r, c + 1].imshow(thumb)
            grid[r, c + 1].set_title(f"#{c + 1}: similarity {float(sim):.3f}\n{km:.2f} km from the query",
                                     fontsize=9, color=CORRECT_COLOR if km <= 1 else "#333333")
    fig.suptitle(f"Test images and their {neighbours} nearest training images (seed {seed})", fontsize=12)
    fig.tight_layout()
    return fig


def comparison_table(metrics: Mapping[str, Mapping]) -> pd.DataFrame:
    """The headline metrics of each model as a long table: model, metric, value, ci_low, ci_high.

    Confidence intervals come from ``M["ci"]``, laid out like M (``ci["accuracy"] = [lo, hi]``,
    ``ci["acc_at_km"]["5"] = [lo, hi]``); missing ones are NaN.
    """
    rows = []
    for model, m in metrics.items():
        for label, keys in COMPARISON_METRICS:
            lo, hi = _lookup(m.get("ci") or {}, keys) or (None, None)
            value = _lookup(m, keys)
            if value is None:
                raise ValueError(f"metrics for {model!r} have no {'.'.join(keys)!r}")
            rows.append(
                {
                    "model": model,
                    "metric": label,
                    "value": float(value),
                    "ci_low": np.nan if lo is None else float(lo),
                    "ci_high": np.nan if hi is None else float(hi),
                }
            )
    return pd.DataFrame(rows)


@_themed()
def comparison_bar(metrics: Mapping[str, Mapping]) -> Figure:
    """Accuracy, F1 and ACC@km side by side for each model (e.g. zero-shot vs fine-tuned), with CIs."""
    table = comparison_table(metrics)
    models = list(metrics)
    fig = new_figure((11.0, 4.6))
    ax = fig.add_subplot()
    sns.barplot(
        table,
        x="metric",
        y="value",
        hue="model",
        hue_order=models,
        palette=list(MODEL_COLORS[: len(models)]) if len(models) <= len(MODEL_COLORS) else None,
        ax=ax,
    )
    for model, container in zip(models, ax.containers):
        part = table[table["model"] == model]
        centres = [bar.get_x() + bar.get_width() / 2 for bar in container]
        has_ci = part["ci_low"].notna().to_numpy()
        if has_ci.any():
            ax.errorbar(
                np.asarray(centres)[has_ci],
                part["value"].to_numpy()[has_ci],
                # A percentile bootstrap interval may exclude the point estimate (skewed
                # statistics, few clusters): draw the part on the estimate's side only.
                yerr=[
                    (part["value"] - part["ci_low"]).clip(lower=0).to_numpy()[has_ci],
                    (part["ci_high"] - part["value"]).clip(lower=0).to_numpy()[has_ci],
                ],
                fmt="none",
                ecolor="#222222",
                elinewidth=1,
                capsize=3,
            )
        for x, value, high in zip(centres, part["value"], part["ci_high"]):
            top = high if np.isfinite(high) else value
            ax.text(x, top + 0.015, f"{value:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("")
    ax.set_ylabel("score")
    has_any_ci = table["ci_low"].notna().any()
    ax.set_title(
        "Model comparison on the test split" + (" (bars: 95% bootstrap CI)" if has_any_ci else ""), fontsize=12
    )
    ax.legend(title="", loc="upper left", ncols=len(models), fontsize=9)
    fig.tight_layout()
    return fig


@_themed()
def per_region_bars(metrics: Mapping[str, Mapping], regions: pd.DataFrame | None = None) -> Figure:
    """Per-region F1 of each model as grouped horizontal bars, labelled by region name and support."""
    names = region_names(regions) if regions is not None else {}
    order = (
        list(regions["id"]) if regions is not None else sorted({r for m in metrics.values() for r in m["per_region"]})
    )
    rows = []
    for model, m in metrics.items():
        for rid in order:
            stats = m["per_region"].get(rid)
            if stats is not None:
                rows.append({"model": model, "region": rid, "f1": float(stats["f1"]), "support": int(stats["support"])})
    table = pd.DataFrame(rows, columns=["model", "region", "f1", "support"])
    support = table.groupby("region")["support"].max()
    labels = {rid: f"{names.get(rid, rid)} (n={support.get(rid, 0)})" for rid in order}
    table["label"] = pd.Categorical(table["region"].map(labels), categories=[labels[r] for r in order])
    models = list(metrics)
    fig = new_figure((8.5, 0.42 * len(order) * max(1, len(models)) / 2 + 2.0))
    ax = fig.add_subplot()
    sns.barplot(
        table,
        x="f1",
        y="label",
        hue="model",
        hue_order=models,
        orient="h",
        palette=list(MODEL_COLORS[: len(models)]) if len(models) <= len(MODEL_COLORS) else None,
        ax=ax,
    )
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 score")
    ax.set_ylabel("")
    ax.set_title("F1 per region (test split)", fontsize=12)
    ax.legend(title="", loc="lower right", fontsize=9)
    fig.tight_layout()
    return fig


@_themed()
def split_counts_figure(manifest_with_split: pd.DataFrame, regions: pd.DataFrame) -> Figure:
    """Images per region, stacked by split, with each region's total."""
    missing = [c for c in ("region_id", "split") if c not in manifest_with_split.columns]
    if missing:
        raise ValueError(f"manifest is missing column(s) {missing}; it has {list(manifest_with_split.columns)}")
    if manifest_with_split.empty:
        raise ValueError("manifest has no images to count")
    names = region_names(regions)
    order = [names[r] for r in regions["id"]]
    order += sorted({names.get(r, r) for r in manifest_with_split["region_id"]} - set(order))
    data = pd.DataFrame(
        {
            "region": manifest_with_split["region_id"].map(lambda r: names.get(r, r)),
            "split": manifest_with_split["split"].astype(str),
        }
    )
    splits = [s for s in SPLIT_COLORS if s in set(data["split"])] + sorted(set(data["split"]) - set(SPLIT_COLORS))
    counts = pd.crosstab(data["region"], data["split"]).reindex(index=order, columns=splits, fill_value=0)
    stacked = counts.cumsum(axis=1)
    fig = new_figure((9.0, 0.38 * len(order) + 1.8))
    ax = fig.add_subplot()
    # Stacked bars the seaborn way: each split's running total drawn over the next one's.
    for split in reversed(splits):
        sns.barplot(
            x=stacked[split].to_numpy(),
            y=order,
            order=order,
            orient="h",
            color=SPLIT_COLORS.get(split, UNKNOWN_COLOR),
            label=split,
            width=0.75,
            linewidth=0,
            ax=ax,
        )
    totals = counts.sum(axis=1)
    for i, total in enumerate(totals):
        ax.text(total, i, f" {total:,}", va="center", fontsize=8, color="#333333")
    ax.set_xlim(0, max(1, totals.max()) * 1.12)
    ax.set_xlabel("images")
    ax.set_ylabel("")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], title="split", loc="lower right", fontsize=9)
    split_totals = ", ".join(f"{s} {counts[s].sum():,}" for s in splits)
    ax.set_title(f"Images per region and split ({split_totals})", fontsize=12)
    fig.tight_layout()
    return fig


@_themed("white")
def heading_figure(manifest: pd.DataFrame, n_bins: int = 16) -> Figure:
    """Camera headings as a compass rose (north up, clockwise), one bar per direction sector."""
    if "heading" not in manifest.columns:
        raise ValueError(f"manifest has no 'heading' column; it has {list(manifest.columns)}")
    headings = pd.to_numeric(manifest["heading"], errors="coerce").dropna().to_numpy() % 360
    width = 360 / n_bins
    # Sectors centred on north, east, ...: shift by half a sector before binning.
    sector = np.floor(((headings + width / 2) % 360) / width).astype(int)
    counts = np.bincount(sector, minlength=n_bins)
    fig = new_figure((5.6, 5.6))
    ax = fig.add_subplot(projection="polar")
    ax.set_theta_zero_location("N")
    ax.set_theta_direction(-1)
    ax.bar(
        np.radians(np.arange(n_bins) * width),
        counts,
        width=np.radians(width) * 0.9,
        color=BAR_COLOR,
        edgecolor="white",
        alpha=0.9,
    )
    ax.set_xticks(np.radians(np.arange(0, 360, 45)), ["N", "NE", "E", "SE", "S", "SW", "W", "NW"])
    ax.tick_params(axis="y", labelsize=8)
    unknown = len(manifest) - len(headings)
    note = f"; {unknown:,} without heading" if unknown else ""
    ax.set_title(f"Camera headings ({len(headings):,} images{note})", fontsize=12, pad=18)
    fig.tight_layout()
    return fig


def _lookup(mapping: Mapping, keys: Sequence[str]):
    value = mapping
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


@_themed()
def trained_untrained_figure(breakdown: Mapping[str, Mapping]) -> Figure:
    """Each model's accuracy on the regions fine-tuning saw and on the others (95% bootstrap intervals), and the
    share of untrained-region images pulled into a trained region."""
    models = [m for m, parts in breakdown.items() if parts.get("trained") or parts.get("untrained")]
    fig = new_figure((max(7.0, 1.6 * len(models) + 3), 4.6))
    ax = fig.add_subplot()
    x = np.arange(len(models))
    width = 0.27
    series = (("trained regions", "trained", "accuracy", MODEL_COLORS[1]),
              ("untrained regions", "untrained", "accuracy", MODEL_COLORS[2]),
              ("untrained images pulled into a trained region", "untrained", "pulled_into_trained", MODEL_COLORS[0]))
    for offset, (label, part, key, colour) in zip((-width, 0.0, width), series):
        values, lows, highs = [], [], []
        for model in models:
            entry = breakdown[model].get(part) or {}
            value = entry.get(key, np.nan)
            low, high = (entry.get("ci", {}).get(key) or [np.nan, np.nan])
            values.append(value)
            lows.append(max(0.0, value - low) if np.isfinite(low) else 0.0)
            highs.append(max(0.0, high - value) if np.isfinite(high) else 0.0)
        ax.bar(x + offset, values, width, label=label, color=colour)
        ax.errorbar(x + offset, values, yerr=[lows, highs], fmt="none", ecolor="#222222", elinewidth=1, capsize=3)
    ax.set_xticks(x, models)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of test images")
    ax.set_title("Trained and untrained regions (bars: 95% bootstrap CI over capture points)", fontsize=12)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=3, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
