"""Inference: one predictor for zero-shot and fine-tuned models, and the predictions table.

An image goes image encoder -> L2-normalised embedding -> ``RegionClassifier`` -> region
probabilities. Zero-shot CLIP is the classifier whose class weights are the region prompts'
text embeddings; a training checkpoint brings its own encoder weights and head. Nothing here
imports the training code: training imports this module, never the reverse.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lageo_utils.adapters import add_lora, merge_lora
from lageo_utils.checkpoints import CheckpointError, load_checkpoint
from lageo_utils.embed import EmbeddingResult, embed_manifest
from lageo_utils.engines import image_encoder
from lageo_utils.geo import haversine_km
from lageo_utils.images import input_size, open_rgb, to_rgb
from lageo_utils.model import autocast, has_text_tower, load_model, resolve_device, weights_identity
from lageo_utils.prompts import encode_region_texts
from lageo_utils.regions import assign_regions

log = logging.getLogger(__name__)

SCALES = ("learned", "none")


HEADS = ("linear", "cosine", "scaled")


class RegionClassifier(nn.Module):
    """Image encoder + region logits over L2-normalised embeddings; every head starts at the zero-shot logits.

    ``head`` is one of:

    - ``linear``: a linear layer initialised to ``logit_scale * class_embeddings`` with zero bias
      (``linear_probe``, ``partial``, ``full``, ``lora``);
    - ``cosine``: ``logit_scale * cosine`` against the fixed ``class_embeddings`` (zero-shot CLIP,
      ``contrastive``);
    - ``scaled``: a learned scale and per-region bias on those cosines, ``exp(log_scale) * cosine +
      bias`` (``text_scale``).
    """

    def __init__(self, visual: nn.Module, class_embeddings: torch.Tensor, logit_scale: float, head: str = "linear"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.visual = visual
        self.head_kind = head
        self.logit_scale = float(logit_scale)
        self.register_buffer("class_embeddings", class_embeddings.detach().float().clone())
        n_classes, dim = class_embeddings.shape
        self.head: nn.Linear | None = None
        if head == "linear":
            self.head = nn.Linear(dim, n_classes).to(class_embeddings.device)
            with torch.no_grad():
                self.head.weight.copy_(self.class_embeddings * self.logit_scale)
                self.head.bias.zero_()
        elif head == "scaled":
            device = class_embeddings.device
            self.log_scale = nn.Parameter(torch.tensor(math.log(self.logit_scale), device=device))
            self.bias = nn.Parameter(torch.zeros(n_classes, device=device))

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters of the head (none for ``cosine``)."""
        if self.head_kind == "linear":
            return list(self.head.parameters())
        return [self.log_scale, self.bias] if self.head_kind == "scaled" else []

    def classify(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Region logits for image embeddings (normalised here)."""
        x = F.normalize(embeddings.float(), dim=-1)
        if self.head_kind == "linear":
            return self.head(x)
        cosines = x @ self.class_embeddings.T
        if self.head_kind == "scaled":
            return self.log_scale.exp() * cosines + self.bias
        return self.logit_scale * cosines

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.visual(images))


def load_classifier_state(classifier: RegionClassifier, state: dict, complete: bool) -> None:
    """Load checkpoint weights; unless ``complete``, frozen encoder weights may be absent (they are the base's)."""
    missing, unexpected = classifier.load_state_dict(state, strict=False)
    missing = [k for k in missing if complete or not k.startswith("visual.")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint weights do not fit the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")


class ImageEncoder:
    """An image encoder and its preprocessing: L2-normalised image embeddings, no region head.

    On its own it is an image-only backbone before training (retrieval and geocells answer from its
    embeddings); ``GeoPredictor`` adds the region head.
    """

    def __init__(self, model, preprocess, device="auto", model_name: str | None = None):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.model_name = model_name
        self.encode_image = self.model.encode_image  # embed_image's encoder; see use_engine

    def use_engine(self, engine: str, cache_dir: str | os.PathLike | None = None) -> None:
        """Have ``embed_image`` run the image encoder with ``engine`` (``lageo_utils.engines``; exported files
        are kept in ``cache_dir``)."""
        self.encode_image = image_encoder(self.model, engine, cache_dir=cache_dir, model_name=self.model_name)

    def embed_image(self, image_or_path: Image.Image | str | os.PathLike) -> torch.Tensor:
        """The L2-normalised embedding (1 x dim) of one image or image file (ImageReadError if unreadable)."""
        image = (to_rgb(image_or_path) if isinstance(image_or_path, Image.Image)
                 else open_rgb(image_or_path, min_size=input_size(self.preprocess)))  # as the embedding pipeline
        pixels = self.preprocess(image).unsqueeze(0).to(self.device)
        with torch.no_grad(), autocast(self.device):
            features = self.encode_image(pixels)
        return F.normalize(features.float(), dim=-1)


class GeoPredictor(ImageEncoder):
    """Region probabilities for images, zero-shot or from a fine-tuned ``RegionClassifier``.

    Without ``classifier`` this is zero-shot CLIP: cosine similarities to the region prompts'
    text embeddings, multiplied (``scale="learned"``, default) by the model's learned temperature
    ``exp(logit_scale)`` (100 for OpenAI CLIP) before the softmax, as CLIP was trained. The seed
    code applied the softmax to unscaled cosines, which squeezes every probability towards
    1 / n_regions; ``scale="none"`` reproduces that. With ``classifier`` (trained on the regions
    ``class_ids``), ``regions`` may be any subset or order of those.
    """

    def __init__(self, model, preprocess, tokenizer, regions: gpd.GeoDataFrame, templates: list[str] | None = None,
                 device="auto", scale: str = "learned", model_name: str | None = None,
                 classifier: RegionClassifier | None = None, class_ids: list[str] | None = None,
                 temperature: float = 1.0, descriptors: dict[str, str] | None = None):
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        super().__init__(model, preprocess, device, model_name)
        self.tokenizer = tokenizer
        self.regions = regions.reset_index(drop=True)
        self.region_ids: list[str] = [str(r) for r in self.regions["id"]]
        self.centroids = self.regions[["centroid_lat", "centroid_lon"]].to_numpy(dtype=float)
        self.templates = templates
        self.scale = scale
        if classifier is None:
            if not has_text_tower(model):
                raise ValueError(f"{model_name or type(model).__name__} has no text tower: zero-shot needs CLIP; "
                                 "train a head on its image features instead (linear_probe, partial, lora or full)")
            text = encode_region_texts(model, tokenizer, self.regions, templates, self.device, descriptors)
            logit_scale = float(model.logit_scale.detach().float().exp()) if scale == "learned" else 1.0
            classifier, class_ids = RegionClassifier(model.visual, text, logit_scale, head="cosine"), self.region_ids
        elif model.visual is not classifier.visual:
            raise ValueError("the model's image encoder must be the classifier's")
        unknown = [r for r in self.region_ids if r not in (class_ids or [])]
        if unknown:
            raise ValueError(f"regions {unknown} are not among the classifier's classes {class_ids}")
        self.classifier = classifier.to(self.device).eval()
        self.class_ids = list(class_ids)
        self.columns = torch.as_tensor([class_ids.index(r) for r in self.region_ids], device=self.device)
        self.checkpoint: dict | None = None  # what a fine-tuned predictor was loaded from
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)  # probabilities are softmax(logits / temperature); see calibration

    @property
    def text_features(self) -> torch.Tensor:
        """The class embeddings of ``regions`` (region prompt embeddings, or those a checkpoint kept)."""
        return self.classifier.class_embeddings[self.columns]

    def logits(self, image_features) -> torch.Tensor:
        """Region logits (n x n_regions) for image embeddings (normalised here if they are not)."""
        features = torch.as_tensor(image_features, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            return self.classifier.classify(torch.atleast_2d(features))[:, self.columns]

    def probabilities(self, embeddings) -> np.ndarray:
        """Softmax region probabilities (n x n_regions, float64) for image embeddings, at the calibrated temperature."""
        return (self.logits(embeddings).double() / self.temperature).softmax(dim=-1).cpu().numpy()

    def predict_embeddings(self, embeddings, top_k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Indices into the regions (n x k) and their probabilities, best first."""
        probs = self.probabilities(embeddings)
        top_idx = top_k_indices(probs, top_k)
        return top_idx, np.take_along_axis(probs, top_idx, axis=1)

    def predict(self, image_or_path, top_k: int = 5) -> tuple[list[tuple[float, float]], list[float]]:
        """The seed's contract: ``(top_pred_gps, top_pred_prob)``, region centroids and probabilities, best first."""
        top_idx, top_prob = self.predict_embeddings(self.embed_image(image_or_path), top_k)
        gps = [(float(lat), float(lon)) for lat, lon in self.centroids[top_idx[0]]]
        return gps, [float(p) for p in top_prob[0]]


def interpolate_classifiers(zero_shot: RegionClassifier, finetuned: RegionClassifier, alpha: float) -> RegionClassifier:
    """WiSE-FT (Wortsman et al., 2022): every weight ``(1 - alpha) * zero-shot + alpha * fine-tuned``.

    Both classifiers must have the same architecture (merge LoRA adapters first); alpha 0 is the
    zero-shot model, alpha 1 the fine-tuned one. Returns a new classifier.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    start, end = zero_shot.state_dict(), finetuned.state_dict()
    if start.keys() != end.keys():
        raise ValueError(f"the classifiers differ in their weights: {sorted(start.keys() ^ end.keys())[:5]}")
    mixed = copy.deepcopy(finetuned)
    mixed.load_state_dict({name: torch.lerp(start[name].to(tensor), tensor, alpha) if tensor.is_floating_point()
                           else tensor for name, tensor in end.items()})
    return mixed


def wise_ft(finetuned: GeoPredictor, base_model, alpha: float) -> GeoPredictor:
    """The WiSE-FT predictor between the zero-shot ``base_model`` (the weights fine-tuning started from) and a
    fine-tuned predictor; its head starts, at alpha 0, from the zero-shot logits (see ``RegionClassifier``)."""
    head = finetuned.classifier
    zero_shot = RegionClassifier(copy.deepcopy(base_model.visual).to(finetuned.device), head.class_embeddings,
                                 head.logit_scale, head=head.head_kind)
    mixed = interpolate_classifiers(zero_shot, head, alpha)
    model = copy.deepcopy(finetuned.model, memo={id(finetuned.model.visual): mixed.visual})  # the mixed encoder in
    return GeoPredictor(model, finetuned.preprocess, finetuned.tokenizer, finetuned.regions, device=finetuned.device,
                        model_name=finetuned.model_name, classifier=mixed, class_ids=finetuned.class_ids)


def top_k_indices(probs: np.ndarray, top_k: int) -> np.ndarray:
    """Column indices of the ``top_k`` largest values per row, best first (ties: lower index first)."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    return np.argsort(-probs, axis=1, kind="stable")[:, :top_k]


def predictions_from_probs(manifest_rows: pd.DataFrame, probs: np.ndarray, regions: gpd.GeoDataFrame,
                           top_k: int = 5) -> pd.DataFrame:
    """The predictions table (one row per image) from region probabilities (n x n_regions, class order).

    ``true_region`` is the manifest's ``region_id`` (assigned from the coordinates if absent);
    ``pred_lat``/``pred_lon`` are the top-1 region centroid and ``error_km`` its great-circle
    distance to the true coordinate. ``location_id`` and ``heading`` are carried when present.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(manifest_rows), len(regions)):
        raise ValueError(
            f"probabilities have shape {probs.shape}, expected ({len(manifest_rows)} images, {len(regions)} regions)"
        )
    missing = [c for c in ("image_path", "latitude", "longitude") if c not in manifest_rows.columns]
    if missing:
        raise ValueError(f"manifest rows lack column(s) {missing}")
    rows = manifest_rows.reset_index(drop=True)
    ids = regions["id"].to_numpy(dtype=object)
    centroids = regions[["centroid_lat", "centroid_lon"]].to_numpy(dtype=float)
    order = top_k_indices(probs, top_k)
    top_probs = np.take_along_axis(probs, order, axis=1)
    lat = rows["latitude"].to_numpy(dtype=float)
    lon = rows["longitude"].to_numpy(dtype=float)
    true_region = rows["region_id"].to_numpy(dtype=object) if "region_id" in rows else assign_regions(lat, lon, regions)
    pred_region = ids[order[:, 0]]
    pred_lat, pred_lon = centroids[order[:, 0], 0], centroids[order[:, 0], 1]
    table = pd.DataFrame({
        "image_path": rows["image_path"].astype(str).to_numpy(),
        "latitude": lat,
        "longitude": lon,
        "true_region": true_region,
        "pred_region": pred_region,
        "top_regions": [ids[o].tolist() for o in order],
        "top_probs": top_probs.tolist(),
        "confidence": top_probs[:, 0],
        "pred_lat": pred_lat,
        "pred_lon": pred_lon,
        "error_km": haversine_km(lat, lon, pred_lat, pred_lon),
        "correct": [isinstance(true, str) and pred == true for pred, true in zip(pred_region, true_region)],
    })
    for column in ("location_id", "heading"):
        if column in rows:
            table[column] = rows[column].to_numpy()
    return table


def predict_manifest(predictor: GeoPredictor, manifest: pd.DataFrame, image_root, batch_size: int = 64,
                     top_k: int = 5, cache_dir=None) -> pd.DataFrame:
    """Predict every manifest image through the embedding pipeline (and its cache when ``cache_dir`` is given).

    Unreadable images get no row; they are logged and listed in ``table.attrs["failures"]``
    (records of image_path and reason, kept when the table is written to Parquet).
    """
    result = embed_manifest(predictor.model, predictor.preprocess, manifest, image_root, cache_dir=cache_dir,
                            batch_size=batch_size, device=predictor.device, model_name=predictor.model_name)
    return predictions_from_embeddings(predictor, manifest, result, top_k)


def predictions_from_embeddings(predictor: GeoPredictor, manifest: pd.DataFrame, result: EmbeddingResult,
                                top_k: int = 5) -> pd.DataFrame:
    """The predictions table of ``manifest`` from its already computed embeddings (``embed_manifest``'s result)."""
    probs = predictor.probabilities(result.embeddings)
    table = predictions_from_probs(manifest.iloc[result.rows], probs, predictor.regions, top_k)
    # What calibration changed: the top-1 probability before temperature scaling (the ranking is the same).
    table["confidence_uncalibrated"] = predictor.logits(result.embeddings).double().softmax(dim=-1).max(dim=-1).values \
        .cpu().numpy() if len(table) else np.empty(0)
    table.attrs["temperature"] = predictor.temperature
    table.attrs["failures"] = result.failures.to_dict(orient="records")
    if len(result.failures):
        log.warning("%d images could not be read and have no prediction: %s", len(result.failures),
                    "; ".join(f"{r.image_path} ({r.reason})" for r in result.failures.head(5).itertuples()))
    return table


def load_finetuned(checkpoint_path: str | os.PathLike, regions, device: str | torch.device = "auto", *,
                   clip: tuple | None = None) -> GeoPredictor:
    """A ``GeoPredictor`` for a training checkpoint (``best.pt``/``last.pt``) over ``regions``.

    The model is rebuilt from the checkpoint's config: ``model_name`` and ``pretrained`` (whose
    encoder weights must be those training started from), then the checkpoint's weights.
    ``regions`` may be any subset or order of the regions the checkpoint was trained with.
    ``clip`` is an already loaded base ``(model, preprocess, tokenizer)``; it is not modified.
    """
    path = Path(checkpoint_path)
    state = load_checkpoint(path)
    config = state["config"]
    unknown = [str(r) for r in regions["id"] if str(r) not in state["region_ids"]]
    if unknown:
        raise ValueError(f"{path}: regions {unknown} are not in the checkpoint (trained with {state['region_ids']})")
    model_name, pretrained = config["model_name"], config["pretrained"]
    target = resolve_device(device)
    model, preprocess, tokenizer = clip if clip is not None else load_model(model_name, pretrained, target)
    model = copy.deepcopy(model).to(target) if clip is not None else model
    if not state["self_contained"] and weights_identity(model) != state["base_identity"]:
        raise CheckpointError(f"{path}: {model_name} weights {pretrained!r} are not those this "
                              "checkpoint was trained from")
    model_state = state["model"]
    if config["strategy"] == "lora":
        model.visual = add_lora(model.visual, config["lora_rank"], config["lora_alpha"], config.get("lora_targets"))
    head = state.get("head", "linear" if "head.weight" in model_state else "cosine")  # older checkpoints: no "head"
    classifier = RegionClassifier(model.visual, model_state["class_embeddings"], state["logit_scale"], head=head)
    load_classifier_state(classifier, model_state, complete=state["self_contained"])
    if config["strategy"] == "lora":  # plain modules again: faster, and the same weights WiSE-FT interpolates
        model.visual = classifier.visual = merge_lora(classifier.visual)
    predictor = GeoPredictor(model, preprocess, tokenizer, regions, templates=config["templates"], device=target,
                             model_name=model_name, classifier=classifier, class_ids=list(state["region_ids"]),
                             temperature=state.get("temperature", 1.0))
    predictor.checkpoint = {"path": str(path), "strategy": config["strategy"], "epoch": state["epoch"],
                            "best_val_acc": state["best_val_acc"], "temperature": predictor.temperature}
    return predictor


def load_predictor(model_name: str, pretrained, regions: gpd.GeoDataFrame, checkpoint=None, device="auto",
                   templates: list[str] | None = None, scale: str = "learned") -> GeoPredictor:
    """A ready predictor: zero-shot CLIP, or the fine-tuned model in ``checkpoint`` (model name and weights then come
    from the checkpoint's own config)."""
    if checkpoint is not None:
        if templates is not None or scale != "learned":
            raise ValueError("templates and scale come from the checkpoint's own config; do not pass them with it")
        return load_finetuned(checkpoint, regions, device)
    model, preprocess, tokenizer = load_model(model_name, pretrained, device=device)
    return GeoPredictor(model, preprocess, tokenizer, regions, templates=templates, device=device, scale=scale,
                        model_name=model_name)
