"""Region prompts and their text embeddings: the zero-shot classifier's class weights."""

from __future__ import annotations

import string

import geopandas as gpd
import torch
import torch.nn.functional as F

from lageo_utils.model import autocast, resolve_device
from lageo_utils.regions import RegionsError

DEFAULT_TEMPLATE = "A street view photo from {name}, {description}"
PROMPT_FIELDS = ("name", "description", "id")
TEXT_BATCH = 256  # prompts per text-encoder forward pass


def template_fields(template: str) -> set[str]:
    """The ``{field}`` names a prompt template uses."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def region_prompts(regions: gpd.GeoDataFrame, templates: list[str] | None = None) -> list[list[str]]:
    """For each region (in class order), its prompts: one per template, filled with name, description and id.

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
        fields = {"name": region.name, "description": region.description, "id": region.id}
        empty = sorted(f for f in needed if not isinstance(fields[f], str) or not fields[f].strip())
        if empty:
            raise RegionsError(f"region {region.id!r} has no {' or '.join(repr(f) for f in empty)}, which the prompt "
                               f"template needs; add it to the region file or use a template without it")
        prompts.append([template.format(**fields) for template in templates])
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
