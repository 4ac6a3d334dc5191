"""``bitpress export --format compressed-tensors``: dense group-quantized checkpoints as
compressed-tensors ``pack-quantized`` (what vLLM and transformers' compressed-tensors
integration load).

Mapping (bitpress ``W = s·c + z`` with signed codes ``c``; compressed-tensors
``W = (q - zp)·s`` with signed ``q``): ``q = c``, same ``s``, ``zp = -z/s``, which must be
an integer in the code range. Per-channel modules (``group_size=-1``) become strategy
``channel``; a checkpoint whose zeros are all 0 is written ``symmetric`` (no zero points).

* ``weight_packed`` int32 ``[out, ceil(in·b/32)]``: codes + 2^(b-1), element ``i`` of a row
  at bit ``i·b`` of the row's bit stream (little-endian words; a 3-bit code may straddle two
  words). For 2, 4 and 8 bits this is bit-identical to bitpress's ``qweight``.
* ``weight_scale`` ``[out, n_groups]`` (the stored dtype, or float32 with
  ``scale_dtype=torch.float32``), ``weight_shape`` int64 ``[out, in]``, and for asymmetric
  schemes ``weight_zero_point`` int32, the integer zero points packed the same way along the
  output dimension (``[ceil(out·b/32), n_groups]``).

Zeros off the integer grid (decoupleQ, fine-tuned float parts, and the fp16 rounding of
``s·k`` in RTN/GPTQ checkpoints) cannot be written exactly: the exporter rounds ``zp``,
reports the weight error it introduces (always printed), and refuses when it exceeds
``max_zero_error`` quantization steps unless asked to round.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ConfigError, FormatError, OutputExistsError

log = logging.getLogger(__name__)

#: default refusal threshold: largest zero-point error, in quantization steps
DEFAULT_MAX_ZERO_ERROR = 1.0 / 64


def pack_bitstream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed int8 codes ``[rows, n]`` → int32 ``[rows, ceil(n·bits/32)]``: unsigned
    ``c + 2^(b-1)`` written densely, element ``i`` at bit ``i·bits`` of the row (the
    compressed-tensors ``pack_to_int32`` layout, independently implemented)."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise FormatError("pack_bitstream needs 2-D int8 codes")
    if not 1 <= bits <= 8:
        raise ConfigError(f"bits must be in 1..8, got {bits}")
    rows, n = codes.shape
    u = codes.to(torch.int64) + (1 << (bits - 1))
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= (1 << bits)):
        raise FormatError(f"codes out of range for {bits}-bit")
    blocks = (n + 31) // 32  # 32 codes fill exactly `bits` words
    u = torch.nn.functional.pad(u, (0, blocks * 32 - n)).reshape(rows, blocks, 32)
    out = torch.zeros(rows, blocks, bits, dtype=torch.int64)
    for i in range(32):
        word, off = divmod(i * bits, 32)
        out[:, :, word] |= (u[:, :, i] << off) & 0xFFFFFFFF
        if off + bits > 32:
            out[:, :, word + 1] |= u[:, :, i] >> (32 - off)
    out = out.reshape(rows, blocks * bits)[:, : (n * bits + 31) // 32]
    out = torch.where(out >= (1 << 31), out - (1 << 32), out)
    return out.to(torch.int32).contiguous()


def integer_zero_points(scale: torch.Tensor, zero: torch.Tensor, bits: int
                        ) -> tuple[torch.Tensor, dict[str, float]]:
    """``zp = round(-z/s)`` clamped to the signed code range, and what it costs: the weight
    error of every element of a group is exactly ``-zp·s - z`` (float64)."""
    s, z = scale.double(), zero.double()
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    zp = torch.round(-z / s).clamp(lo, hi)
    err = (-zp * s - z).abs()
    steps = err / s
    stats = {"groups": int(z.numel()), "groups_inexact": int((err > 0).sum()),
             "max_abs_weight_error": float(err.max()) if err.numel() else 0.0,
             "max_error_in_steps": float(steps.max()) if err.numel() else 0.0,
             "mean_error_in_steps": float(steps.mean()) if err.numel() else 0.0}
    return zp.to(torch.int8), stats


def as_exported(model) -> dict[str, float]:
    """Replace, in place, every dense packed module's zeros by ``-zp·s`` (float32 scales and
    zeros): the exact weights a compressed-tensors export of ``model`` decompresses to. Returns
    the summed zero-point statistics (for measuring what the rounding costs)."""
    from ..nn.modules import QuantLinear
    from ..pipeline.checkpoint import packed_modules

    total = {"groups": 0, "groups_inexact": 0, "max_error_in_steps": 0.0}
    for m in packed_modules(model).values():
        if not isinstance(m, QuantLinear) or bool((m.zeros == 0).all()):
            continue
        zp, st = integer_zero_points(m.scales, m.zeros, m.bits)
        s = m.scales.float()
        m.scales, m.zeros = s, (-zp.double() * s.double()).float()
        total["groups"] += st["groups"]
        total["groups_inexact"] += st["groups_inexact"]
        total["max_error_in_steps"] = max(total["max_error_in_steps"], st["max_error_in_steps"])
    return total


def _scheme_key(m) -> tuple:
    return (m.bits, m.group_size, bool((m.zeros == 0).all()))


def export_compressed_tensors(src: str | os.PathLike, out_dir: str | os.PathLike,
                              scale_dtype: Optional[torch.dtype] = None,
                              max_zero_error: float = DEFAULT_MAX_ZERO_ERROR,
                              allow_rounding: bool = False, overwrite: bool = False,
                              progress: bool = True) -> dict[str, Any]:
    """Write the dense bitpress checkpoint ``src`` as a compressed-tensors ``pack-quantized``
    directory ``out_dir`` (atomically; ``src`` is only read). Returns a report including the
    zero-point error (see :func:`integer_zero_points`)."""
    from tqdm import tqdm

    from ..formats import atomic_output_dir
    from ..formats.checkpoint import write_json, write_shards
    from ..nn.modules import GroupSparseLinear, QuantLinear
    from ..pipeline.checkpoint import _dedup_state_dict, load, load_tokenizer, packed_modules
    from ..pipeline.source import open_source

    info = open_source(src)
    if info.kind != "bitpress":
        raise ConfigError(f"{src} is not a bitpress checkpoint (it is a {info.kind} model)")
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {out} already exists; choose another path "
                                f"or pass --force to replace it")
    model = load(info.path, dtype=None)
    mods = packed_modules(model)
    sparse = [n for n, m in mods.items() if isinstance(m, GroupSparseLinear)]
    if sparse:
        raise ConfigError(f"{src} has group-sparse modules ({sparse[0]}, ...); compressed-"
                          f"tensors pack-quantized is dense: export those with --format float")
    ragged = [(n, m.in_features, m.group_size) for n, m in mods.items()
              if m.group_size != -1 and m.in_features % m.group_size]
    if ragged:
        n, i, g = ragged[0]
        raise ConfigError(f"compressed-tensors' group strategy needs every row length to be a "
                          f"multiple of the group size; {n} has {i} inputs at group size {g} "
                          f"({len(ragged)} such modules). Compress with a group size that "
                          f"divides the row lengths (e.g. 32 or 64 for 576-wide rows), or "
                          f"export with --format float")
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[tuple, list[str]] = {}
    total = {"groups": 0, "groups_inexact": 0, "max_abs_weight_error": 0.0,
             "max_error_in_steps": 0.0}
    prefixes = tuple(n + "." for n in mods)
    for k, v in _dedup_state_dict(model).items():
        if not k.startswith(prefixes):
            tensors[k] = v
    for name, m in tqdm(mods.items(), desc="compressed-tensors", disable=not progress):
        assert isinstance(m, QuantLinear)
        qw = m.quantized_weight()
        key = _scheme_key(m)
        groups.setdefault(key, []).append(name)
        tensors[f"{name}.weight_packed"] = pack_bitstream(qw.codes, m.bits)
        sd = scale_dtype or m.scales.dtype
        tensors[f"{name}.weight_scale"] = m.scales.to(sd).contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features])
        if not key[2]:
            zp, st = integer_zero_points(m.scales, m.zeros, m.bits)
            tensors[f"{name}.weight_zero_point"] = pack_bitstream(zp.t().contiguous(),
                                                                  m.bits).t().contiguous()
            total["groups"] += st["groups"]
            total["groups_inexact"] += st["groups_inexact"]
            for f in ("max_abs_weight_error", "max_error_in_steps"):
                total[f] = max(total[f], st[f])
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias
    exact = total["groups_inexact"] == 0
    msg = ("zero points: exact (every zero is an integer number of steps)" if exact else
           f"zero points: {total['groups_inexact']} of {total['groups']} groups are not on the "
           f"integer grid; rounding them changes weights by up to "
           f"{total['max_abs_weight_error']:.3g} ({total['max_error_in_steps']:.3g} steps)")
    print(f"bitpress export: {msg}")
    if not exact and total["max_error_in_steps"] > max_zero_error and not allow_rounding:
        raise ConfigError(f"{msg}, more than the allowed {max_zero_error:g} steps; the "
                          f"checkpoint's zeros are free floats (decoupleQ / fine-tuned). Pass "
                          f"--allow-rounding to export the rounded weights anyway, or "
                          f"compress with integer zero points (--integer-zeros)")
    config_groups = {}
    for i, ((bits, gs, sym), names) in enumerate(sorted(groups.items())):
        config_groups[f"group_{i}"] = {
            "targets": [f"re:^{n.replace('.', '[.]')}$" for n in names],
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym,
                        "strategy": "channel" if gs == -1 else "group",
                        "group_size": None if gs == -1 else gs, "dynamic": False,
                        "actorder": None, "observer": "minmax"},
            "input_activations": None, "output_activations": None,
            "format": "pack-quantized"}
    linear_names = [n for n, mod in model.named_modules()
                    if isinstance(mod, torch.nn.Linear) and n not in mods]
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("auto_map", None)
    try:
        from compressed_tensors import __version__ as ct_version
    except ImportError:
        ct_version = "0.20.1"
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "quantization_status": "compressed", "config_groups": config_groups,
        "ignore": linear_names, "kv_cache_scheme": None, "sparsity_config": {},
        "global_compression_ratio": None, "version": ct_version}
    tok = load_tokenizer(info.path)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_shards(tensors, tmp)
        write_json(tmp / "config.json", config)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return {"source": str(src), "out": str(out), "format": "compressed-tensors",
            "linears": len(mods), "schemes": [list(k) for k in groups],
            "zero_points_exact": exact, **total,
            "weights_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}
