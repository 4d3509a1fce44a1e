"""The run parameters, declared once: name, type, allowed values or range, default and help.

Profiles, ``--config`` files, ``-p NAME VALUE``, notebook parameters and ``lageo train`` all go
through ``check_params``/``check_value``, so a typo or an impossible value is refused before
any work starts, with one message naming the parameter and the value (in the manner of
scikit-learn's declared parameter constraints).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping

import numpy as np
import yaml


class ParamError(ValueError):
    """A parameter is unknown, of the wrong type or out of range; the message names it and the value."""


@dataclasses.dataclass(frozen=True)
class Param:
    """One declared parameter. Bounds are inclusive unless ``low_open``; ``optional`` admits None.

    ``kind=list``: a list without repeats, of at least ``min_items`` items, whose items are of ``item_kind``
    and meet ``choices`` / the bounds (which then apply to each item). A list may also be given as one
    text of comma-separated items (``-p geo_methods centroid,retrieval``); where ``min_items`` is 0, None,
    ``none``, an empty text and ``[]`` are the empty list.
    """

    name: str
    kind: type
    default: object
    help: str
    group: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False
    optional: bool = False
    pattern: str | None = None  # a regular expression a text value must match in full
    pattern_text: str | None = None  # that pattern in words
    item_kind: type | None = None  # kind=list: the type of each item
    min_items: int = 1  # kind=list: the fewest items (0: the empty list switches something off)

    def allowed(self) -> str:
        """The allowed values in words (the 'type' column of ``lageo params``)."""
        if self.kind is list:
            empty = " (may be empty: none)" if self.min_items == 0 else ""
            return "list of " + self._scalar().allowed() + empty + (" | none" if self.optional else "")
        if self.choices is not None:
            text = " | ".join(self.choices)
        elif self.pattern_text is not None:
            text = self.pattern_text
        else:
            text = {int: "integer", float: "number", bool: "true | false", str: "text"}[self.kind]
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.low_open else '>='} {_number(self.low)}")
            if self.high is not None:
                bounds.append(f"{'<' if self.high_open else '<='} {_number(self.high)}")
            if bounds:
                text += " " + " and ".join(bounds)
        return text + (" | none" if self.optional else "")

    def check(self, value):
        """The value in its declared type; ``ParamError`` naming the parameter and the value otherwise."""
        if self.kind is list and self.min_items == 0 and (value is None or str(value).strip().lower() in ("none", "null")):
            return []  # a list that may be empty: none switches it off (-p interventions none)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and self.optional):
            if self.optional:
                return None
            raise ParamError(f"{self.name} must be {'a ' if self.kind is list else ''}{self.allowed()}, got None")
        if self.kind is list:
            return self._check_list(value)
        if self.choices is not None:
            if value in self.choices:
                return value
            close = difflib.get_close_matches(str(value), self.choices, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParamError(f"unknown {self.name} {value!r}{hint}; choose one of: {', '.join(self.choices)}")
        checked = {int: _as_int, float: _as_float, bool: _as_bool, str: _as_str}[self.kind](value)
        if checked is None or not self._in_range(checked):
            article = {int: "an ", float: "a ", str: "" if self.pattern_text else "a non-empty "}.get(self.kind, "")
            raise ParamError(f"{self.name} must be {article}{self.allowed()}, got {value!r}")
        return checked

    def _scalar(self) -> Param:
        """The declaration one item of a list parameter must meet."""
        return dataclasses.replace(self, name=f"{self.name} item", kind=self.item_kind or str, item_kind=None,
                                   optional=False, default=None)

    def _check_list(self, value) -> list:
        if isinstance(value, str):  # "a,b" from the command line (items read as YAML, like -p values); "a": one item
            value = [yaml.safe_load(item) for item in value.split(",")] if value.strip() else []
        if not isinstance(value, list | tuple):
            raise ParamError(f"{self.name} must be a {self.allowed()}, got {value!r}")
        if len(value) < self.min_items:
            count = "one item" if self.min_items == 1 else f"{self.min_items} items"
            raise ParamError(f"{self.name} must list at least {count} ({self._scalar().allowed()}), got {list(value)!r}")
        item = self._scalar()
        checked = [item.check(entry) for entry in value]
        repeated = sorted({str(v) for v in checked if checked.count(v) > 1})
        if repeated:
            raise ParamError(f"{self.name} lists {', '.join(repr(r) for r in repeated)} more than once, got {value!r}")
        return checked

    def _in_range(self, value) -> bool:
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value <= self.high and not (self.high_open and value == self.high))


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _as_int(value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        return None
    return int(value)


def _as_float(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:  # YAML 1.1 reads "1e-4" as text; a number written as text is still a number
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _as_bool(value) -> bool | None:
    return bool(value) if isinstance(value, bool | np.bool_) else None


def _as_str(value) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


STRATEGIES = ("zeroshot", "text_scale", "linear_probe", "partial", "lora", "full", "contrastive")
# Mirrors lageo_utils.geolocate (METHODS, SEARCH_BACKENDS) without importing torch and h3 here; a test keeps them equal.
GEO_METHODS = ("centroid", "expected", "retrieval", "region_retrieval", "geocell")
GEO_SEARCH_BACKENDS = ("auto", "exact", "faiss", "faiss-ivf")
# Peer methods answered beside GEO_METHODS (not by default): mirrors lageo_utils.peers.geoclip (METHOD,
# FINETUNED_METHOD), which imports torch; a test keeps them equal.
PEER_METHODS = ("geoclip", "geoclip_finetuned")
PROMPT_VARIANTS = ("name", "seed", "visual", "ensemble")  # mirrors lageo_utils.prompts.PROMPT_VARIANTS (tested)
# Mirrors lageo_utils.probing.INTERVENTIONS (which imports statsmodels and PIL); a test keeps them equal.
INTERVENTIONS = ("grayscale", "blur", "sky_mask", "ground_mask", "center_occlude", "hflip", "text_removal")
ENGINES = ("eager", "onnx")  # mirrors lageo_utils.engines.ENGINES (which imports torch); tested

PARAMS: dict[str, Param] = {p.name: p for p in [
    # data
    Param("profile", str, "demo", "the profile these values started from (a label in params.yaml)", "data"),
    Param("data_source", str, "demo", "demo: the synthetic demo images; manifest: data_dir/manifest", "data",
          choices=("demo", "manifest")),
    Param("data_dir", str, None, "folder with the manifest and the images it names (data_source manifest)", "data",
          optional=True),
    Param("manifest", str, "manifest.csv", "manifest file inside data_dir (canonical or the authors' metadata CSV)",
          "data"),
    Param("dedupe", bool, False, "keep the first of repeated image paths instead of refusing the manifest", "data"),
    Param("regions", str, "regions/la_county_regions.geojson", "region file (GeoJSON or the authors' JSON)", "data"),
    Param("demo_points_per_region", int, 8, "demo: capture points per region (4 headings each)", "data", low=1),
    Param("demo_seed", int, 0, "demo: seed of the synthetic scenes", "data", low=0),
    Param("demo_image_size", int, 128, "demo: image width and height in pixels", "data", low=32, high=1024),
    Param("split_strategy", str, "location", "location: capture points never shared between splits; image: the "
          "authors' image-level split", "data", choices=("location", "image")),
    Param("split_seed", int, 42, "seed of the split and the sampling", "data", low=0),
    Param("buffer_m", float, 0.0, "drop val/test capture points this close (metres) to a training point", "data",
          low=0),
    Param("area_normalize", bool, False, "the authors' area-normalised sampling", "data"),
    # model
    Param("model", str, "ViT-B-32", "open_clip model name, or timm:<name> for an image-only backbone (DINOv2: "
          "timm:vit_base_patch14_dinov2); lageo-tiny, timm:lageo-tiny-dinov2: tiny test models", "model"),
    Param("pretrained", str, "openai", "weights tag (open_clip: openai, ...; timm: lvd142m, default), a local "
          "checkpoint path, or none (random weights)",
          "model", optional=True),
    Param("device", str, "auto", "where models run; auto: CUDA, then Apple MPS, then the CPU", "model",
          pattern=r"auto|cpu|mps|cuda(:\d+)?", pattern_text="auto | cpu | cuda | cuda:N | mps"),
    Param("engine", str, "eager", "what runs the image encoder when embedding: eager (PyTorch) or onnx (ONNX Runtime, "
          "on the CPU, the engines extra; docs/benchmarks.md)", "model",
          choices=ENGINES),
    # training
    Param("strategy", str, "linear_probe", "what fine-tuning trains (see README, Fine-tuning)", "training",
          choices=STRATEGIES),
    Param("epochs", int, 8, "training epochs (the seed trained 8)", "training", low=1),
    Param("lr", float, None, "learning rate; none: the strategy's default", "training", low=0, low_open=True,
          optional=True),
    Param("batch_size", int, 32, "images per batch (training and embedding)", "training", low=1),
    Param("grad_accum_steps", int, 1, "batches per optimizer step", "training", low=1),
    Param("weight_decay", float, 0.1, "AdamW weight decay on encoder matrices", "training", low=0),
    Param("warmup_fraction", float, 0.05, "share of optimizer steps of linear warm-up before the cosine decay",
          "training", low=0, high=1, high_open=True),
    Param("max_grad_norm", float, 1.0, "gradient clipping norm; none: no clipping", "training", low=0, low_open=True,
          optional=True),
    Param("unfreeze_blocks", int, 2, "partial: trained transformer blocks, counted from the last", "training", low=1),
    Param("lora_rank", int, 8, "lora: rank of the adapters", "training", low=1),
    Param("lora_alpha", float, 16.0, "lora: scaling numerator of the adapters (scale = alpha / rank)", "training",
          low=0, low_open=True),
    Param("lora_dropout", float, 0.0, "lora: dropout on the adapters' input", "training", low=0, high=1,
          high_open=True),
    Param("augment", bool, False, "random resized crop and colour jitter on training images", "training"),
    Param("patience", int, None, "early stopping after this many epochs without a better validation accuracy",
          "training", low=1, optional=True),
    Param("num_workers", int, None, "image loader worker processes; none: one per core, at most 4", "training",
          low=0, optional=True),
    Param("embed_batch_size", int, 64, "images per forward pass when computing cached embeddings", "training",
          low=1),
    Param("seed", int, 42, "seed of model initialisation, training and the bootstrap", "training", low=0),
    Param("nproc", int, 1, "training processes, one per GPU: above 1, step 03 trains through torchrun "
          "--nproc_per_node N (DistributedDataParallel; batch_size is the global batch)", "training", low=1),
    # strategies side by side
    Param("strategies", list, None, "strategies trained one after another and compared (the first is the "
          "'finetuned' model); none: just strategy", "strategies", choices=STRATEGIES, item_kind=str, optional=True),
    Param("train_regions", list, None, "region ids training (and model selection) may see; evaluation keeps all "
          "regions; none: all", "strategies", item_kind=str, optional=True),
    Param("wise_alphas", list, (0.0, 0.25, 0.5, 0.75, 1.0), "WiSE-FT weights of the fine-tuned model tried on "
          "validation, for strategies that change encoder weights", "strategies", item_kind=float, low=0, high=1),
    Param("prompt_variants", list, PROMPT_VARIANTS, "zero-shot prompt variants compared on the test split",
          "strategies", choices=PROMPT_VARIANTS, item_kind=str),
    Param("prompt_controls", str, "regions/prompt_controls.json", "visual descriptors by region id (the authors' "
          "format) for the visual and ensemble prompt variants", "strategies"),
    # evaluation
    Param("top_k", int, 5, "regions listed per image", "evaluation", low=1),
    Param("n_boot", int, 1000, "bootstrap resamples (over capture points) for confidence intervals", "evaluation",
          low=10),
    # coordinates
    Param("geo_methods", list, GEO_METHODS, "coordinate answers compared in steps 02-04 (see docs/geolocation.md); "
          "centroid is always answered: it is the reference; geoclip, geoclip_finetuned: the GeoCLIP peer (not by "
          "default; docs/peers.md)", "coordinates", choices=GEO_METHODS + PEER_METHODS, item_kind=str),
    Param("geo_search", str, "auto", "nearest-neighbour search over the training gallery; auto: exact below 50,000 "
          "images, FAISS above", "coordinates", choices=GEO_SEARCH_BACKENDS),
    Param("geocell_resolutions", list, (7, 8), "H3 resolutions tried for geocells (the one chosen on validation "
          "is used)", "coordinates", item_kind=int, low=0, high=15),
    Param("geocell_min_images", int, 10, "geocells with fewer training images merge into their parent",
          "coordinates", low=1),
    # GeoCLIP, a peer method (geo_methods geoclip, geoclip_finetuned; docs/peers.md)
    Param("geoclip_backbone", str, None, "GeoCLIP's image backbone: a Hugging Face model id or a local transformers "
          "folder; none: $LAGEO_GEOCLIP_BACKBONE, else openai/clip-vit-large-patch14", "geoclip", optional=True),
    Param("geoclip_spacing_m", float, 100.0, "metres between the LA GPS gallery's grid points (the region boxes "
          "covered; the training coordinates are added)", "geoclip", low=1),
    Param("geoclip_top_k", int, 5, "GPS gallery coordinates (and probabilities) kept per image, best first",
          "geoclip", low=1),
    Param("geoclip_epochs", int, 10, "geoclip_finetuned: training epochs of the image head and location encoder",
          "geoclip", low=1),
    Param("geoclip_lr", float, 3e-5, "geoclip_finetuned: Adam learning rate (decayed by 0.87 per epoch)", "geoclip",
          low=0, low_open=True),
    Param("geoclip_batch_size", int, 256, "geoclip_finetuned: images per batch (each batch's coordinates are "
          "negatives for the others)", "geoclip", low=1),
    Param("geoclip_queue_size", int, 4096, "geoclip_finetuned: coordinates of earlier batches kept as extra "
          "negatives (GeoCLIP's GPS queue; 0: none)", "geoclip", low=0),
    # probing
    Param("interventions", list, (), "cue-removal probing on the validation split (step 06, in the report); empty: "
          "not run (see README, What the model relies on)", "probing", choices=INTERVENTIONS, item_kind=str, min_items=0),
]}


def unknown_name_message(name: str) -> str:
    """'unknown parameter' with the closest valid names."""
    close = difflib.get_close_matches(name, PARAMS, n=3, cutoff=0.7)  # 0.6 offered 'nproc' for 'epoch'
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown parameter {name!r}{hint} (`lageo params` lists them all)"


def check_value(name: str, value):
    """One parameter's value in its declared type, or ``ParamError``."""
    if name not in PARAMS:
        raise ParamError(unknown_name_message(name))
    return PARAMS[name].check(value)


def check_params(values: Mapping) -> dict:
    """Every value checked (unknown names refused); the result has the declared types."""
    return {name: check_value(name, value) for name, value in values.items()}


def defaults() -> dict:
    """Every parameter at its declared default."""
    return {name: list(p.default) if p.kind is list and p.default is not None else p.default
            for name, p in PARAMS.items()}
