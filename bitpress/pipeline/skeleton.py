"""The model skeleton on the meta device, discovery of its decoder blocks and their linears,
and materialising tensors from a :class:`~bitpress.pipeline.tensorstore.TensorStore`.

:func:`find_blocks`: the decoder block list is the outermost ``nn.ModuleList`` of identical
modules that contain linears (preferring one whose length is the config's layer count) —
``model.layers`` (Llama, Qwen2, Gemma, Mistral), ``transformer.h`` (GPT-2),
``gpt_neox.layers``, ``model.decoder.layers`` (OPT), … without naming any.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError, FormatError
from ..nn.recipe import is_linear
from .tensorstore import TensorStore


def build_skeleton(config) -> nn.Module:
    """The causal LM of ``config`` with every parameter on the meta device (buffers such
    as rotary frequencies are real: they are computed, not stored)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            # float32 whatever the config's dtype: the calibration forwards and the passes
            # compute in float32 (an fp16 config would otherwise make fp16 parameters)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError/KeyError/...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"unsupported architecture {getattr(config, 'model_type', '?')!r}: "
                          f"transformers cannot build it as a causal LM ({msg})") from None
    return model.eval()


def _num_layers(config) -> Optional[int]:
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(config, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, module list) of the decoder blocks of ``model``."""
    cands: list[tuple[str, nn.ModuleList]] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if len({type(c) for c in m}) != 1:
            continue
        if not any(is_linear(x) for x in m[0].modules()):
            continue
        cands.append((name, m))
    # outermost only (expert lists inside a block are not the block list)
    cands = [(n, m) for n, m in cands
             if not any(n != o and n.startswith(o + ".") for o, _ in cands)]
    if not cands:
        raise ConfigError(f"unsupported architecture {type(model).__name__}: no list of "
                          f"decoder blocks with linear layers was found")
    nl = _num_layers(model.config)
    exact = [c for c in cands if len(c[1]) == nl]
    return max(exact or cands, key=lambda c: len(c[1]))


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Relative name → linear (``nn.Linear`` or GPT-2 ``Conv1D``) inside one block."""
    return {n: m for n, m in block.named_modules() if is_linear(m)}


def linear_weight(m: nn.Module) -> torch.Tensor:
    """Float32 ``[out, in]`` view of a linear's weight (Conv1D stores ``[in, out]``)."""
    w = m.weight.detach()
    return (w.t() if type(m).__name__ == "Conv1D" else w).float()


def set_linear_weight(m: nn.Module, w: torch.Tensor) -> None:
    w = w.t().contiguous() if type(m).__name__ == "Conv1D" else w.contiguous()
    m.weight.data = w.to(m.weight.dtype)


def materialize(model: nn.Module, names: list[str], store: TensorStore,
                dtype: Optional[torch.dtype] = torch.float32,
                device: torch.device | str = "cpu") -> None:
    """Read ``names`` (state-dict keys) from ``store`` into ``model`` (floats as ``dtype``;
    ``None``: as stored)."""
    from accelerate.utils import set_module_tensor_to_device

    sd = model.state_dict(keep_vars=True)
    for k in names:
        ref = sd[k]
        t = store.get(k)
        if tuple(t.shape) != tuple(ref.shape):
            raise FormatError(f"tensor {k!r} has shape {tuple(t.shape)} in the source, the "
                              f"model expects {tuple(ref.shape)}; the weights and the config "
                              f"do not belong together")
        if t.is_floating_point() and dtype is not None:
            t = t.to(dtype)
        set_module_tensor_to_device(model, k, device, value=t,
                                    dtype=t.dtype if t.is_floating_point() else None)
