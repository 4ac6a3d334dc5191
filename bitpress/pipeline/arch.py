"""What the pipeline knows about named decoder architectures (everything else in it finds
blocks and linears without names, :mod:`bitpress.pipeline.skeleton`).

:data:`FUSED_PROJECTIONS`: per ``model_type``, the sibling linears of a block that read the
same input (the multi-member groups :func:`~bitpress.pipeline.capture.sequential_groups`
finds by probing a block), which :func:`bitpress.nn.fuse.fuse_linears` runs as one packed
call. Families not listed use :data:`LLAMA_STYLE`.
"""
from __future__ import annotations

from typing import Any

#: attention q/k/v and the gated MLP's gate/up (Llama, Mistral, Qwen2/3, Gemma 3, ...)
LLAMA_STYLE: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)

FUSED_PROJECTIONS: dict[str, tuple[tuple[str, ...], ...]] = {
    "llama": LLAMA_STYLE,
    "mistral": LLAMA_STYLE,
    "qwen2": LLAMA_STYLE,
    "qwen3": LLAMA_STYLE,
    "gemma3": LLAMA_STYLE,
    "gemma3_text": LLAMA_STYLE,
    "smollm3": LLAMA_STYLE,
    "gpt2": (),  # c_attn is already one linear; c_fc has no sibling
}


def model_type(model_or_config: Any) -> str | None:
    """The ``model_type`` of a model or config (a multimodal config's text part)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "model_type", None)


def fused_projections(model_or_config: Any) -> tuple[tuple[str, ...], ...]:
    """The groups of sibling linear names that share an input in this architecture."""
    return FUSED_PROJECTIONS.get(model_type(model_or_config) or "", LLAMA_STYLE)
