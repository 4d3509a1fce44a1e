"""Region prompts and their text embeddings: the zero-shot classifier's class weights."""

from __future__ import annotations

import json
import os
import re
import string
from pathlib import Path

import geopandas as gpd
import torch
import torch.nn.functional as F

from lageo_utils.model import autocast, resolve_device
from lageo_utils.regions import PROJECT_ROOT, RegionsError

DEFAULT_TEMPLATE = "A street view photo from {name}, {description}"
PROMPT_FIELDS = ("name", "description", "id", "visual")
TEXT_BATCH = 256  # prompts per text-encoder forward pass
DEFAULT_PROMPT_CONTROLS = PROJECT_ROOT / "regions" / "prompt_controls.json"
# What the text side contributes: does CLIP recognise the place, or read its name?
PROMPT_VARIANTS: dict[str, list[str]] = {
    "name": ["A street view photo from {name}"],
    "seed": [DEFAULT_TEMPLATE],
    "visual": ["A street view photo of {visual}"],  # no name: the place as it looks
    "ensemble": [DEFAULT_TEMPLATE, "A street view photo from {name}", "A photo of a street in {name}, Los Angeles",
                 "A street view photo from {name}: {visual}"],
}


def load_prompt_controls(path: str | os.PathLike | None, regions: gpd.GeoDataFrame) -> dict[str, str]:
    """Visual descriptors by region id, in the authors' format (``{"visual_descriptors": {id: text}}``).

    Refused, naming the region: a descriptor that contains any region's name (it would leak the
    label into a prompt meant to carry none), and a region of ``regions`` without a descriptor.
    """
    path = Path(path) if path is not None else DEFAULT_PROMPT_CONTROLS
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        descriptors = doc["visual_descriptors"]
    except FileNotFoundError:
        raise RegionsError(f"{path}: prompt controls file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RegionsError(f"{path}: expected {{\"visual_descriptors\": {{region id: text}}}} ({exc})") from None
    missing = [rid for rid in regions["id"] if not str(descriptors.get(rid) or "").strip()]
    if missing:
        raise RegionsError(f"{path}: no visual descriptor for regions {missing}")
    names = sorted(_region_names(regions), key=len, reverse=True)  # the longest match names the leak best
    for rid, text in descriptors.items():
        for name in names:
            found = re.search(rf"\b{re.escape(name)}\b", text, flags=re.IGNORECASE)
            if found:
                raise RegionsError(f"{path}: the visual descriptor of region {rid!r} contains the region name "
                                   f"{found.group(0)!r}, which would leak the label: {text!r}")
    return {rid: descriptors[rid] for rid in regions["id"]}


def _region_names(regions: gpd.GeoDataFrame) -> set[str]:
    """Every way a prompt could name a region: its name, the parts of a compound name, its id as words."""
    names = set()
    for region in regions.itertuples():
        names.add(str(region.name))
        names.update(part.strip() for part in re.split(r"&| and ", str(region.name)) if part.strip())
        names.add(str(region.id).replace("_", " "))
    return names


def template_fields(template: str) -> set[str]:
    """The ``{field}`` names a prompt template uses."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def region_prompts(regions: gpd.GeoDataFrame, templates: list[str] | None = None,
                   descriptors: dict[str, str] | None = None) -> list[list[str]]:
    """For each region (in class order), its prompts: one per template, filled with name, description, id and
    (from ``descriptors``, see ``load_prompt_controls``) the visual descriptor.

    A template field that a region lacks (e.g. no ``description`` in the region file) is an
    error naming the region and the field: an empty field would silently change the prompt.
    """
    templates = list(templates or [DEFAULT_TEMPLATE])
    for template in templates:
        unknown = sorted(template_fields(template) - set(PROMPT_FIELDS))
        if unknown:
            raise ValueError(f"prompt template {template!r} uses an unknown field {', '.join(map(repr, unknown))}; "
                             f"available: {', '.join(PROMPT_FIELDS)}")
    needed = set().union(*(template_fields(t) for t in templates))
    prompts = []
    for region in regions.itertuples():
        fields = {"name": region.name, "description": region.description, "id": region.id,
                  "visual": (descriptors or {}).get(region.id)}
        empty = sorted(f for f in needed if not isinstance(fields[f], str) or not fields[f].strip())
        if empty:
            raise RegionsError(f"region {region.id!r} has no {' or '.join(repr(f) for f in empty)}, which the prompt "
                               f"template needs; add it to the region file or use a template without it")
        prompts.append([template.format(**fields) for template in templates])
    return prompts


def encode_region_texts(model, tokenizer, regions: gpd.GeoDataFrame, templates: list[str] | None = None,
                        device=None, descriptors: dict[str, str] | None = None) -> torch.Tensor:
    """Region text embeddings (n_regions x dim, L2-normalised, float32).

    With several templates (a prompt ensemble) each prompt is embedded and normalised, the
    embeddings of a region are averaged and the mean renormalised, as open_clip's
    ``build_zero_shot_classifier`` does (a test checks the two agree).
    """
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    prompts = region_prompts(regions, templates, descriptors)
    flat = [text for group in prompts for text in group]
    parts = []
    with torch.no_grad(), autocast(device):  # no_grad, not inference_mode: callers may fine-tune against these
        for start in range(0, len(flat), TEXT_BATCH):
            tokens = tokenizer(flat[start : start + TEXT_BATCH]).to(device)
            parts.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(parts).reshape(len(prompts), len(prompts[0]), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)
