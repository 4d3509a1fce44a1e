"""What a run's backbone can do: an image-only backbone (``timm:<name>``, e.g. DINOv2) has no text tower, so the
text-side methods are skipped with a reason instead of failing.

Pure Python on the run parameters (no torch): the pipeline's preflight, the step bookkeeping in
``lageo_utils.runs`` and the report all decide from the same rules.
"""

from __future__ import annotations

from lageo_utils.params import PEER_METHODS, STRATEGIES

IMAGE_ONLY_PREFIX = "timm:"  # mirrors lageo_utils.model.TIMM_PREFIX (a test keeps them equal)
TEXT_STRATEGIES = ("zeroshot", "text_scale", "contrastive")  # mirrors lageo_utils.training.config (tested)
IMAGE_STRATEGIES = tuple(s for s in STRATEGIES if s not in TEXT_STRATEGIES)
# Coordinate methods answered from image embeddings alone: the only ones a backbone without any region head (an
# image-only backbone before training) can answer. The others need region probabilities.
EMBEDDING_METHODS = ("retrieval", "geocell")
PROBABILITY_METHODS = ("centroid", "expected", "region_retrieval")  # need region probabilities
NO_TEXT = "image-only backbone, no text tower"


def is_image_only(model_name: str) -> bool:
    """Whether ``model_name`` names an image-only backbone (``timm:<name>``) rather than CLIP."""
    return str(model_name).startswith(IMAGE_ONLY_PREFIX)


def requested_strategies(params: dict) -> list[str]:
    """``strategies``, or the one ``strategy``: what the parameters ask step 03 to train."""
    return list(params["strategies"] or [params["strategy"]])


def trained_strategies(params: dict) -> list[str]:
    """The strategies step 03 trains: the requested ones, less the text-side ones for an image-only backbone."""
    requested = requested_strategies(params)
    return [s for s in requested if s not in TEXT_STRATEGIES] if is_image_only(params["model"]) else requested


def frozen_methods(params: dict) -> list[str]:
    """The coordinate methods step 02 answers for the model before training: every one of ``geo_methods`` for CLIP
    (zero-shot gives region probabilities), only the embedding-only ones for an image-only backbone. Peer methods
    (GeoCLIP) are answered apart, by their own model."""
    methods = ["centroid", *(m for m in params["geo_methods"] if m != "centroid" and m not in PEER_METHODS)]
    return [m for m in methods if m in EMBEDDING_METHODS] if is_image_only(params["model"]) else methods


def skipped_methods(params: dict) -> dict[str, str]:
    """What a run with these parameters skips, by name, with the reason; empty for CLIP.

    Steps 02 and 03 show it in their notebooks; step 04 writes it to ``metrics.json`` (``skipped``)
    and the report shows it under its header.
    """
    if not is_image_only(params["model"]):
        return {}
    skipped = {"zero-shot classification (step 02)": f"{NO_TEXT}: no region prompts to compare images with"}
    if params["prompt_variants"]:
        skipped[f"prompt variants ({', '.join(params['prompt_variants'])})"] = f"{NO_TEXT}: prompts are text"
    frozen = [m for m in PROBABILITY_METHODS if m == "centroid" or m in params["geo_methods"]]
    if frozen:
        skipped[f"{', '.join(frozen)} before fine-tuning"] = (
            "no region probabilities without a text tower or a trained head (answered by the fine-tuned model)")
    text = [s for s in requested_strategies(params) if s in TEXT_STRATEGIES]
    if text:
        skipped[f"strategies {', '.join(text)}"] = f"{NO_TEXT}: they train or use the region prompts' embeddings"
    encoder = [s for s in trained_strategies(params) if s in ("partial", "lora", "full")]
    if encoder and len(params["wise_alphas"]) > 1:
        skipped["WiSE-FT"] = f"{NO_TEXT}: it interpolates towards a zero-shot head, and there is none"
    return skipped


def skipped_markdown(skipped: dict[str, str]) -> str:
    """The visible note: ``Text-side methods skipped: ...`` (empty when nothing was skipped)."""
    if not skipped:
        return ""
    items = "\n".join(f"- **{name}**: {reason}" for name, reason in skipped.items())
    return (f"> **Text-side methods skipped: {', '.join(skipped)}.** The backbone is image-only (no text tower); "
            "the image-side methods ran.\n\n" + items)

