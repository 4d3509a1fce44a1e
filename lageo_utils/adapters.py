"""LoRA adapters on the image encoder (through ``peft``), shared by training and inference.

A LoRA checkpoint stores only the adapters and the head; loading it adds adapters of the same
shape to the base encoder its config names and fills them in.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

# Attention and MLP of each transformer block: open_clip's ViT (``attn`` is nn.MultiheadAttention, ``mlp.c_fc``,
# ``mlp.c_proj``) and timm's ViT (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``).
CLIP_LORA_TARGETS = ("attn", "c_fc", "c_proj")
TIMM_LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


def add_lora(visual: nn.Module, rank: int, alpha: float, targets: Sequence[str] | None = None,
             dropout: float = 0.0) -> nn.Module:
    """Add LoRA adapters to the modules named ``targets`` (default: every block's attention and MLP); only the
    adapters stay trainable.

    The adapters start at zero (``lora_B`` is zero-initialised), so the encoder's output is unchanged.
    """
    from peft import LoraConfig, inject_adapter_in_model  # imported here: peft pulls in transformers

    names = {name.rsplit(".", 1)[-1] for name, _ in visual.named_modules()}
    if targets is None:
        targets = CLIP_LORA_TARGETS if "c_fc" in names else TIMM_LORA_TARGETS
    missing = sorted(set(targets) - names)
    if missing:
        raise ValueError(f"lora_targets {missing} name no module of the image encoder ({type(visual).__name__}); "
                         f"open_clip ViTs have {', '.join(CLIP_LORA_TARGETS)}, timm ViTs {', '.join(TIMM_LORA_TARGETS)}")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout)
    visual = inject_adapter_in_model(config, visual)
    for name, param in visual.named_parameters():
        param.requires_grad_(is_lora_parameter(name))
    return visual


def is_lora_parameter(name: str) -> bool:
    return "lora_" in name


def merge_lora(visual: nn.Module) -> nn.Module:
    """The encoder with its adapters folded into the base weights: plain modules, the same outputs and the base's
    state-dict keys (what WiSE-FT interpolates)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for parent in list(visual.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, BaseTunerLayer):
                continue
            if hasattr(child, "unload_and_optionally_merge_module"):  # nn.MultiheadAttention needs peft's extra steps
                base = child.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
            else:
                child.merge()
                base = child.get_base_layer()
            setattr(parent, name, base)
    return visual
