"""GeoCLIP as a peer method: its own encoders answering from an LA GPS gallery, and a fine-tuned variant.

GeoCLIP (Vivanco Cepeda et al., NeurIPS 2023; the ``geoclip`` package, MIT) matches an image
against GPS coordinates: a frozen CLIP ViT-L/14 image backbone (``openai/clip-vit-large-patch14``
from the Hugging Face hub) followed by an MLP image head (768 -> 768 -> 512), and a location
encoder (equal-earth projection, random Fourier features at three scales, MLPs) whose 512-d
outputs are compared with the image's by a scaled cosine similarity. The image head, location
encoder and logit scale weights ship inside the package; only the backbone is downloaded.

- ``geoclip``: the shipped weights; GeoCLIP's worldwide 100K-point gallery is replaced by
  :func:`la_gps_gallery` (a metric grid over the region boxes plus the training coordinates),
  answered as GeoCLIP's own ``predict`` does (softmax over the gallery, top-k coordinates and
  probabilities). :func:`predict_geoclip` returns a :class:`lageo_utils.geolocate.Answers`, so
  the coordinate metrics, intervals and paired comparisons apply unchanged.
- ``geoclip_finetuned``: :func:`finetune_geoclip` trains the image head and location encoder from
  the shipped weights on the LA training split with GeoCLIP's loss (image-to-GPS cross-entropy
  against the batch's coordinates plus a queue of earlier batches' coordinates); the backbone is
  frozen, so its features are computed once and cached by backbone weights and file content.

The backbone's features are cached *before* L2 normalisation: GeoCLIP's head takes the raw
projected CLIP features, so :func:`lageo_utils.embed.embed_paths` (which normalises) is not used;
its :class:`~lageo_utils.embed.EmbeddingCache` and image reading are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pyproj import Transformer
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lageo_utils.checkpoints import CheckpointError, load_checkpoint, save_checkpoint, seed_everything
from lageo_utils.embed import EmbeddingCache, hash_files
from lageo_utils.files import atomic_write
from lageo_utils.geo import haversine_km
from lageo_utils.geolocate import Answers, answers_table, pool_by_location
from lageo_utils.images import DECODER_SETTINGS, ImageDataset, collate_skip_failures, default_num_workers
from lageo_utils.metrics import to_json_safe
from lageo_utils.model import WeightsUnavailableError, autocast, precision_label, resolve_device, weights_identity
from lageo_utils.training.data import frame_hash
from lageo_utils.training.loop import TrainResult, deterministic

log = logging.getLogger(__name__)

METHOD, FINETUNED_METHOD = "geoclip", "geoclip_finetuned"
GEOCLIP_BACKBONE = "openai/clip-vit-large-patch14"  # the backbone GeoCLIP was trained on
BACKBONE_ENV = "LAGEO_GEOCLIP_BACKBONE"  # a local transformers folder of the backbone
IMAGE_FEATURE_DIM = 768  # the width GeoCLIP's image head takes: CLIP ViT-L/14's projection
INSTALL_HINT = "pip install -e '.[peers]'"
DEFAULT_SPACING_M = 100.0
DEFAULT_TOP_K = 5
FEATURE_CACHE_FORMAT = 1
_LOCATION_CHUNK = 8192  # gallery points per location-encoder forward pass
_SIMILARITY_BLOCK = 2**26  # entries of one images x gallery similarity block (256 MiB in float32)
_BACKBONE_FILES = ("config.json", "preprocessor_config.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
BEST, LAST, HISTORY, SUMMARY = "best.pt", "last.pt", "history.csv", "train_summary.json"
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_median_error_km", "lr", "seconds"]

StepHook = Callable[[int, int], None]  # (epoch, batch index) after each training batch


class PeersUnavailableError(ImportError):
    """The optional ``peers`` extra (geoclip, transformers) is not installed."""


def require_geoclip():
    """The ``geoclip`` package, or :class:`PeersUnavailableError` saying how to install it."""
    try:
        import geoclip
        import transformers  # noqa: F401 (geoclip's image side; checked here so the message is the same)
    except ImportError as exc:
        raise PeersUnavailableError(
            f"the GeoCLIP methods ({METHOD}, {FINETUNED_METHOD}) need the optional 'peers' extra "
            f"(geoclip, transformers), which is not installed ({exc}). Install it with: {INSTALL_HINT}"
        ) from exc
    return geoclip


# -- the model ----------------------------------------------------------------------------------


class GeoclipModel(nn.Module):
    """GeoCLIP: a frozen CLIP image backbone, the image head, the location encoder and the logit scale.

    ``backbone`` is a transformers ``CLIPModel``, ``CLIPVisionModelWithProjection`` or
    ``CLIPVisionModel`` whose image features are ``IMAGE_FEATURE_DIM`` wide; ``processor`` its
    ``CLIPImageProcessor``. ``heads`` (a checkpoint's ``image_head``/``location_encoder``/
    ``logit_scale``) replaces the shipped head weights.
    """

    def __init__(self, backbone: nn.Module, processor, backbone_name: str, heads: dict | None = None):
        super().__init__()
        geoclip = require_geoclip()
        width = _feature_width(backbone)
        if width != IMAGE_FEATURE_DIM:
            raise ValueError(f"GeoCLIP's image head takes {IMAGE_FEATURE_DIM}-d image features; the backbone "
                             f"{backbone_name!r} gives {width}-d ones")
        self.backbone = backbone.eval().requires_grad_(False)
        self.processor = processor
        self.backbone_name = backbone_name
        weights = Path(geoclip.__file__).parent / "model" / "weights"
        # The layout of geoclip.ImageEncoder.mlp (that class also builds a ViT-L, so it is not instantiated here);
        # the strict load below checks the two agree.
        with torch.random.fork_rng(devices=[]):  # their random initialisation, overwritten below, leaves no trace
            self.image_head = nn.Sequential(nn.Linear(IMAGE_FEATURE_DIM, 768), nn.ReLU(), nn.Linear(768, 512))
            self.location_encoder = geoclip.LocationEncoder(from_pretrained=False)
        shipped = heads or {
            "image_head": torch.load(weights / "image_encoder_mlp_weights.pth", map_location="cpu", weights_only=True),
            "location_encoder": torch.load(weights / "location_encoder_weights.pth", map_location="cpu",
                                           weights_only=True),
            "logit_scale": torch.load(weights / "logit_scale_weights.pth", map_location="cpu", weights_only=True),
        }
        self.image_head.load_state_dict(shipped["image_head"])
        self.location_encoder.load_state_dict(shipped["location_encoder"])
        self.logit_scale = nn.Parameter(shipped["logit_scale"].detach().clone().float(), requires_grad=False)
        self._backbone_identity: str | None = None

    @property
    def backbone_identity(self) -> str:
        """A content hash of the backbone's weights (the feature cache and checkpoint key)."""
        if self._backbone_identity is None:
            self._backbone_identity = weights_identity(self, "backbone")
        return self._backbone_identity

    def heads_state(self) -> dict:
        """The trainable parts' weights, as a checkpoint stores them."""
        return {"image_head": self.image_head.state_dict(), "location_encoder": self.location_encoder.state_dict(),
                "logit_scale": self.logit_scale.detach().cpu()}

    def backbone_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected CLIP image features (not normalised), as GeoCLIP's image encoder computes them."""
        return _image_features(self.backbone, pixels)

    def image_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised 512-d image embeddings from backbone features."""
        return F.normalize(self.image_head(features), dim=-1)

    def location_embeddings(self, coordinates: torch.Tensor) -> torch.Tensor:
        """L2-normalised 512-d location embeddings of ``(m, 2)`` latitude/longitude rows (degrees)."""
        return F.normalize(self.location_encoder(coordinates), dim=-1)


def _image_features(backbone: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    if hasattr(backbone, "get_image_features"):  # CLIPModel
        out = backbone.get_image_features(pixel_values=pixels)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    out = backbone(pixel_values=pixels)
    embeds = getattr(out, "image_embeds", None)  # CLIPVisionModelWithProjection
    return embeds if embeds is not None else out.pooler_output  # CLIPVisionModel


def _feature_width(backbone: nn.Module) -> int:
    config = backbone.config
    if hasattr(backbone, "get_image_features") or hasattr(backbone, "visual_projection"):
        return int(config.projection_dim)
    return int(getattr(config, "vision_config", config).hidden_size)


def default_processor(backbone: nn.Module):
    """A ``CLIPImageProcessor`` for a backbone built in memory: CLIP's resizing and normalisation at its input size."""
    from transformers import CLIPImageProcessor

    size = int(getattr(backbone.config, "vision_config", backbone.config).image_size)
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def load_geoclip(backbone: str | os.PathLike | nn.Module | None = None, *, processor=None,
                 device: str | torch.device = "auto", cache_dir: str | os.PathLike | None = None) -> GeoclipModel:
    """GeoCLIP with its shipped head and location-encoder weights, in eval mode on ``resolve_device(device)``.

    ``backbone``: ``None`` (``LAGEO_GEOCLIP_BACKBONE`` if set, else ``openai/clip-vit-large-patch14``
    from the Hugging Face cache or hub), a hub id, a local transformers folder, or a built
    ``CLIPModel``/``CLIPVisionModelWithProjection``/``CLIPVisionModel`` (tests use a tiny random
    one; ``processor`` defaults to :func:`default_processor`). Unavailable weights raise
    :class:`WeightsUnavailableError` before anything is loaded.
    """
    require_geoclip()
    target = resolve_device(device)
    if isinstance(backbone, nn.Module):
        model = GeoclipModel(backbone, processor or default_processor(backbone), type(backbone).__name__)
        return model.to(target).eval()
    source = check_geoclip_weights(backbone, cache_dir=cache_dir)
    from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

    local = Path(source).is_dir()
    options = {} if local else {"cache_dir": cache_dir, "local_files_only": _hub_offline()}
    try:
        config = AutoConfig.from_pretrained(source, **options)
        if config.model_type == "clip":  # a whole CLIP checkpoint (GeoCLIP's): its image tower and projection only
            vision_config = config.vision_config
            vision_config.projection_dim = config.projection_dim  # the projection's width is the CLIP config's
        else:
            vision_config = config
        # A whole CLIP checkpoint's text tower is "unexpected" here: transformers' load report (a warning listing
        # every text weight) is silenced, and what matters, image-tower weights missing from the file, is checked.
        with _transformers_verbosity_error():
            vision, info = CLIPVisionModelWithProjection.from_pretrained(source, config=vision_config,
                                                                         output_loading_info=True, **options)
        processor = processor or CLIPImageProcessor.from_pretrained(source, **options)
    except OSError as exc:  # transformers reports missing or unreadable files as OSError
        raise WeightsUnavailableError(_backbone_help(source, f"loading failed ({exc})")) from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise WeightsUnavailableError(_backbone_help(source, f"its checkpoint lacks {len(missing)} weight(s) of the "
                                                             f"image tower (e.g. {missing[0]})"))
    log.info("loaded GeoCLIP with backbone %s on %s", source, target)
    return GeoclipModel(vision, processor, str(source)).to(target).eval()


@contextmanager
def _transformers_verbosity_error():
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def check_geoclip_weights(backbone: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                          timeout_s: float = 10.0) -> str:
    """The backbone source :func:`load_geoclip` would use; fails at once, loading nothing, if its weights are unavailable.

    A local folder must hold ``config.json``, ``preprocessor_config.json`` and the weights; a hub
    id must be in the Hugging Face cache or reachable now (never reachable with ``HF_HUB_OFFLINE``).
    Raises :class:`WeightsUnavailableError` with the two fixes.
    """
    source = str(backbone) if backbone is not None else os.environ.get(BACKBONE_ENV) or GEOCLIP_BACKBONE
    path = Path(source).expanduser()
    if path.is_absolute() or source.startswith(".") or path.exists():
        if not path.is_dir():
            raise WeightsUnavailableError(_backbone_help(source, "the folder does not exist"))
        missing = [f for f in _BACKBONE_FILES if not (path / f).is_file()]
        if not any((path / f).is_file() for f in _WEIGHT_FILES):
            missing.append(" or ".join(_WEIGHT_FILES))
        if missing:
            raise WeightsUnavailableError(_backbone_help(source, f"the folder lacks {', '.join(missing)}"))
        return str(path)
    import huggingface_hub

    def cached(name: str) -> bool:
        return isinstance(huggingface_hub.try_to_load_from_cache(source, name, cache_dir=cache_dir), str)

    if all(cached(f) for f in _BACKBONE_FILES) and any(cached(f) for f in _WEIGHT_FILES):
        return source
    if _hub_offline():
        problem = "it is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    else:
        try:
            huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(source, "config.json"), timeout=timeout_s)
            return source
        except Exception as exc:  # network errors come in many types; any of them means no weights now
            problem = f"it is not in the Hugging Face cache and cannot be downloaded now ({type(exc).__name__})"
    # "models/clip-vit-l" reads as a hub id (owner/name) unless such a folder exists: say where it was looked for
    problem += f"; as a hub id, since no folder {path.resolve()} exists"
    raise WeightsUnavailableError(_backbone_help(source, problem))


def _hub_offline() -> bool:
    import huggingface_hub

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _backbone_help(tried: str, problem: str) -> str:
    return (
        f"GeoCLIP's image backbone ({GEOCLIP_BACKBONE}) is unavailable: tried {tried!r}, {problem}.\n"
        "Fix it in one of two ways:\n"
        "  1. run once with internet access so transformers downloads and caches the backbone "
        "(Hugging Face cache, ~/.cache/huggingface, about 1.7 GB), then work offline;\n"
        f"  2. pass a local transformers folder of {GEOCLIP_BACKBONE} (config.json, preprocessor_config.json, "
        f"model.safetensors) as the backbone, or set {BACKBONE_ENV}=/path/to/folder.\n"
        "GeoCLIP's image head and location encoder ship inside the geoclip package; only the backbone is downloaded."
    )


# -- the LA GPS gallery -------------------------------------------------------------------------


def la_gps_gallery(regions, spacing_m: float = DEFAULT_SPACING_M, train_lat=None, train_lon=None) -> pd.DataFrame:
    """GPS candidates for GeoCLIP in LA: a square grid over the region boxes plus the training coordinates.

    The grid is laid in the regions' UTM zone (``estimate_utm_crs``) at ``spacing_m`` metres,
    anchored at multiples of the spacing so neighbouring boxes share points; a grid point is kept
    when it lies within ``spacing_m / sqrt(2)`` of a box, so every point of every box is within
    that distance of the gallery. Duplicated coordinates are kept once (the grid's copy first).
    Columns: ``latitude``, ``longitude``, ``source`` (``grid`` or ``train``).
    """
    import shapely

    spacing = float(spacing_m)
    if not math.isfinite(spacing) or spacing <= 0:
        raise ValueError(f"the gallery spacing must be a positive number of metres, not {spacing_m!r}")
    crs = regions.estimate_utm_crs()
    reach = spacing / math.sqrt(2)
    xs, ys = [], []
    for polygon in regions.to_crs(crs).geometry:
        west, south, east, north = polygon.bounds
        gx = np.arange(math.floor((west - reach) / spacing), math.ceil((east + reach) / spacing) + 1) * spacing
        gy = np.arange(math.floor((south - reach) / spacing), math.ceil((north + reach) / spacing) + 1) * spacing
        x, y = (a.ravel() for a in np.meshgrid(gx, gy))
        keep = shapely.dwithin(polygon, shapely.points(x, y), reach * (1 + 1e-9))
        xs.append(x[keep])
        ys.append(y[keep])
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(np.concatenate(xs), np.concatenate(ys))
    parts = [pd.DataFrame({"latitude": lat, "longitude": lon, "source": "grid"})]
    if train_lat is not None or train_lon is not None:
        if train_lat is None or train_lon is None or len(train_lat) != len(train_lon):
            raise ValueError("train_lat and train_lon must be given together, with one entry per training image")
        t_lat, t_lon = np.asarray(train_lat, float), np.asarray(train_lon, float)
        bad = np.flatnonzero(~np.isfinite(t_lat) | ~np.isfinite(t_lon) | (np.abs(t_lat) > 90) | (np.abs(t_lon) > 180))
        if len(bad):
            raise ValueError(f"training coordinate row {bad[0]} is invalid ({t_lat[bad[0]]}, {t_lon[bad[0]]})")
        parts.append(pd.DataFrame({"latitude": t_lat, "longitude": t_lon, "source": "train"}))
    gallery = pd.concat(parts, ignore_index=True).drop_duplicates(["latitude", "longitude"]).reset_index(drop=True)
    gallery.attrs.update(spacing_m=spacing, crs=str(crs))
    return gallery


# -- backbone features, cached ------------------------------------------------------------------


@dataclass
class BackboneFeatures:
    """Backbone features of the images that could be read, and a report of those that could not."""

    features: np.ndarray  # (n_ok, IMAGE_FEATURE_DIM) float32, not normalised, in input order
    rows: np.ndarray  # their positions in the input
    failures: pd.DataFrame  # image_path, reason


class _PixelValues:
    """A picklable image transform: the processor's ``pixel_values`` of one PIL image.

    Its ``repr`` is the processor's settings, which the feature cache key includes.
    """

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"{type(self.processor).__name__}({self.processor.to_json_string()})"


def feature_cache(model: GeoclipModel, cache_dir: str | os.PathLike, device: torch.device) -> EmbeddingCache:
    """The cache of this backbone's features: keyed by its weights, preprocessing, decoder and precision."""
    meta = {
        "format": FEATURE_CACHE_FORMAT,
        "model": f"geoclip-backbone/{model.backbone_name}",
        "weights": model.backbone_identity,
        "preprocess": repr(_PixelValues(model.processor)),
        "decoder": DECODER_SETTINGS,
        "precision": precision_label(device),
        "normalised": False,
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return EmbeddingCache(Path(cache_dir) / f"geoclip-{key}", meta)


def backbone_features(model: GeoclipModel, paths: Sequence[str], *, root: str | os.PathLike | None = None,
                      cache_dir: str | os.PathLike | None = None, batch_size: int = 32, num_workers: int | None = None,
                      device: str | torch.device | None = None) -> BackboneFeatures:
    """The frozen backbone's features of image files (relative to ``root``), through the cache in ``cache_dir``.

    Images are read by :func:`lageo_utils.images.open_rgb`; unreadable ones are skipped and listed
    in ``failures``; files with the same content are computed once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = resolve_device(device) if device is not None else model.logit_scale.device
    model.to(device)
    files = [Path(root) / p if root is not None else Path(p) for p in paths]
    digests, failures = hash_files(files)
    cache = feature_cache(model, cache_dir, device) if cache_dir is not None else None
    known = cache.lookup(set(digests.values())) if cache is not None else {}
    todo: dict[str, int] = {}  # digest -> first position with that content
    for pos, digest in digests.items():
        if digest not in known:
            todo.setdefault(digest, pos)
    bad: dict[str, str] = {}
    if todo:
        computed, bad_positions = _compute_features(model, [files[p] for p in todo.values()], batch_size, num_workers,
                                                    device)
        order = list(todo)
        new = {order[i]: vector for i, vector in computed.items()}
        bad = {order[i]: reason for i, reason in bad_positions.items()}
        if cache is not None and new:
            cache.add(list(new), np.stack(list(new.values())))
        known = {**known, **new}
    ok = [pos for pos in range(len(files)) if digests.get(pos) in known]
    failures.update({pos: bad[d] for pos, d in digests.items() if d not in known})
    features = np.stack([known[digests[p]] for p in ok]).astype(np.float32) if ok else np.empty((0, IMAGE_FEATURE_DIM),
                                                                                                  np.float32)
    report = pd.DataFrame([(str(paths[p]), r) for p, r in sorted(failures.items())], columns=["image_path", "reason"])
    if len(report):
        log.warning("%d of %d images could not be read and were skipped", len(report), len(files))
    return BackboneFeatures(features, np.asarray(ok, dtype=np.int64), report)


def _compute_features(model: GeoclipModel, files: list[Path], batch_size: int, num_workers: int | None,
                      device: torch.device) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    workers = min(default_num_workers(num_workers), math.ceil(len(files) / batch_size))
    loader = DataLoader(ImageDataset([str(f) for f in files], _PixelValues(model.processor)), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate_skip_failures, pin_memory=device.type == "cuda")
    vectors, failures = {}, {}
    with torch.inference_mode(), autocast(device), tqdm(total=len(files), unit="img", desc="GeoCLIP backbone") as bar:
        for images, indices, chunk_failures in loader:
            failures.update(chunk_failures)
            bar.update(len(indices) + len(chunk_failures))
            if images is not None:
                features = model.backbone_features(images.to(device, non_blocking=True)).float().cpu().numpy()
                vectors.update(zip(indices.tolist(), features))
    return vectors, failures


# -- answering ----------------------------------------------------------------------------------


@dataclass
class GeoclipPredictions:
    """GeoCLIP's answers for the readable images: ``answers`` (top-1 coordinate, its probability as
    confidence, the top-k gallery rows as ``neighbours`` and their cosine similarities), the top-k
    coordinates and probabilities as GeoCLIP's ``predict`` returns them, and the unreadable images."""

    answers: Answers
    top_lat: np.ndarray  # (n, k)
    top_lon: np.ndarray  # (n, k)
    top_prob: np.ndarray  # (n, k), descending, summing to at most 1 (softmax over the whole gallery)
    rows: np.ndarray  # positions of the answered images in the input
    failures: pd.DataFrame  # image_path, reason


@torch.no_grad()
def gallery_embeddings(model: GeoclipModel, gallery: pd.DataFrame) -> torch.Tensor:
    """The gallery's normalised location embeddings ``(m, 512)``, on the model's device."""
    device = model.logit_scale.device
    coords = _gallery_coordinates(gallery).to(device)
    return torch.cat([model.location_embeddings(chunk) for chunk in coords.split(_LOCATION_CHUNK)])


def _gallery_coordinates(gallery: pd.DataFrame) -> torch.Tensor:
    missing = [c for c in ("latitude", "longitude") if c not in gallery.columns]
    if missing:
        raise ValueError(f"the GPS gallery lacks column(s) {missing}")
    if len(gallery) == 0:
        raise ValueError("the GPS gallery is empty")
    return torch.tensor(gallery[["latitude", "longitude"]].to_numpy(float), dtype=torch.float32)


@torch.no_grad()
def answer_features(model: GeoclipModel, features, gallery: pd.DataFrame, *, top_k: int = DEFAULT_TOP_K,
                    location_ids=None, method: str = METHOD,
                    locations: torch.Tensor | None = None) -> tuple[Answers, np.ndarray, np.ndarray, np.ndarray]:
    """GeoCLIP's ``predict`` on backbone features: ``(answers, top_lat, top_lon, top_prob)``.

    Probabilities are ``softmax(logit_scale * cosine)`` over the whole gallery, as in GeoCLIP.
    With ``location_ids`` the image embeddings of one capture point are averaged (renormalised)
    before answering. ``locations`` reuses :func:`gallery_embeddings` of this gallery.
    """
    if not 1 <= top_k <= len(gallery):
        raise ValueError(f"top_k must be between 1 and the gallery size {len(gallery)}, got {top_k}")
    device = model.logit_scale.device
    images = model.image_embeddings(torch.as_tensor(np.asarray(features, np.float32), device=device))
    if location_ids is not None:
        pooled = pool_by_location(images.cpu().numpy(), location_ids, normalise=True)
        images = torch.as_tensor(pooled, device=device)
    locations = gallery_embeddings(model, gallery) if locations is None else locations
    chunk = max(1, _SIMILARITY_BLOCK // len(locations))  # images per (images x gallery) block
    probs, indices, cosines = [], [], []
    for block in images.split(chunk):
        similarity = block @ locations.T
        top_prob, top_index = (model.logit_scale.exp() * similarity).softmax(dim=-1).topk(top_k, dim=-1)
        probs.append(top_prob.cpu())
        indices.append(top_index.cpu())
        cosines.append(similarity.gather(1, top_index).cpu())
    index = torch.cat(indices).numpy().astype(np.int64)
    top_prob = torch.cat(probs).numpy().astype(np.float64)
    lat, lon = gallery["latitude"].to_numpy(float), gallery["longitude"].to_numpy(float)
    answers = Answers(method, lat[index[:, 0]], lon[index[:, 0]], top_prob[:, 0], neighbours=index,
                      similarities=torch.cat(cosines).numpy())
    return answers, lat[index], lon[index], top_prob


def predict_geoclip(model: GeoclipModel, image_paths: Sequence[str], gallery: pd.DataFrame, *,
                    top_k: int = DEFAULT_TOP_K, root: str | os.PathLike | None = None, location_ids=None,
                    cache_dir: str | os.PathLike | None = None, batch_size: int = 32, num_workers: int | None = None,
                    method: str = METHOD) -> GeoclipPredictions:
    """GeoCLIP's answers for a batch of image files over ``gallery`` (see :func:`la_gps_gallery`).

    ``location_ids`` (one per input path) pools the headings of a capture point. Unreadable
    images are skipped and reported; ``rows`` says which inputs were answered.
    """
    if location_ids is not None and len(location_ids) != len(image_paths):
        raise ValueError(f"{len(location_ids)} location ids for {len(image_paths)} images")
    found = backbone_features(model, image_paths, root=root, cache_dir=cache_dir, batch_size=batch_size,
                              num_workers=num_workers)
    if len(found.rows) == 0:
        raise ValueError(f"none of the {len(image_paths)} images could be read (first: {found.failures.iloc[0].tolist()})")
    ids = np.asarray(location_ids, dtype=object)[found.rows] if location_ids is not None else None
    answers, top_lat, top_lon, top_prob = answer_features(model, found.features, gallery, top_k=top_k,
                                                          location_ids=ids, method=method)
    return GeoclipPredictions(answers, top_lat, top_lon, top_prob, found.rows, found.failures)


def predictions_table(rows: pd.DataFrame, predictions: GeoclipPredictions) -> pd.DataFrame:
    """The answers table (:func:`lageo_utils.geolocate.answers_table`) of the answered ``rows``, plus
    GeoCLIP's top-k as ``top_k_lat``, ``top_k_lon``, ``top_k_prob`` (lists, best first)."""
    answered = rows.reset_index(drop=True).iloc[predictions.rows].reset_index(drop=True)
    table = answers_table(answered, predictions.answers)
    table["top_k_lat"] = predictions.top_lat.tolist()
    table["top_k_lon"] = predictions.top_lon.tolist()
    table["top_k_prob"] = predictions.top_prob.tolist()
    return table


# -- fine-tuning --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeoclipTrainConfig:
    """Fine-tuning settings: Adam with a per-epoch step decay of the learning rate.

    ``queue_size`` defaults to the ``geoclip`` package's 4096; learning rate, weight decay and
    decay are starting points after GeoCLIP's paper (not checked against it here, not tuned for
    LA): choose them on the validation split.
    """

    epochs: int = 10
    batch_size: int = 256
    learning_rate: float = 3e-5
    weight_decay: float = 1e-6
    lr_decay: float = 0.87  # learning rate factor per epoch
    queue_size: int = 4096
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size", "queue_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (0 if name == "queue_size" else 1):
                raise ValueError(f"GeoclipTrainConfig.{name} must be a positive integer, not {getattr(self, name)!r}")
        for name in ("learning_rate", "lr_decay"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GeoclipTrainConfig.{name} must be positive, not {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError(f"GeoclipTrainConfig.weight_decay must be >= 0, not {self.weight_decay!r}")


@dataclass
class _Split:
    features: torch.Tensor  # (n, IMAGE_FEATURE_DIM)
    coords: torch.Tensor  # (n, 2) float32, the model's input
    lat_lon: np.ndarray  # (n, 2) float64, for distances
    failures: pd.DataFrame


def _check_rows(rows: pd.DataFrame, name: str) -> None:
    missing = [c for c in ("image_path", "latitude", "longitude") if c not in rows.columns]
    if missing:
        raise ValueError(f"the {name} rows lack column(s) {missing}")
    coords = rows[["latitude", "longitude"]].to_numpy(float)
    bad = np.flatnonzero(~np.isfinite(coords).all(axis=1) | (np.abs(coords[:, 0]) > 90) | (np.abs(coords[:, 1]) > 180))
    if len(bad):
        raise ValueError(f"{name} row {bad[0]} ({rows['image_path'].iloc[bad[0]]}) has an invalid coordinate "
                         f"{tuple(coords[bad[0]])}")


def _split(model: GeoclipModel, rows: pd.DataFrame, name: str, root, cache_dir, batch_size, num_workers,
           device) -> _Split:
    coords = rows[["latitude", "longitude"]].to_numpy(float)
    found = backbone_features(model, rows["image_path"].astype(str).tolist(), root=root, cache_dir=cache_dir,
                              batch_size=batch_size, num_workers=num_workers, device=device)
    if len(found.rows) == 0:
        raise ValueError(f"the {name} split has no readable image")
    return _Split(torch.as_tensor(found.features, device=device),
                  torch.as_tensor(coords[found.rows], dtype=torch.float32, device=device), coords[found.rows],
                  found.failures)


class _Queue:
    """GeoCLIP's GPS queue: the coordinates of the latest batches (first in, first out), as negatives."""

    def __init__(self, size: int, device: torch.device):
        self.coords = torch.zeros(size, 2, device=device)
        self.length = 0
        self.pointer = 0

    def contents(self) -> torch.Tensor:
        return self.coords[: self.length]

    def push(self, coords: torch.Tensor) -> None:
        size = len(self.coords)
        if size == 0:
            return
        coords = coords[-size:]
        positions = (self.pointer + torch.arange(len(coords), device=coords.device)) % size
        self.coords[positions] = coords
        self.pointer = int((self.pointer + len(coords)) % size)
        self.length = min(size, self.length + len(coords))

    def state(self) -> dict:
        return {"coords": self.coords.cpu(), "length": self.length, "pointer": self.pointer}

    def load(self, state: dict) -> None:
        self.coords.copy_(state["coords"])
        self.length, self.pointer = int(state["length"]), int(state["pointer"])


def contrastive_loss(model: GeoclipModel, features: torch.Tensor, coords: torch.Tensor,
                     queue: torch.Tensor | None = None) -> torch.Tensor:
    """GeoCLIP's loss: cross-entropy of each image over its batch's coordinates plus the queue's.

    Candidates at exactly an image's own coordinate (its capture point's other headings, or the
    same place queued earlier) are masked out: they are not negatives.
    """
    candidates = coords if queue is None or len(queue) == 0 else torch.cat([coords, queue])
    logits = model.logit_scale.exp() * model.image_embeddings(features) @ model.location_embeddings(candidates).T
    same = (coords[:, None, :] == candidates[None, :, :]).all(dim=-1)
    same[torch.arange(len(coords)), torch.arange(len(coords))] = False
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(coords), device=coords.device))


@torch.no_grad()
def validation_loss(model: GeoclipModel, features: torch.Tensor, coords: torch.Tensor, chunk: int = 1024) -> float:
    """Mean cross-entropy of each validation image over the split's distinct coordinates (its own is the target).

    It does not depend on batching or the queue, so epochs compare fairly.
    """
    unique, target = torch.unique(coords, dim=0, return_inverse=True)
    locations = torch.cat([model.location_embeddings(c) for c in unique.split(_LOCATION_CHUNK)])
    total = 0.0
    for f, t in zip(features.split(chunk), target.split(chunk)):
        logits = model.logit_scale.exp() * model.image_embeddings(f) @ locations.T
        total += float(F.cross_entropy(logits, t, reduction="sum"))
    return total / len(features)


def finetune_geoclip(model: GeoclipModel, train_rows: pd.DataFrame, val_rows: pd.DataFrame,
                     out_dir: str | os.PathLike, config: GeoclipTrainConfig | None = None, *,
                     root: str | os.PathLike | None = None, gallery: pd.DataFrame | None = None,
                     cache_dir: str | os.PathLike | None = None, device: str | torch.device = "auto",
                     resume: bool = False, embed_batch_size: int = 32, num_workers: int | None = None,
                     on_step: StepHook | None = None) -> TrainResult:
    """Fine-tune GeoCLIP's image head and location encoder on the LA training split (``geoclip_finetuned``).

    ``train_rows``/``val_rows``: ``image_path`` (relative to ``root``), ``latitude``, ``longitude``.
    The backbone stays frozen: its features are computed once through the cache in ``cache_dir``
    (default ``out_dir/feature_cache``). Epoch 0 scores the shipped weights; ``best.pt`` holds the
    heads with the lowest :func:`validation_loss`, ``last.pt`` the full state after each epoch,
    ``history.csv`` (with the validation median error over ``gallery`` when given) and
    ``train_summary.json`` are written to ``out_dir``. ``resume=True`` continues from ``last.pt``
    to the result an uninterrupted run gives. ``model`` is not modified: load the result with
    :func:`load_finetuned`.
    """
    config = config or GeoclipTrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    model.to(device)
    _check_rows(train_rows, "train")
    _check_rows(val_rows, "val")
    checkpoint = load_checkpoint(out / LAST) if resume else None
    data_hashes = {"train": _coordinates_hash(train_rows), "val": _coordinates_hash(val_rows)}
    if checkpoint is not None:
        _check_resumable(checkpoint, model, config, data_hashes, out / LAST)
    cache = Path(cache_dir) if cache_dir is not None else out / "feature_cache"
    train, val = (_split(model, rows, name, root, cache, embed_batch_size, num_workers, device)
                  for rows, name in ((train_rows, "train"), (val_rows, "val")))
    heads = GeoclipModel(model.backbone, model.processor, model.backbone_name, heads=model.heads_state())
    heads._backbone_identity = model.backbone_identity
    heads.to(device)
    with deterministic():
        seed_everything(config.seed)
        trainable = [p for p in (*heads.image_head.parameters(), *heads.location_encoder.parameters())
                     if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=config.lr_decay)
        queue = _Queue(config.queue_size, device)
        if checkpoint is None:
            locations = gallery_embeddings(heads, gallery) if gallery is not None else None
            history = [_epoch_row(heads, 0, float("nan"), val, gallery, locations, float("nan"), 0.0)]
            best_epoch, resumed_from = 0, None
            _save(out, heads, optimizer, scheduler, queue, history, best_epoch, config, data_hashes, improved=True)
        else:
            heads.image_head.load_state_dict(checkpoint["image_head"])
            heads.location_encoder.load_state_dict(checkpoint["location_encoder"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            queue.load(checkpoint["queue"])
            history, best_epoch = list(checkpoint["history"]), int(checkpoint["best_epoch"])
            resumed_from = int(checkpoint["epoch"])
            log.info("resuming GeoCLIP fine-tuning after epoch %d", resumed_from)
        for epoch in range(len(history), config.epochs + 1):
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            train_loss = _train_epoch(heads, train, optimizer, queue, config, epoch, on_step)
            scheduler.step()
            locations = gallery_embeddings(heads, gallery) if gallery is not None else None
            history.append(_epoch_row(heads, epoch, train_loss, val, gallery, locations, lr,
                                      time.perf_counter() - start))
            improved = history[-1]["val_loss"] < history[best_epoch]["val_loss"]
            best_epoch = epoch if improved else best_epoch
            _save(out, heads, optimizer, scheduler, queue, history, best_epoch, config, data_hashes, improved)
    frame = pd.DataFrame(history, columns=HISTORY_COLUMNS)
    atomic_write(out / HISTORY, lambda tmp: frame.to_csv(tmp, index=False))
    failures = pd.concat([train.failures, val.failures], ignore_index=True)
    summary = {
        "method": FINETUNED_METHOD,
        "backbone": model.backbone_name,
        "backbone_identity": model.backbone_identity,
        "config": asdict(config),
        "n_train": len(train.features),
        "n_val": len(val.features),
        "best_epoch": best_epoch,
        "best_val_loss": history[best_epoch]["val_loss"],
        "shipped_val_loss": history[0]["val_loss"],
        "shipped_val_median_error_km": history[0]["val_median_error_km"],
        "best_val_median_error_km": history[best_epoch]["val_median_error_km"],
        "trainable_params": sum(p.numel() for p in trainable),
        "resumed_from_epoch": resumed_from,
        "unreadable_images": failures.to_dict("records"),
        "data_hashes": data_hashes,
    }
    summary = to_json_safe(summary)  # NaN (no gallery, no training loss at epoch 0) becomes null
    atomic_write(out / SUMMARY, lambda tmp: tmp.write_text(json.dumps(summary, indent=2, allow_nan=False)))
    return TrainResult(summary, frame, out, out / BEST, out / LAST)


def _train_epoch(heads: GeoclipModel, data: _Split, optimizer, queue: _Queue, config: GeoclipTrainConfig,
                 epoch: int, on_step: StepHook | None) -> float:
    # The order is fixed by (seed, epoch) alone: a resumed epoch repeats it exactly.
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    order = torch.randperm(len(data.features), generator=generator).to(data.features.device)
    heads.train()
    total = 0.0
    for i, batch in enumerate(order.split(config.batch_size)):
        coords = data.coords[batch]
        loss = contrastive_loss(heads, data.features[batch], coords, queue.contents())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        queue.push(coords)
        total += loss.detach().item() * len(batch)
        if on_step is not None:
            on_step(epoch, i)
    heads.eval()
    return total / len(order)


def _epoch_row(heads: GeoclipModel, epoch: int, train_loss: float, val: _Split, gallery, locations, lr: float,
               seconds: float) -> dict:
    heads.eval()
    median = float("nan")
    if gallery is not None:
        answers = answer_features(heads, val.features.cpu().numpy(), gallery, top_k=1, locations=locations)[0]
        median = float(np.median(haversine_km(val.lat_lon[:, 0], val.lat_lon[:, 1], answers.lat, answers.lon)))
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": validation_loss(heads, val.features, val.coords),
            "val_median_error_km": median, "lr": lr, "seconds": seconds}


def _save(out: Path, heads: GeoclipModel, optimizer, scheduler, queue: _Queue, history: list[dict], best_epoch: int,
          config: GeoclipTrainConfig, data_hashes: dict, improved: bool) -> None:
    """``best.pt`` (the heads) when improved, then ``last.pt`` (everything a resume needs)."""
    common = {"kind": FINETUNED_METHOD, "backbone": heads.backbone_name, "backbone_identity": heads.backbone_identity,
              "config": asdict(config), "data_hashes": data_hashes, "epoch": int(history[-1]["epoch"]),
              **{k: _cpu(v) for k, v in heads.heads_state().items()}}
    if improved:
        save_checkpoint({**common, "val_loss": history[-1]["val_loss"]}, out / BEST)
    save_checkpoint({**common, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "queue": queue.state(), "history": history, "best_epoch": best_epoch}, out / LAST)


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return {k: v.detach().cpu() for k, v in value.items()}


def _check_resumable(checkpoint: dict, model: GeoclipModel, config: GeoclipTrainConfig, data_hashes: dict,
                     path: Path) -> None:
    if checkpoint.get("kind") != FINETUNED_METHOD:
        raise CheckpointError(f"{path}: not a {FINETUNED_METHOD} checkpoint")
    saved = checkpoint["config"]
    changed = [f.name for f in fields(config) if f.name != "epochs" and saved.get(f.name) != getattr(config, f.name)]
    if changed:
        raise CheckpointError(f"{path}: the run was started with other settings ({', '.join(changed)}); "
                              "only epochs may change when resuming")
    if checkpoint["data_hashes"] != data_hashes:
        raise CheckpointError(f"{path}: the train/val rows changed since the checkpoint was written")
    if checkpoint["backbone_identity"] != model.backbone_identity:
        raise CheckpointError(f"{path}: the backbone's weights differ from those the run started with")


def load_finetuned(model: GeoclipModel, checkpoint: str | os.PathLike) -> GeoclipModel:
    """A GeoCLIP with ``model``'s backbone and the fine-tuned heads of ``checkpoint`` (``best.pt``), in eval mode."""
    state = load_checkpoint(checkpoint)
    if state.get("kind") != FINETUNED_METHOD:
        raise CheckpointError(f"{checkpoint}: not a {FINETUNED_METHOD} checkpoint")
    if state["backbone_identity"] != model.backbone_identity:
        raise CheckpointError(f"{checkpoint}: fine-tuned on backbone {state['backbone']!r} with other weights than "
                              f"{model.backbone_name!r}")
    tuned = GeoclipModel(model.backbone, model.processor, model.backbone_name,
                         heads={k: state[k] for k in ("image_head", "location_encoder", "logit_scale")})
    tuned._backbone_identity = model.backbone_identity
    return tuned.to(model.logit_scale.device).eval()


def _coordinates_hash(rows: pd.DataFrame) -> str:
    return frame_hash(rows, ("image_path", "latitude", "longitude"))
