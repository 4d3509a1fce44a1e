"""Zero-shot geolocation: region text prompts, CLIP similarities, and the predictions table."""

from __future__ import annotations

import logging
import os

import geopandas as gpd
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from lageo_utils.geo import haversine_km
from lageo_utils.images import open_rgb, to_rgb
from lageo_utils.model import autocast, load_clip, resolve_device
from lageo_utils.regions import assign_regions

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "A street view photo from {name}, {description}"
SCALES = ("learned", "none")
TEXT_BATCH = 256  # prompts per text-encoder forward pass


def region_prompts(regions: gpd.GeoDataFrame, templates: list[str] | None = None) -> list[list[str]]:
    """For each region (in class order), its prompts: one per template, filled with name, description and id."""
    templates = list(templates or [DEFAULT_TEMPLATE])
    prompts = []
    for region in regions.itertuples():
        fields = {"name": region.name, "description": region.description, "id": region.id}
        try:
            prompts.append([template.format(**fields) for template in templates])
        except (KeyError, IndexError) as exc:
            raise ValueError(f"prompt template uses an unknown field {exc}; available: name, description, id") from None
    return prompts


def encode_region_texts(model, tokenizer, regions: gpd.GeoDataFrame, templates: list[str] | None = None,
                        device=None) -> torch.Tensor:
    """Region text embeddings (n_regions x dim, L2-normalised, float32).

    With several templates (a prompt ensemble) each prompt is embedded and normalised, the
    embeddings of a region are averaged and the mean renormalised, as open_clip's
    ``build_zero_shot_classifier`` does (a test checks the two agree).
    """
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    prompts = region_prompts(regions, templates)
    flat = [text for group in prompts for text in group]
    parts = []
    with torch.no_grad(), autocast(device):  # no_grad, not inference_mode: callers may fine-tune against these
        for start in range(0, len(flat), TEXT_BATCH):
            tokens = tokenizer(flat[start : start + TEXT_BATCH]).to(device)
            parts.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(parts).reshape(len(prompts), len(prompts[0]), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


class GeoPredictor:
    """Zero-shot region classifier: an image's region probabilities from CLIP similarities.

    ``scale="learned"`` (default) multiplies cosine similarities by the model's learned
    temperature ``exp(logit_scale)`` (100 for OpenAI CLIP) before the softmax, as CLIP was
    trained. The seed code applied the softmax to unscaled cosines, which squeezes every
    probability towards 1 / n_regions; ``scale="none"`` reproduces that.
    """

    def __init__(self, model, preprocess, tokenizer, regions: gpd.GeoDataFrame, templates: list[str] | None = None,
                 device="auto", scale: str = "learned", model_name: str | None = None,
                 text_features: torch.Tensor | None = None):
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.regions = regions.reset_index(drop=True)
        self.region_ids: list[str] = self.regions["id"].tolist()
        self.centroids = self.regions[["centroid_lat", "centroid_lon"]].to_numpy(dtype=float)
        self.templates = list(templates or [DEFAULT_TEMPLATE])
        self.scale = scale
        self.model_name = model_name
        # Callers with class embeddings of their own (a fine-tuned head) skip encoding the prompts.
        self.text_features = (text_features.to(self.device) if text_features is not None
                              else encode_region_texts(model, tokenizer, self.regions, self.templates, self.device))

    def logits(self, image_features) -> torch.Tensor:
        """Region logits (n x n_regions) for image embeddings (normalised here if they are not)."""
        features = torch.as_tensor(image_features, dtype=torch.float32, device=self.text_features.device)
        cosines = F.normalize(torch.atleast_2d(features), dim=-1) @ self.text_features.T
        if self.scale == "none":
            return cosines
        return self.model.logit_scale.detach().float().exp() * cosines

    def probabilities(self, embeddings) -> np.ndarray:
        """Softmax region probabilities (n x n_regions, float64) for image embeddings."""
        with torch.no_grad():
            return self.logits(embeddings).double().softmax(dim=-1).cpu().numpy()

    def predict_embeddings(self, embeddings, top_k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Indices into the regions (n x k) and their probabilities, best first."""
        probs = self.probabilities(embeddings)
        top_idx = top_k_indices(probs, top_k)
        return top_idx, np.take_along_axis(probs, top_idx, axis=1)

    def embed_image(self, image_or_path: Image.Image | str | os.PathLike) -> torch.Tensor:
        """The L2-normalised embedding (1 x dim) of one image or image file (ImageReadError if unreadable)."""
        image = to_rgb(image_or_path) if isinstance(image_or_path, Image.Image) else open_rgb(image_or_path)
        pixels = self.preprocess(image).unsqueeze(0).to(self.device)
        with torch.no_grad(), autocast(self.device):
            features = self.model.encode_image(pixels)
        return F.normalize(features.float(), dim=-1)

    def predict(self, image_or_path, top_k: int = 5) -> tuple[list[tuple[float, float]], list[float]]:
        """The seed's contract: ``(top_pred_gps, top_pred_prob)``, region centroids and probabilities, best first."""
        top_idx, top_prob = self.predict_embeddings(self.embed_image(image_or_path), top_k)
        gps = [(float(lat), float(lon)) for lat, lon in self.centroids[top_idx[0]]]
        return gps, [float(p) for p in top_prob[0]]


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
    from lageo_utils.embed import embed_manifest

    result = embed_manifest(predictor.model, predictor.preprocess, manifest, image_root, cache_dir=cache_dir,
                            batch_size=batch_size, device=predictor.device, model_name=predictor.model_name)
    probs = predictor.probabilities(result.embeddings)
    table = predictions_from_probs(manifest.iloc[result.rows], probs, predictor.regions, top_k)
    table.attrs["failures"] = result.failures.to_dict(orient="records")
    if len(result.failures):
        log.warning("%d images could not be read and have no prediction: %s", len(result.failures),
                    "; ".join(f"{r.image_path} ({r.reason})" for r in result.failures.head(5).itertuples()))
    return table


def load_predictor(model_name: str, pretrained, regions: gpd.GeoDataFrame, checkpoint=None, device="auto",
                   templates: list[str] | None = None, scale: str = "learned"):
    """A ready predictor: zero-shot CLIP, or the fine-tuned model in ``checkpoint`` (model name and weights then come
    from the checkpoint's own config)."""
    if checkpoint is not None:
        if templates is not None or scale != "learned":
            raise ValueError("templates and scale come from the checkpoint's own config; do not pass them with it")
        from lageo_utils.finetune import load_finetuned  # imports the training stack only when needed

        return load_finetuned(checkpoint, regions, device)
    model, preprocess, tokenizer = load_clip(model_name, pretrained, device=device)
    return GeoPredictor(model, preprocess, tokenizer, regions, templates=templates, device=device, scale=scale,
                        model_name=model_name)
