"""Loading CLIP through open_clip: tags, local checkpoints, devices and the tiny test model.

``load_clip`` never falls back to random weights: random initialisation happens only when
the caller asks for ``pretrained=None`` (``--pretrained none`` on the command line), which
the tests and the offline demo do with the shipped ``lageo-tiny`` config.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import hashlib
import logging
import os
from pathlib import Path

import huggingface_hub
import open_clip
import timm
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from torch import nn

log = logging.getLogger(__name__)

TINY_MODEL = "lageo-tiny"
TIMM_PREFIX = "timm:"
# Randomly initialised image-only test backbones, as lageo-tiny is for CLIP: name -> (timm architecture, overrides).
# Mean-pooled patch tokens: at random initialisation the class token comes out the same for every image.
TIMM_TEST_MODELS = {"lageo-tiny-dinov2": ("vit_small_patch14_dinov2", {"img_size": 56, "depth": 2, "embed_dim": 64,
                                                                       "num_heads": 2, "global_pool": "avg"})}
WEIGHTS_ENV = "LAGEO_CLIP_WEIGHTS"
_CONFIG_DIR = Path(__file__).parent / "model_configs"

open_clip.add_model_config(_CONFIG_DIR)  # registers lageo-tiny beside open_clip's own configs


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be loaded; the message says what was tried and how to fix it."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; anything else is passed to torch."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# Precision of forward passes: auto (CUDA: bfloat16 autocast where supported, else float16; elsewhere float32),
# or one for every device (`lageo bench embed --precision`, the GPU tests' comparisons).
PRECISIONS = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_precision: contextvars.ContextVar[str] = contextvars.ContextVar("lageo_precision", default="auto")


@contextlib.contextmanager
def precision(name: str):
    """Run forward passes (``autocast``) at ``name``, one of ``PRECISIONS``, inside the block."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    token = _precision.set(name)
    try:
        yield
    finally:
        _precision.reset(token)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``autocast`` runs at on ``device``; None: float32, no autocast."""
    name = _precision.get()
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None if name == "fp32" else PRECISIONS[name]


def precision_label(device: torch.device) -> str:
    """How forward passes on ``device`` compute now (``cpu-float32``, ``cuda-autocast-bfloat16``): a cache key part."""
    dtype = autocast_dtype(device)
    return f"{device.type}-float32" if dtype is None else f"{device.type}-autocast-{str(dtype).removeprefix('torch.')}"


def autocast(device: torch.device):
    """Mixed precision on CUDA (bfloat16 where supported, else float16); a no-op elsewhere, unless ``precision``
    says otherwise."""
    dtype = autocast_dtype(device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def normalize_pretrained(pretrained: str | os.PathLike | None) -> str | None:
    """Map the command-line spellings ``none``/``random``/empty to ``None``."""
    if pretrained is None or str(pretrained).strip().lower() in ("", "none", "random"):
        return None
    return str(pretrained)


def load_clip(
    model_name: str = "ViT-B-32",
    pretrained: str | os.PathLike | None = "openai",
    device: str | torch.device = "auto",
    cache_dir: str | os.PathLike | None = None,
    quick_gelu: bool | None = None,
):
    """Create an open_clip model with its eval preprocessing and tokenizer.

    ``pretrained`` is an open_clip tag (``openai``, ``laion2b_s34b_b79k``, ...), a path to a local
    checkpoint, or ``None`` for random weights. If ``LAGEO_CLIP_WEIGHTS`` names a file it is used
    instead of a tag. OpenAI weights (the ``openai`` tag or a local file) use QuickGELU, as they
    were trained; pass ``quick_gelu=False`` for a local file of other weights (e.g. LAION).
    Returns ``(model, preprocess, tokenizer)`` with the model in eval mode on
    ``resolve_device(device)``.
    """
    pretrained = normalize_pretrained(pretrained)
    target = resolve_device(device)
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown model {model_name!r}; open_clip knows e.g. ViT-B-32, ViT-L-14, {TINY_MODEL}")
    source = _resolve_weights(model_name, pretrained)
    if quick_gelu is None:
        quick_gelu = source is not None and (source == "openai" or Path(source).is_file())
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=source, device=target, force_quick_gelu=quick_gelu, cache_dir=cache_dir
        )
    except Exception as exc:
        if source is None:
            raise
        if Path(source).is_file():
            problem = f"the file could not be loaded as {model_name} weights ({type(exc).__name__}: {exc})"
        elif "Failed to download" in str(exc):
            problem = f"download failed and no cached copy exists: {exc}"
        else:
            problem = f"loading failed ({type(exc).__name__}: {exc})"
        raise WeightsUnavailableError(_weights_help(model_name, source, problem)) from exc
    model.eval()
    log.info("loaded %s (weights: %s) on %s", model_name, source or "random init", target)
    return model, preprocess, open_clip.get_tokenizer(model_name)


class ImageOnlyModel(nn.Module):
    """An image backbone (timm) behind the part of the CLIP interface lageo uses: ``visual`` and ``encode_image``.

    It has no text tower, so the text-side methods (zero-shot, ``text_scale``, ``contrastive``)
    do not apply; a linear head over its pooled features starts from zero.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.visual = backbone
        backbone.output_dim = backbone.num_features  # what embedding code reads, as on open_clip's encoders

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


def has_text_tower(model) -> bool:
    """Whether ``model`` can embed text (CLIP) or only images (``ImageOnlyModel``)."""
    return hasattr(model, "encode_text")


def backbone_family(model_name: str) -> str:
    return "timm" if model_name.startswith(TIMM_PREFIX) else "open_clip"


def load_model(model_name: str, pretrained: str | os.PathLike | None, device: str | torch.device = "auto",
               cache_dir: str | os.PathLike | None = None):
    """CLIP (an open_clip name) or an image-only backbone (``timm:<name>``): ``(model, preprocess, tokenizer)``,
    the tokenizer ``None`` for image-only backbones."""
    if backbone_family(model_name) == "timm":
        return load_timm(model_name, pretrained, device)
    return load_clip(model_name, pretrained, device, cache_dir)


def load_timm(model_name: str, pretrained: str | os.PathLike | None, device: str | torch.device = "auto"):
    """A timm image backbone (``timm:vit_small_patch14_dinov2``) as an ``ImageOnlyModel`` with timm's eval transform.

    ``pretrained``: a timm weights tag of that architecture (``lvd142m``; ``default``: its default
    tag), taken from the Hugging Face cache exactly as CLIP weights are; a local checkpoint file; or
    ``None`` for random weights (what the tests do, e.g. with ``timm:lageo-tiny-dinov2``).
    """
    arch, overrides = _timm_architecture(model_name)
    pretrained = normalize_pretrained(pretrained)
    target = resolve_device(device)
    source = _resolve_timm_weights(model_name, arch, pretrained)
    try:
        if source is None or Path(source).is_file():
            backbone = timm.create_model(arch, pretrained=False, num_classes=0, **overrides)
            if source is not None:
                _load_timm_checkpoint(backbone, source)
        else:
            backbone = timm.create_model(source, pretrained=True, num_classes=0, **overrides)
    except Exception as exc:
        if source is None:
            raise
        raise WeightsUnavailableError(_weights_help(model_name, source, f"loading failed ({type(exc).__name__}: "
                                                                        f"{exc})")) from exc
    config = timm.data.resolve_model_data_config(backbone)
    size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    if size is not None:  # a backbone built at another size than its published weights
        config["input_size"] = (3, *size)
    preprocess = timm.data.create_transform(**config, is_training=False)
    model = ImageOnlyModel(backbone).to(target).eval()
    log.info("loaded %s (weights: %s) on %s", model_name, source or "random init", target)
    return model, preprocess, None


def _timm_architecture(model_name: str) -> tuple[str, dict]:
    name = model_name.removeprefix(TIMM_PREFIX)
    arch, overrides = TIMM_TEST_MODELS.get(name, (name, {}))
    if not timm.is_model(arch.split(".")[0]):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(TIMM_PREFIX + c) for c in close)}?" if close else ""
        raise ValueError(f"unknown timm model {arch!r}{hint}")
    return arch, overrides


def _resolve_timm_weights(model_name: str, arch: str, pretrained: str | None) -> str | None:
    """None (random), a checkpoint file, or ``architecture.tag`` of published weights."""
    if pretrained is None:
        return None
    if Path(pretrained).suffix or os.sep in pretrained:
        if not Path(pretrained).is_file():
            raise WeightsUnavailableError(_weights_help(model_name, pretrained, "the checkpoint file does not exist"))
        return pretrained
    if model_name.removeprefix(TIMM_PREFIX) in TIMM_TEST_MODELS:
        raise WeightsUnavailableError(_weights_help(model_name, pretrained, "a test model has no published weights"))
    base = arch.split(".")[0]
    tags = [name.split(".", 1)[1] for name in timm.list_pretrained(base + ".*")]
    tag = arch.split(".", 1)[1] if "." in arch else (tags[0] if pretrained == "default" and tags else pretrained)
    if tag not in tags:
        raise WeightsUnavailableError(_weights_help(model_name, pretrained, f"unknown tag (known tags: {tags or 'none'})"))
    return f"{base}.{tag}"


def _timm_hub_file(source: str) -> tuple[str, list[str]] | None:
    """The Hugging Face repository and candidate file names of published timm weights."""
    hub = timm.models.get_pretrained_cfg(source).hf_hub_id if timm.models.get_pretrained_cfg(source) else None
    return (hub, ["model.safetensors", "pytorch_model.bin"]) if hub else None


def check_weights(model_name: str, pretrained: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None,
                  timeout_s: float = 10.0) -> None:
    """Fail at once, without loading anything, if ``load_clip(model_name, pretrained)`` could not get its weights.

    Raises ``ValueError`` for an unknown model (naming the closest ones) and ``WeightsUnavailableError``
    (the same text ``load_clip`` gives) for a missing file, an unknown tag, or a tag that is neither
    in the Hugging Face cache nor downloadable now.
    """
    if backbone_family(model_name) == "timm":
        source = _resolve_timm_weights(model_name, _timm_architecture(model_name)[0], normalize_pretrained(pretrained))
        if source is None or Path(source).is_file() or _timm_hub_file(source) is None:
            return
        repo, candidates = _timm_hub_file(source)
    else:
        if model_name not in open_clip.list_models():
            close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown model {model_name!r}{hint} (open_clip knows e.g. ViT-B-32, ViT-L-14, "
                             f"{TINY_MODEL}; image-only backbones: timm:<name>)")
        source = _resolve_weights(model_name, normalize_pretrained(pretrained))
        if source is None or Path(source).is_file():
            return
        hub = open_clip.get_pretrained_cfg(model_name, source).get("hf_hub", "")
        if not hub:
            return  # a URL download (a few older tags); load_clip reports its failure
        repo, filename = os.path.split(hub)  # "org/name/" names the default file
        filename = filename or HF_WEIGHTS_NAME
        # open_clip tries a safetensors file first, as here
        candidates = [HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME
                      else str(Path(filename).with_suffix(".safetensors")), filename]
    if any(isinstance(huggingface_hub.try_to_load_from_cache(repo, name, cache_dir=cache_dir), str)
           for name in candidates):
        return
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        problem = "they are not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    else:
        try:
            huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo, candidates[-1]), timeout=timeout_s)
            return
        except Exception as exc:  # network errors come in many types; any of them means no weights now
            problem = f"they are not in the Hugging Face cache and cannot be downloaded now ({type(exc).__name__})"
    raise WeightsUnavailableError(_weights_help(model_name, source, problem))


def weights_identity(model: torch.nn.Module, module: str = "visual") -> str:
    """A content hash of a sub-module's weights: the cache key part that names the weights.

    Hashing the tensors (not the tag) makes fine-tuned and randomly initialised models
    distinct and identical weights equal, wherever they came from.
    """
    digest = hashlib.sha256()
    for name, tensor in getattr(model, module).state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy())  # hashed in place, no copy
    return digest.hexdigest()[:16]


def _load_timm_checkpoint(backbone: torch.nn.Module, path: str) -> None:
    """Load a local checkpoint into a timm backbone; every backbone weight must come from the file.

    Extra entries (a classifier head, ``mask_token``) are ignored; a missing one means the file's layout
    is another (a ``backbone.`` prefix, another library's names) and would leave random weights behind."""
    result = timm.models.load_checkpoint(backbone, path, strict=False)
    missing = list(getattr(result, "missing_keys", []))
    if missing:
        raise ValueError(f"{len(missing)} of the backbone's {len(backbone.state_dict())} weights are not in the file "
                         f"(first: {', '.join(missing[:3])}); the file holds e.g. "
                         f"{', '.join(list(timm.models.load_state_dict(path))[:3])}")
    if getattr(result, "unexpected_keys", None):
        log.info("checkpoint %s: %d entries the backbone does not use (ignored)", path, len(result.unexpected_keys))


def _resolve_weights(model_name: str, pretrained: str | None) -> str | None:
    if pretrained is None:
        return None
    env_path = os.environ.get(WEIGHTS_ENV)
    if env_path and not Path(pretrained).suffix:
        if not Path(env_path).is_file():
            raise WeightsUnavailableError(_weights_help(model_name, env_path, f"{WEIGHTS_ENV} names a missing file"))
        return env_path
    if Path(pretrained).suffix or os.sep in pretrained:
        if not Path(pretrained).is_file():
            raise WeightsUnavailableError(_weights_help(model_name, pretrained, "the checkpoint file does not exist"))
        return pretrained
    if not open_clip.get_pretrained_cfg(model_name, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise WeightsUnavailableError(
            _weights_help(model_name, pretrained, f"unknown tag for this model (known tags: {tags or 'none'})")
        )
    return pretrained


def _weights_help(model_name: str, tried: str, problem: str) -> str:
    return (
        f"Weights for {model_name!r} are unavailable: tried {tried!r}, {problem}.\n"
        "Fix it in one of two ways:\n"
        "  1. run once with internet access so the weights are downloaded and cached "
        "(Hugging Face cache, ~/.cache/huggingface), then work offline;\n"
        f"  2. pass a local checkpoint file (--pretrained /path/to/weights.pt), or for CLIP set "
        f"{WEIGHTS_ENV}=/path/to/file.\n"
        f"For a pipeline test without weights use --model {TINY_MODEL} (or {TIMM_PREFIX}lageo-tiny-dinov2) "
        "--pretrained none (random weights, no geolocation skill)."
    )
