"""Faster CPU inference for the image encoder: the same ``encode_image``, run by another engine.

``eager`` is the model's own PyTorch forward (open_clip's or timm's). ``onnx`` exports ``encode_image``
once with ``torch.onnx`` (a dynamic batch axis) and runs the file with ONNX Runtime. Exported files live under the embedding cache, one folder per model name, weights
hash, image shape and exporting software, published by renaming a finished temporary folder, so a second
run loads instead of exporting and a killed export leaves nothing half-written in use.

``torch.compile`` and OpenVINO were measured and are not offered (docs/benchmarks.md, "CPU inference
engines"): ``torch.compile`` was no faster than eager after minutes of compiling on the 2-core benchmark
machine; OpenVINO (fp32, the same ONNX file) was no faster than ONNX Runtime, and a process that had
compiled a model with it crashed later (SIGSEGV) once DataLoader workers had been forked, as the
embedding pipeline does.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lageo_utils.model import weights_identity

log = logging.getLogger(__name__)

ENGINES = ("eager", "onnx")  # mirrored in lageo_utils.params.ENGINES (a test keeps them equal)
# The packages each exported engine imports (onnxscript: torch.onnx's exporter).
ENGINE_PACKAGES = {"onnx": ("onnx", "onnxscript", "onnxruntime")}
ENGINE_FORMAT = 1  # bump when the export (wrapper, options) changes: older exported files are then not reused
ENGINES_DIR = "engines"  # inside the embedding cache directory
ONNX_FILE = "encoder.onnx"
META_FILE = "meta.json"
EXPORT_BATCH = 2  # the example batch of the export; the batch axis stays dynamic (torch.export treats 1 as fixed)

Encoder = Callable[[torch.Tensor], torch.Tensor]


class EngineUnavailableError(RuntimeError):
    """An engine's optional packages are missing; the message gives the pip command."""


def check_engine(engine: str, device: str | torch.device = "cpu") -> None:
    """Fail at once, before any model is loaded or exported, if ``engine`` cannot run on ``device``.

    ``ValueError`` for an unknown engine or an exported engine on a non-CPU device;
    ``EngineUnavailableError`` (with the pip command) when the engine's packages are not installed.
    """
    if engine not in ENGINES:
        close = difflib.get_close_matches(str(engine), ENGINES, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown engine {engine!r}{hint}; choose one of: {', '.join(ENGINES)}")
    if engine != "eager" and torch.device(device).type != "cpu":
        raise ValueError(f"engine {engine!r} runs on the CPU, not on {device}: set the device to cpu (--device cpu, "
                         "-p device cpu), or use the eager engine on an accelerator")
    missing = [name for name in ENGINE_PACKAGES.get(engine, ()) if importlib.util.find_spec(name) is None]
    if missing:
        raise EngineUnavailableError(f"engine {engine!r} needs {', '.join(missing)}, which is not installed: "
                                     f"{install_command(engine)}")


def install_command(engine: str) -> str:
    """The pip command that installs an engine's packages, at the pins of the ``engines`` extra when known."""
    pins = {}
    try:
        for requirement in metadata.requires("lageo") or []:
            spec, _, marker = requirement.partition(";")
            if "engines" in marker:
                name = re.split(r"[=<>!~ ]", spec.strip(), maxsplit=1)[0]
                pins[name.lower()] = spec.strip()
    except metadata.PackageNotFoundError:
        pass
    packages = " ".join(pins.get(name, name) for name in ENGINE_PACKAGES[engine])
    return f"pip install {packages}  (or, in a lageo checkout: pip install -e '.[engines]')"


def image_encoder(model, engine: str = "eager", *, cache_dir: str | os.PathLike | None = None,
                  model_name: str | None = None) -> Encoder:
    """``images (n, 3, h, w) -> features (n, dim)``: the model's ``encode_image`` run by ``engine``.

    Exported engines export on their first call for each image shape (or load the file a previous
    run exported into ``cache_dir``; without ``cache_dir``, a temporary folder that lives as long
    as the encoder). Features are not normalised, as ``encode_image``'s are not.
    """
    check_engine(engine, next(model.parameters()).device)
    if engine == "eager":
        return model.encode_image
    return ExportedEncoder(model, engine, cache_dir, model_name)


class _EncodeImage(nn.Module):
    """``encode_image`` as a module's forward: what ``torch.onnx.export`` takes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class ExportedEncoder:
    """A model's ``encode_image`` through ONNX Runtime, one exported file per image shape."""

    def __init__(self, model: nn.Module, engine: str, cache_dir: str | os.PathLike | None, model_name: str | None):
        self.model = model
        self.engine = engine
        self.model_name = model_name or type(model).__name__
        self._temporary = None if cache_dir is not None else tempfile.TemporaryDirectory(prefix="lageo-engine-")
        self.root = Path(cache_dir if cache_dir is not None else self._temporary.name) / ENGINES_DIR
        self._runners: dict[tuple[int, ...], Callable[[np.ndarray], np.ndarray]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        shape = tuple(images.shape[1:])
        if shape not in self._runners:
            folder = self.export(shape)
            self._runners[shape] = _onnxruntime_runner(folder)
        pixels = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self._runners[shape](pixels))

    def export_meta(self, shape: tuple[int, ...]) -> dict:
        """What the exported file depends on: its cache key."""
        return {
            "format": ENGINE_FORMAT,
            "model": self.model_name,
            "weights": weights_identity(self.model),
            "image_shape": list(shape),
            "batch": "dynamic",
            "torch": torch.__version__,
            "onnxscript": metadata.version("onnxscript"),
        }

    def export(self, shape: tuple[int, ...]) -> Path:
        """The folder holding ``encoder.onnx`` for images of ``shape`` (c, h, w): exported unless already there."""
        meta = self.export_meta(shape)
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        folder = self.root / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', self.model_name)}-{key}"
        if (folder / META_FILE).is_file():
            log.info("engine %s: using the exported %s", self.engine, folder / ONNX_FILE)
            return folder
        log.info("engine %s: exporting %s for images of shape %s (once; kept in %s)", self.engine, self.model_name,
                 shape, folder)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{folder.name}-", suffix=".tmp"))
        try:
            export_onnx(self.model, shape, staging / ONNX_FILE)
            (staging / META_FILE).write_text(json.dumps(meta, indent=2))  # written last: marks a finished export
            try:
                os.replace(staging, folder)  # atomic: readers see the whole folder or none
            except OSError:
                if not (folder / META_FILE).is_file():  # not another process's finished export: a real failure
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder


def export_onnx(model: nn.Module, shape: tuple[int, ...], path: Path) -> None:
    """Export ``model.encode_image`` for images of ``shape`` to ``path``, the batch axis dynamic, weights inside."""
    was_training = model.training
    wrapper = _EncodeImage(model).eval()  # the model too
    try:
        example = torch.zeros(EXPORT_BATCH, *shape, device=next(model.parameters()).device)
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.onnx.export(wrapper, (example,), dynamo=True, verbose=False,
                                    input_names=["images"], output_names=["features"],
                                    dynamic_shapes={"images": {0: batch}})
        program.save(path, external_data=_needs_external_data(model))
    finally:
        model.train(was_training)


def _needs_external_data(model: nn.Module) -> bool:
    """ONNX files hold at most 2 GB in one piece; larger encoders keep their weights beside the file."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8 * 2**30


def _onnxruntime_runner(folder: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the thread budget torch's forward has
    options.inter_op_num_threads = 1
    # Idle threads sleep instead of spinning: spinning gains nothing on batches this large and, on a busy machine,
    # takes the cores the working threads need (1.29x eager against 1.23x, ViT-B-32, docs/benchmarks.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(folder / ONNX_FILE), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda pixels: session.run(None, {name: pixels})[0]

