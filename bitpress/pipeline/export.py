"""``bitpress export``: a bitpress checkpoint back to a plain Hugging Face model directory.

Every packed linear is dequantized (``scale * code + zero``, pruned groups 0) into an
``nn.Linear`` holding exactly the weight the reference op multiplies by; norms, embeddings
and biases keep the values stored in the checkpoint (including any that ``bitpress
finetune`` trained). The result is an ordinary safetensors directory that transformers (or
any other tool) loads without bitpress, and that ``bitpress compress`` accepts as a source:
compressing an exported group-sparse model again at a higher sparsity prunes in stages
(the groups already pruned are zero, so they cost nothing to prune again).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..formats.checkpoint import atomic_output_dir, check_output_path
from ..nn.modules import HalfLinear, _PackedLinear
from ..nn.recipe import set_submodule
from .checkpoint import load, load_tokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _conv1d_names(config) -> set[str]:
    """Names of the modules that the architecture builds as GPT-2 style ``Conv1D`` (weight
    stored ``[in, out]``), from a weightless skeleton."""
    from accelerate import init_empty_weights

    from .source import _require_transformers

    with init_empty_weights():
        skel = _require_transformers().AutoModelForCausalLM.from_config(config)
    return {n for n, m in skel.named_modules() if type(m).__name__ == "Conv1D"}


def unpack_linears(model: nn.Module) -> int:
    """Replace, in place, every packed module and :class:`~bitpress.nn.modules.HalfLinear`
    of ``model`` with an fp32 float module of the same weight: ``nn.Linear``, or ``Conv1D``
    where the architecture has one (GPT-2), so that the state dict has the architecture's
    own names and shapes. Returns how many modules were replaced."""
    names = [n for n, m in model.named_modules() if isinstance(m, (_PackedLinear, HalfLinear))]
    conv1d = _conv1d_names(model.config) if names else set()
    for name in names:
        m = model.get_submodule(name)
        w = (m.dequantize() if isinstance(m, _PackedLinear) else m.weight).float()
        if name in conv1d:
            from transformers.pytorch_utils import Conv1D

            new = Conv1D(m.out_features, m.in_features).to(w.device)
            w = w.t()
        else:
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                            device=w.device)
        with torch.no_grad():
            new.weight.copy_(w)
            if m.bias is not None:
                new.bias.copy_(m.bias.float())
            elif getattr(new, "bias", None) is not None:  # Conv1D always has one
                new.bias.zero_()
        set_submodule(model, name, new)
    return len(names)


def export_float(src: str | os.PathLike, out_dir: str | os.PathLike,
                 dtype: torch.dtype = torch.float32, overwrite: bool = False) -> dict[str, Any]:
    """Write the bitpress checkpoint ``src`` as a float Hugging Face directory ``out_dir``
    (safetensors weights in ``dtype``, config without ``quantization_config``, tokenizer),
    atomically. ``src`` is only read."""
    from .source import open_source

    if dtype not in DTYPES.values():
        raise ConfigError(f"export dtype must be one of {sorted(DTYPES)}, got {dtype}")
    src_info = open_source(src)
    if src_info.kind != "bitpress":
        raise ConfigError(f"{src} is not a bitpress checkpoint (it is a {src_info.kind} "
                          f"model); export turns packed checkpoints back into float ones")
    # before the (slower) load; existence is checked again on write
    out = check_output_path(out_dir, [src], overwrite)
    model = load(src_info.path)
    tok = load_tokenizer(src_info.path)
    n = unpack_linears(model)
    model.to(dtype)
    quantizer = getattr(model, "hf_quantizer", None)  # load() attaches bitpress's
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    return {"source": str(src), "out": str(out), "linears": n,
            "dtype": str(dtype).replace("torch.", ""), "weights_bytes": size}
