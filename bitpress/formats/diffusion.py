"""On-disk format of diffusion checkpoints (safetensors + JSON, no pickle).

* a quantized U-Net (:meth:`bitpress.cache.QuantizedUNet.save`): ``unet.safetensors`` (every
  tensor of the U-Net: int8 codes, scales, per-step grids, float norms/embeddings; DEC tensors
  under ``dec.quant.``) and ``quant.json`` (``format`` ``bitpress-diffusion-ptq`` v1: the
  diffusers class and config, steps, bits, guard, per-layer geometry, float layers);
* a CacheQuant model (:meth:`bitpress.cache.CacheQuantModel.save`): ``cachequant.json``
  (``format`` ``bitpress-cachequant`` v1: plan, scheduler, steps), ``plan.safetensors`` and
  the U-Net in ``unet/`` (a quantized U-Net as above, or a diffusers ``save_pretrained``
  directory).

This module reads and writes the files; :mod:`bitpress.cache` builds the models.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError, SourceError
from .checkpoint import atomic_output_dir, write_json

FORMAT = "bitpress-diffusion-ptq"
FORMAT_VERSION = 1
TENSORS_FILE = "unet.safetensors"
META_FILE = "quant.json"

CQ_FORMAT = "bitpress-cachequant"
CQ_VERSION = 1
CQ_META = "cachequant.json"
CQ_PLAN = "plan.safetensors"


def read_format_json(file: Path, fmt: str, version: int) -> dict[str, Any]:
    """The JSON metadata of a saved directory, checked for its ``format`` / ``format_version``
    (no pickle anywhere)."""
    try:
        meta = json.loads(Path(file).read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt or meta.get("format_version") != version:
        got = (meta.get("format"), meta.get("format_version")) if isinstance(meta, dict) else None
        raise FormatError(f"{file}: expected format {fmt} v{version}, got {got}")
    return meta


def save_quantized_unet(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                        overwrite: bool = False) -> Path:
    """Write ``tensors`` and ``meta`` (``format`` / ``format_version`` added) as a quantized
    U-Net directory, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
        write_json(tmp / META_FILE, {"format": FORMAT, "format_version": FORMAT_VERSION, **meta})
    return Path(path)


def load_quantized_unet(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a quantized U-Net directory, its format checked."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / META_FILE).is_file() or not (path / TENSORS_FILE).is_file():
        raise SourceError(f"{path} is not a quantized U-Net directory (needs {META_FILE} and "
                          f"{TENSORS_FILE})")
    meta = read_format_json(path / META_FILE, FORMAT, FORMAT_VERSION)
    return meta, load_file(str(path / TENSORS_FILE))


def write_cachequant_files(directory: Path, plan_tensors: dict[str, torch.Tensor],
                           meta: dict[str, Any]) -> None:
    """The plan tensors and ``cachequant.json`` of a CacheQuant directory being written (the
    caller writes ``unet/`` and owns the atomic output)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in plan_tensors.items()}, str(directory / CQ_PLAN))
    write_json(directory / CQ_META, {"format": CQ_FORMAT, "format_version": CQ_VERSION, **meta})


def read_cachequant_files(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, plan tensors)`` of a CacheQuant directory, its format checked."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CQ_META).is_file():
        raise SourceError(f"{path} is not a CacheQuant directory (no {CQ_META})")
    meta = read_format_json(path / CQ_META, CQ_FORMAT, CQ_VERSION)
    plan = load_file(str(path / CQ_PLAN)) if (path / CQ_PLAN).is_file() else {}
    return meta, plan
