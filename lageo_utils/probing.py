"""What the model looks at: remove one kind of visual cue, measure how much accuracy falls, test it.

Interventions are deterministic PIL transforms applied to the decoded image before the model's
preprocessing (``INTERVENTIONS``; ``make_intervention(name, **settings)``):

- ``grayscale``: colour removed (ITU-R 601 luma in all three channels);
- ``blur``: fine texture removed, a Gaussian of ``sigma`` pixels at the model's 224-px input scale;
- ``sky_mask``: the top ``fraction`` of the image (sky, roof lines, tree tops) filled with ``fill``;
- ``ground_mask``: the bottom ``fraction`` (road, kerb, pavement, markings) filled with ``fill``;
- ``center_occlude``: the central box (``fraction`` of the width and of the height) filled with ``fill``;
- ``hflip``: mirrored left-right (driving side, reading direction of text);
- ``text_removal``: words found by Tesseract OCR (``pytesseract``) blurred out; needs the ``tesseract``
  program (Debian: ``apt-get install tesseract-ocr``), else it is skipped with that message.

Masks fill with one uniform colour, ``FILL``: CLIP's mean training pixel, which the model's own
normalisation maps to zero, i.e. "no signal". Not the image's own mean colour, which would carry
the removed band's colour back into the image (a blue sky raises the mean's blue).

Intervened images are embedded through the ordinary embedding cache: the preprocessing is
wrapped in ``InterventionPreprocess``, whose ``repr`` (part of the cache key) names the
intervention and its settings, so each intervention has its own cache and a re-run computes
nothing. The analysis functions work on predictions tables (``predict.predictions_from_probs``)
of the original images and of each intervention's images: drops with paired cluster-bootstrap
intervals (``intervention_drops``), per-region drops (``region_drops``, ``region_drop_heatmap``),
a logistic regression of correctness (``intervention_regression``) and the ``probing.json``
document (``probing_json``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
import statsmodels.api as sm
from matplotlib.figure import Figure
from PIL import Image, ImageFilter, ImageOps
from scipy import stats

from lageo_utils.files import atomic_write
from lageo_utils.images import DECODER_SETTINGS, ImageReadError, open_rgb, to_rgb
from lageo_utils.maps import new_figure
from lageo_utils.metrics import _check, _clusters, _paired, _resample, to_json_safe

log = logging.getLogger(__name__)

FILL = (123, 117, 104)  # CLIP's mean training pixel (OPENAI_DATASET_MEAN x 255): zero after CLIP normalisation
SKY_FRACTION = 1 / 3  # top band removed by sky_mask
GROUND_FRACTION = 1 / 3  # bottom band removed by ground_mask
CENTER_FRACTION = 0.5  # share of the width and of the height covered by center_occlude's box
BLUR_SIGMA = 3.0  # pixels at the model's input scale
REFERENCE_SIDE = 224  # the CLIP input side that blur sigmas refer to
TEXT_MIN_CONFIDENCE = 60.0  # Tesseract word confidence (0-100) from which a word counts as text
# Tesseract reads each image twice, in automatic page segmentation (3) and sparse-text mode (11, scattered words);
# a word found by either counts: on street scenes each mode misses text the other finds.
TEXT_OCR_MODES = (3, 11)
TEXT_PAD = 0.25  # each word box is enlarged by this share of its height on every side before blurring
TESSERACT_INSTALL = ("Tesseract OCR is not installed, so text_removal is skipped; install the `tesseract` program "
                     "(Debian/Ubuntu: apt-get install tesseract-ocr; macOS: brew install tesseract)")
ORIGINAL = "none"  # the condition name of the unmodified images in tables and the regression


# -- interventions -------------------------------------------------------------------------------


class Intervention(ABC):
    """A deterministic image transform ``PIL image -> PIL image`` (RGB in, RGB out, same size)."""

    name: str
    description: str

    @abstractmethod
    def __call__(self, image: Image.Image) -> Image.Image: ...

    def settings(self) -> dict:
        """The intervention's parameters (JSON-safe)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "boxes"}


@dataclass(frozen=True)
class Grayscale(Intervention):
    name = "grayscale"
    description = "colour removed (luma in all three channels)"

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.grayscale(to_rgb(image)).convert("RGB")


@dataclass(frozen=True)
class Blur(Intervention):
    """Gaussian blur whose ``sigma`` is in pixels of a ``REFERENCE_SIDE``-pixel short side, so the model sees the same
    blur whatever the image size (the standard deviation applied is ``sigma * short side / 224``)."""

    sigma: float = BLUR_SIGMA
    name = "blur"
    description = "fine texture removed (Gaussian blur)"

    def __post_init__(self):
        if not self.sigma > 0:
            raise ValueError(f"blur: sigma must be > 0, got {self.sigma!r}")

    def __call__(self, image: Image.Image) -> Image.Image:
        image = to_rgb(image)
        return image.filter(ImageFilter.GaussianBlur(self.sigma * min(image.size) / REFERENCE_SIDE))


@dataclass(frozen=True)
class _BandMask(Intervention):
    fraction: float
    fill: tuple[int, int, int] = FILL

    def __post_init__(self):
        if not 0 < self.fraction < 1:
            raise ValueError(f"{self.name}: fraction must be between 0 and 1 (exclusive), got {self.fraction!r}")
        if len(self.fill) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in self.fill):
            raise ValueError(f"{self.name}: fill must be three integers 0-255, got {self.fill!r}")
        object.__setattr__(self, "fill", tuple(self.fill))

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The masked rectangle ``(left, top, right, bottom)`` in pixels."""
        raise NotImplementedError

    def __call__(self, image: Image.Image) -> Image.Image:
        image = to_rgb(image)
        image.paste(self.fill, self.box(*image.size))
        return image


@dataclass(frozen=True)
class SkyMask(_BandMask):
    fraction: float = SKY_FRACTION
    name = "sky_mask"
    description = "top band (sky, roof lines, tree tops) filled with a uniform colour"

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        return 0, 0, width, round(height * self.fraction)


@dataclass(frozen=True)
class GroundMask(_BandMask):
    fraction: float = GROUND_FRACTION
    name = "ground_mask"
    description = "bottom band (road, kerb, pavement) filled with a uniform colour"

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        return 0, height - round(height * self.fraction), width, height


@dataclass(frozen=True)
class CenterOcclude(_BandMask):
    fraction: float = CENTER_FRACTION
    name = "center_occlude"
    description = "central box filled with a uniform colour"

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        w, h = round(width * self.fraction), round(height * self.fraction)
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h


@dataclass(frozen=True)
class HFlip(Intervention):
    name = "hflip"
    description = "mirrored left-right"

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.mirror(to_rgb(image))


@dataclass(frozen=True)
class TextRemoval(Intervention):
    """Words Tesseract reads with at least ``min_confidence`` are blurred out (a Gaussian of half the word's height
    over the word's box enlarged by ``pad`` x its height).

    ``engine`` (the Tesseract version) is part of the settings, hence of the embedding cache key. ``boxes`` maps
    ``pixel_digest(image)`` to word boxes found beforehand (``detect_text``), so the OCR is not run twice; an image
    not in it is read here.
    """

    min_confidence: float = TEXT_MIN_CONFIDENCE
    pad: float = TEXT_PAD
    ocr_modes: tuple[int, ...] = TEXT_OCR_MODES
    engine: str = ""
    boxes: Mapping[str, list] = field(default_factory=dict, repr=False, compare=False, hash=False)
    name = "text_removal"
    description = "text found by Tesseract OCR blurred out"

    def __post_init__(self):
        object.__setattr__(self, "ocr_modes", tuple(int(m) for m in self.ocr_modes))  # a list from YAML: same key
        if not self.engine:
            object.__setattr__(self, "engine", tesseract_version())

    def __call__(self, image: Image.Image) -> Image.Image:
        image = to_rgb(image)
        boxes = self.boxes.get(pixel_digest(image))
        if boxes is None:
            boxes = find_text(image, self.min_confidence, self.ocr_modes)
        return blur_boxes(image, boxes, self.pad)


INTERVENTIONS: dict[str, Callable[..., Intervention]] = {
    cls.name: cls for cls in (Grayscale, Blur, SkyMask, GroundMask, CenterOcclude, HFlip, TextRemoval)
}


class TesseractMissing(RuntimeError):
    """The ``tesseract`` program is not installed (the message says how to install it)."""


def make_intervention(name: str, **settings) -> Intervention:
    """The intervention ``name`` (a key of ``INTERVENTIONS``) with ``settings`` overriding its defaults."""
    if name not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {name!r}; choose from {sorted(INTERVENTIONS)}")
    try:
        return INTERVENTIONS[name](**settings)
    except TypeError as exc:
        raise ValueError(f"{name}: bad settings {settings} ({exc})") from None


def resolve_interventions(names: Sequence[str], settings: Mapping[str, Mapping] | None = None
                          ) -> tuple[list[Intervention], dict[str, str]]:
    """The interventions to run and ``{name: reason}`` for those skipped (text_removal without Tesseract)."""
    chosen, skipped = [], {}
    for name in names:
        try:
            chosen.append(make_intervention(name, **dict((settings or {}).get(name, {}))))
        except TesseractMissing as exc:
            log.warning("%s", exc)
            skipped[name] = str(exc)
    return chosen, skipped


def tesseract_version() -> str:
    """The installed Tesseract's version; ``TesseractMissing`` (saying how to install it) when there is none."""
    import pytesseract

    if shutil.which(pytesseract.pytesseract.tesseract_cmd) is None:
        raise TesseractMissing(TESSERACT_INSTALL)
    try:
        return f"tesseract-{pytesseract.get_tesseract_version()}"
    except pytesseract.TesseractNotFoundError:
        raise TesseractMissing(TESSERACT_INSTALL) from None


def tesseract_available() -> bool:
    try:
        tesseract_version()
    except TesseractMissing:
        return False
    return True


def find_text(image: Image.Image, min_confidence: float = TEXT_MIN_CONFIDENCE,
              ocr_modes: Sequence[int] = TEXT_OCR_MODES) -> list[list[int]]:
    """Word boxes ``[left, top, width, height]`` Tesseract reads with at least ``min_confidence`` (0-100) in any of
    the page segmentation modes ``ocr_modes`` (without repeats)."""
    import pytesseract

    image = to_rgb(image)
    boxes: list[list[int]] = []
    for mode in ocr_modes:
        data = pytesseract.image_to_data(image, config=f"--psm {int(mode)}", output_type=pytesseract.Output.DICT)
        for i, text in enumerate(data["text"]):
            box = [int(data["left"][i]), int(data["top"][i]), int(data["width"][i]), int(data["height"][i])]
            if float(data["conf"][i]) >= min_confidence and any(ch.isalnum() for ch in str(text)) and box not in boxes:
                boxes.append(box)
    return boxes


def blur_boxes(image: Image.Image, boxes: Sequence[Sequence[int]], pad: float = TEXT_PAD) -> Image.Image:
    """``image`` with every box (enlarged by ``pad`` x its height) blurred by a Gaussian of half the box height."""
    image = to_rgb(image)
    width, height = image.size
    for left, top, w, h in boxes:
        margin = round(pad * h)
        area = (max(0, left - margin), max(0, top - margin), min(width, left + w + margin), min(height, top + h + margin))
        if area[2] > area[0] and area[3] > area[1]:
            image.paste(image.crop(area).filter(ImageFilter.GaussianBlur(max(1.0, h / 2))), area[:2])
    return image


def pixel_digest(image: Image.Image) -> str:
    """SHA-256 of an image's size and RGB pixels (how ``TextRemoval`` finds the boxes detected beforehand)."""
    rgb = to_rgb(image)
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


def detect_text(paths: Sequence[str], root: str | os.PathLike | None = None, *,
                min_confidence: float = TEXT_MIN_CONFIDENCE, ocr_modes: Sequence[int] = TEXT_OCR_MODES,
                cache_dir: str | os.PathLike | None = None, workers: int | None = None) -> pd.DataFrame:
    """Run Tesseract over image files: ``image_path, pixel_digest, n_words, text_found, boxes`` per readable image.

    Results are kept in ``cache_dir/ocr/`` by file content (and the Tesseract version, the decoder,
    ``min_confidence`` and ``ocr_modes``), so a re-run reads no text again. Threads suffice: each OCR is a separate process.
    """
    engine = tesseract_version()
    key = hashlib.sha256(json.dumps([engine, DECODER_SETTINGS, min_confidence, list(ocr_modes)]).encode()).hexdigest()[:16]
    cache_file = Path(cache_dir) / "ocr" / f"{key}.json" if cache_dir else None
    known = json.loads(cache_file.read_text()) if cache_file and cache_file.exists() else {}
    files = [Path(root) / p if root is not None else Path(p) for p in paths]

    def read(path: Path) -> dict | None:
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return None
        if digest in known:
            return {"file": digest, **known[digest]}
        try:
            image = open_rgb(path)
        except ImageReadError:
            return None
        return {"file": digest, "pixels": pixel_digest(image), "boxes": find_text(image, min_confidence, ocr_modes)}

    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        found = list(pool.map(read, files))
    rows = [(str(p), f["pixels"], len(f["boxes"]), bool(f["boxes"]), f["boxes"])
            for p, f in zip(paths, found) if f is not None]
    if cache_file:
        new = {f["file"]: {"pixels": f["pixels"], "boxes": f["boxes"]} for f in found if f is not None}
        if new.keys() - known.keys():
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_file, lambda tmp: tmp.write_text(json.dumps({**known, **new})))
    return pd.DataFrame(rows, columns=["image_path", "pixel_digest", "n_words", "text_found", "boxes"])


# -- embedding and predicting intervened images ---------------------------------------------------


class InterventionPreprocess:
    """``preprocess(intervention(image))``; its ``repr`` names both, so the embedding cache keys it apart."""

    def __init__(self, intervention: Intervention, preprocess: Callable):
        self.intervention = intervention
        self.preprocess = preprocess

    def __call__(self, image: Image.Image):
        return self.preprocess(self.intervention(image))

    def __repr__(self) -> str:
        return f"Intervention({self.intervention!r}) then {self.preprocess!r}"


def predict_intervened(predictor, manifest: pd.DataFrame, image_root, intervention: Intervention, *,
                       cache_dir=None, batch_size: int = 64, top_k: int = 5) -> pd.DataFrame:
    """The predictions table of ``manifest``'s images after ``intervention``, through the embedding cache.

    For ``text_removal`` the text is found first (``detect_text``, cached beside the embeddings) and the
    table's ``attrs["text_found"]`` holds the share of images with text and the count read.
    """
    from lageo_utils.predict import predict_manifest  # predict imports the model stack; keep it out of import time

    text = None
    if isinstance(intervention, TextRemoval):
        text = detect_text(manifest["image_path"].astype(str).tolist(), image_root,
                           min_confidence=intervention.min_confidence, ocr_modes=intervention.ocr_modes,
                           cache_dir=cache_dir)
        intervention = replace(intervention, boxes=dict(zip(text["pixel_digest"], text["boxes"])))
    intervened = copy.copy(predictor)
    intervened.preprocess = InterventionPreprocess(intervention, predictor.preprocess)
    table = predict_manifest(intervened, manifest, image_root, batch_size=batch_size, top_k=top_k,
                             cache_dir=cache_dir)
    table.attrs["intervention"] = {"name": intervention.name, **intervention.settings()}
    if text is not None:
        table.attrs["text_found"] = {"share": float(text["text_found"].mean()) if len(text) else None,
                                     "n_images": len(text)}
    return table


# -- analysis -------------------------------------------------------------------------------------


def _correct(predictions: pd.DataFrame) -> np.ndarray:
    return (predictions["true_region"] == predictions["pred_region"]).to_numpy(dtype=float)


def _within_1km(predictions: pd.DataFrame) -> np.ndarray:
    return (predictions["error_km"].to_numpy(dtype=float) <= 1.0).astype(float)


def intervention_drops(original: pd.DataFrame, intervened: Mapping[str, pd.DataFrame], *, n_boot: int = 1000,
                       seed: int = 0, ci: float = 0.95, group: str | None = "location_id") -> pd.DataFrame:
    """Accuracy and ACC@1 km per intervention and their drop from the original images (original minus intervened:
    positive means the cue mattered), with paired percentile bootstrap intervals over capture points.

    Each table is paired with ``original`` on ``image_path`` (the same images); every intervention is
    resampled with the same seed. Columns: ``intervention, n_images, accuracy_original, accuracy,
    accuracy_drop, accuracy_drop_lo, accuracy_drop_hi`` and the same for ``acc_1km``, then ``resampled``.
    """
    _check(original)
    rows = []
    tail = (1 - ci) / 2 * 100
    for name, table in intervened.items():
        _check(table)
        base, other = _paired(original, table)
        clusters = _clusters(base, group)
        row: dict = {"intervention": name, "n_images": len(base)}
        values = {m: (fn(base), fn(other)) for m, fn in (("accuracy", _correct), ("acc_1km", _within_1km))}
        boots = {m: [] for m in values}
        for weights in _resample(clusters, n_boot, seed):
            for m, (a, b) in values.items():
                boots[m].append(np.sum(weights * (a - b)) / np.sum(weights))
        for m, (a, b) in values.items():
            row.update({f"{m}_original": a.mean(), m: b.mean(), f"{m}_drop": a.mean() - b.mean(),
                        f"{m}_drop_lo": np.percentile(boots[m], tail),
                        f"{m}_drop_hi": np.percentile(boots[m], 100 - tail)})
        row["resampled"] = group if group in base.columns else "image"
        rows.append(row)
    return pd.DataFrame(rows)


def region_drops(original: pd.DataFrame, intervened: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Accuracy per intervention and true region, and its drop from the original images (original minus
    intervened). Columns: ``intervention, region, n_images, accuracy_original, accuracy, drop``."""
    _check(original)
    frames = []
    for name, table in intervened.items():
        _check(table)
        base, other = _paired(original, table)
        grouped = pd.DataFrame({"region": base["true_region"].astype(str), "a": _correct(base),
                                "b": _correct(other)}).groupby("region", sort=True)
        part = grouped.agg(n_images=("a", "size"), accuracy_original=("a", "mean"), accuracy=("b", "mean"))
        part = part.reset_index()
        part.insert(0, "intervention", name)
        part["drop"] = part["accuracy_original"] - part["accuracy"]
        frames.append(part)
    return pd.concat(frames, ignore_index=True)


def region_drop_heatmap(drops: pd.DataFrame, regions: pd.DataFrame | None = None,
                        title: str = "Accuracy drop per region") -> Figure:
    """Heatmap of ``region_drops``: interventions x regions (display names when ``regions`` is given), in
    accuracy points; red is a loss, blue a gain, centred at zero."""
    table = drops.pivot(index="intervention", columns="region", values="drop")
    table = table.reindex(index=list(dict.fromkeys(drops["intervention"])))
    if regions is not None:
        names = dict(zip(regions["id"].astype(str), regions["name"].astype(str)))
        table = table.rename(columns=names)
    points = table * 100
    limit = max(1.0, float(np.nanmax(np.abs(points.to_numpy()), initial=0.0)))  # symmetric colour scale
    fig = new_figure((max(6.0, 0.6 * points.shape[1] + 3), max(3.0, 0.45 * points.shape[0] + 1.8)))
    ax = fig.add_subplot()
    sns.heatmap(points, annot=True, fmt=".0f", cmap="RdBu_r", center=0, vmin=-limit, vmax=limit, linewidths=0.5,
                linecolor="white", cbar_kws={"label": "accuracy drop (points)", "shrink": 0.8},
                annot_kws={"fontsize": 8}, ax=ax)
    ax.set_xlabel("True region")
    ax.set_ylabel("Intervention")
    ax.set_xticks(np.arange(points.shape[1]) + 0.5, list(points.columns), rotation=40, ha="right",
                  rotation_mode="anchor")
    ax.set_title(title, fontsize=12)
    fig.tight_layout()
    return fig


def intervention_regression(original: pd.DataFrame, intervened: Mapping[str, pd.DataFrame], *, ci: float = 0.95,
                            group: str | None = "location_id") -> dict:
    """Logistic regression of correctness on intervention x region (statsmodels GLM, binomial, logit link).

    The rows are every image under every condition (``ORIGINAL`` and each intervention). Returns:

    - ``effects``: per intervention, the log-odds ratio of a correct answer against the original images, its
      interval, odds ratio and p-value, from the model ``intervention + region`` (a common effect across
      regions). Standard errors are cluster-robust by capture point (``group``): all the headings of one
      capture point, under every condition, show one place, so their outcomes are correlated, while
      capture points are the independent sampling units (the bootstrap resamples them too).
    - ``lr_tests``: per intervention, the likelihood-ratio test of the model ``intervention x region`` against
      the same model without that intervention's terms (its main effect and its region interactions:
      ``df`` = number of regions). The likelihood treats rows as independent, so with many headings per
      point it overstates the evidence; the effects' ``p_value`` (cluster-robust Wald, 1 df) is the cautious
      companion. No cluster-robust Wald test is given for the interaction model: its cells answered all
      right or all wrong (``separated_cells``, common on small validation sets) have no finite estimate,
      and a Wald test on them is meaningless, while the likelihood (hence the LR test) stays well defined.
    - ``interaction``: the likelihood-ratio test of ``intervention x region`` against ``intervention + region``
      (do the effects differ between regions?).
    - ``dropped_regions``: regions answered all right or all wrong under every condition (no information,
      and no finite estimate), left out; ``separated_cells``: ``[condition, region]`` pairs answered all
      right or all wrong; ``warnings``: what statsmodels warned while fitting.
    """
    data = _stacked(original, intervened)
    constant = data.groupby("region")["correct"].agg(lambda s: s.nunique() == 1)
    dropped = sorted(constant[constant].index)
    data = data[~data["region"].isin(dropped)].reset_index(drop=True)
    names = list(intervened)
    if data.empty or data["correct"].nunique() < 2:
        raise ValueError("every image is answered the same (all right or all wrong) under every condition: "
                         "there is nothing to regress")
    groups = _clusters(data, group)
    regions = sorted(data["region"].unique())
    conditions = pd.get_dummies(data["condition"]).reindex(columns=names, fill_value=False).astype(float)
    region_dummies = pd.get_dummies(data["region"]).reindex(columns=regions[1:], fill_value=False).astype(float)
    interaction = {name: region_dummies.mul(conditions[name], axis=0).add_prefix(f"{name}:") for name in names}
    base = pd.concat([pd.Series(1.0, index=data.index, name="const"), region_dummies], axis=1)
    y = data["correct"].to_numpy(dtype=float)
    caught: list[str] = []

    def fit(columns: pd.DataFrame, robust: bool = False):
        model = sm.GLM(y, columns, family=sm.families.Binomial())
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            result = model.fit(cov_type="cluster", cov_kwds={"groups": groups}) if robust else model.fit()
        caught.extend(str(w.message) for w in seen)
        return result

    main = fit(pd.concat([base, conditions], axis=1), robust=True)
    z = stats.norm.ppf(0.5 + ci / 2)
    effects = pd.DataFrame({
        "intervention": names,
        "log_odds_ratio": [main.params[n] for n in names],
        "se": [main.bse[n] for n in names],
    })
    effects["ci_lo"] = effects["log_odds_ratio"] - z * effects["se"]
    effects["ci_hi"] = effects["log_odds_ratio"] + z * effects["se"]
    effects["odds_ratio"] = np.exp(effects["log_odds_ratio"])
    effects["p_value"] = [main.pvalues[n] for n in names]

    full_columns = pd.concat([base, conditions, *interaction.values()], axis=1)
    full = fit(full_columns)
    tests = []
    for name in names:
        terms = [name, *interaction[name].columns]
        statistic = max(0.0, 2 * (full.llf - fit(full_columns.drop(columns=terms)).llf))
        tests.append({"intervention": name, "lr_statistic": statistic, "df": len(terms),
                      "p_value": stats.chi2.sf(statistic, len(terms))})
    interaction_lr = max(0.0, 2 * (full.llf - main.llf))  # the covariance type changes no estimate or likelihood
    cells = data.groupby(["condition", "region"])["correct"].agg(lambda s: s.nunique() == 1)
    interaction_df = sum(len(v.columns) for v in interaction.values())
    return {
        "effects": effects,
        "lr_tests": pd.DataFrame(tests),
        "interaction": {"lr_statistic": interaction_lr, "df": interaction_df,
                        "p_value": stats.chi2.sf(interaction_lr, interaction_df) if interaction_df else None},
        "n_rows": len(data),
        "n_clusters": int(groups.max()) + 1,
        "clustered_by": group if group and group in data.columns else "image",
        "ci_level": ci,
        "dropped_regions": dropped,
        "separated_cells": [list(cell) for cell in cells[cells].index],
        "warnings": sorted(set(caught)),
    }


def _stacked(original: pd.DataFrame, intervened: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per image and condition: ``condition, region, correct`` and ``location_id`` when present."""
    _check(original)
    if ORIGINAL in intervened:
        raise ValueError(f"{ORIGINAL!r} names the original images; it cannot be an intervention")
    frames = []
    for name, table in {ORIGINAL: original, **intervened}.items():
        _check(table)
        _, paired = _paired(original, table)
        frame = pd.DataFrame({"condition": name, "region": paired["true_region"].astype(str),
                              "correct": _correct(paired)})
        if "location_id" in original.columns:
            frame["location_id"] = original["location_id"].to_numpy()
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def probe_model(original: pd.DataFrame, intervened: Mapping[str, pd.DataFrame], *, n_boot: int = 1000,
                seed: int = 0, ci: float = 0.95, group: str | None = "location_id") -> dict:
    """Everything ``probing.json`` holds for one model: drops, per-region drops and the regression (as tables)."""
    return {
        "drops": intervention_drops(original, intervened, n_boot=n_boot, seed=seed, ci=ci, group=group),
        "per_region": region_drops(original, intervened),
        "regression": intervention_regression(original, intervened, ci=ci, group=group),
    }


def probing_json(models: Mapping[str, Mapping], interventions: Sequence[Intervention], *,
                 skipped: Mapping[str, str] | None = None, text_found: Mapping | None = None, split: str = "val",
                 n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict:
    """The ``probing.json`` document (JSON-safe: NaN and infinities become null).

    ``models`` maps a model name (``zeroshot``, a strategy, ...) to ``probe_model``'s result. Keys:

    - ``split``: the images probed (the validation split);
    - ``interventions``: ``{name: {"description", "settings"}}`` of those run;
    - ``skipped``: ``{name: reason}`` of those not run (text_removal without Tesseract);
    - ``text_found``: ``{"share", "n_images"}``, the share of images where Tesseract found text (or null);
    - ``models``: ``{model: {"drops": [rows of intervention_drops], "per_region": [rows of region_drops],
      "regression": {"effects": [rows], "lr_tests": [rows], "interaction", "n_rows", "n_clusters",
      "clustered_by", "ci_level", "dropped_regions", "separated_cells", "warnings"}}}``;
    - ``bootstrap``: ``{"n_boot", "seed", "ci_level"}``.

    Drops are original minus intervened (positive: the cue mattered); effects are log-odds ratios of a
    correct answer, intervened against original (negative: the cue mattered).
    """
    doc = {
        "split": split,
        "interventions": {i.name: {"description": i.description, "settings": i.settings()} for i in interventions},
        "skipped": dict(skipped or {}),
        "text_found": dict(text_found) if text_found else None,
        "models": {name: _records(result) for name, result in models.items()},
        "bootstrap": {"n_boot": n_boot, "seed": seed, "ci_level": ci},
    }
    return to_json_safe(doc)


def _records(value):
    if isinstance(value, pd.DataFrame):
        return value.to_dict(orient="records")
    if isinstance(value, Mapping):
        return {k: _records(v) for k, v in value.items()}
    return value


# -- figures --------------------------------------------------------------------------------------


def intervention_thumbnails(image: Image.Image, interventions: Sequence[Intervention],
                            thumb_size: int = 160) -> Figure:
    """The original image and what each intervention makes of it, side by side (one row)."""
    image = to_rgb(image)
    panels = [("original", image)] + [(i.name, i(image)) for i in interventions]
    fig = new_figure((2.0 * len(panels), 2.3))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, picture) in zip(axes, panels):
        thumb = picture.copy()
        thumb.thumbnail((thumb_size, thumb_size))
        ax.imshow(np.asarray(thumb))
        ax.set_title(title.replace("_", " "), fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    return fig
