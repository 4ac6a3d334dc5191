"""``bitpress inspect``: what a checkpoint holds and what it costs, from the safetensors
headers (no weights are read unless a code histogram is asked for)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ..formats import SafetensorsDir, effective_group_size
from ..kernels import native
from ..errors import FormatError
from .checkpoint import load_hf_config, scheme_tensors

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_PACKED = ("qweight", "scales", "zeros", "row_ptr", "col_idx", "keep_bits", "qvalues")
#: the format-3 guard of a packed module (16 bytes of metadata, counted in neither)
_GUARD = "weight"


def _nbytes(files: SafetensorsDir, key: str) -> int:
    return math.prod(files.shapes[key]) * _DTYPE_BYTES.get(files.dtypes[key], 4)


def inspect_checkpoint(directory: str | os.PathLike, histogram: bool = False) -> dict[str, Any]:
    d = Path(directory)
    config, qcfg = load_hf_config(d)
    files = SafetensorsDir(d)
    validate_packed_tensors(files, qcfg)
    layers = []
    q_bytes = q_weights = 0
    for name, scheme in qcfg["modules"].items():
        keys = [f"{name}.{k}" for k in _PACKED if f"{name}.{k}" in files]
        nb = sum(_nbytes(files, k) for k in keys)
        out, in_f = scheme["out_features"], scheme["in_features"]
        n_groups = files.shapes[f"{name}.scales"][1] if scheme["format"] == "dense" else None
        numel = out * in_f
        row: dict[str, Any] = {
            "name": name, "format": scheme["format"], "bits": scheme["bits"],
            "group_size": scheme["group_size"], "shape": [out, in_f], "bytes": nb,
            "bits_per_weight": 8 * nb / numel,
        }
        if scheme["format"] == "bsr":
            gs = effective_group_size(scheme["group_size"], in_f)
            total_groups = out * ((in_f + gs - 1) // gs)
            nnz = scheme.get("nnz", files.shapes.get(f"{name}.col_idx", [0])[0])
            row["sparsity"] = 1 - nnz / total_groups
        elif n_groups is not None:
            row["n_groups"] = n_groups
        if histogram:
            row["code_histogram"] = _histogram(files, name, scheme, in_f)
        layers.append(row)
        q_bytes += nb
        q_weights += numel
    other = [k for k in files.keys() if not any(k.startswith(m + ".") and k.rsplit(".", 1)[1]
                                                in (*_PACKED, _GUARD) for m in qcfg["modules"])]
    other_bytes = sum(_nbytes(files, k) for k in other)
    other_params = sum(math.prod(files.shapes[k]) for k in other)
    return {
        "path": str(d),
        "model_type": config.model_type,
        "method": qcfg.get("method"),
        "format_version": qcfg["format_version"],
        "size_on_disk_bytes": files.nbytes(),
        "quantized_layers": len(layers),
        "quantized_weights": q_weights,
        "quantized_bytes": q_bytes,
        "bits_per_weight_quantized": 8 * q_bytes / max(q_weights, 1),
        "other_tensors_bytes": other_bytes,
        "other_params": other_params,
        "bits_per_weight_overall": 8 * (q_bytes + other_bytes) / max(q_weights + other_params, 1),
        "fp16_equivalent_bytes": 2 * (q_weights + other_params),
        "layers": layers,
        "kernels": native.status(),  # what would run these layers here (docs/install.md)
    }


def validate_packed_tensors(files: SafetensorsDir, qcfg: dict[str, Any]) -> None:
    """Check every module's scheme in ``quantization_config`` (bits, group size, shape,
    nnz) against the shapes and dtypes of its tensors in the safetensors headers, so that
    an edited config.json (or mismatched shards) is reported instead of described."""
    for name, scheme in qcfg["modules"].items():
        try:
            want = scheme_tensors(scheme, qcfg["format_version"])
        except FormatError as e:
            raise FormatError(f"module {name}: {e}") from None
        for suffix, (shape, dtypes) in want.items():
            k = f"{name}.{suffix}"
            if k not in files:
                raise FormatError(f"{files.dir} is missing tensor {k!r}, which module {name}'s "
                                  f"scheme needs ({scheme['format']}, {scheme['bits']} bits)")
            if tuple(files.shapes[k]) != shape or files.dtypes[k] not in dtypes:
                raise FormatError(
                    f"tensor {k!r} is {files.dtypes[k]} {list(files.shapes[k])}, but module "
                    f"{name}'s scheme ({scheme['format']}, {scheme['bits']} bits, group size "
                    f"{scheme['group_size']}, {scheme['out_features']}x{scheme['in_features']}) "
                    f"needs {'/'.join(dtypes)} {list(shape)}: config.json and the weights do not "
                    f"belong together (was config.json edited?)")


def _histogram(files: SafetensorsDir, name: str, scheme: dict, in_f: int) -> list[int]:
    bits = scheme["bits"]
    if scheme["format"] == "dense":
        codes = native.unpack_codes(files.get(f"{name}.qweight"), bits, in_f)
    else:
        codes = native.unpack_codes(files.get(f"{name}.qvalues"), bits, scheme["group_size"])
    return torch.bincount((codes.flatten().long() + (1 << (bits - 1))),
                          minlength=1 << bits).tolist()


def format_report(rep: dict[str, Any]) -> str:
    mb = 1024 * 1024
    lines = [
        f"checkpoint   {rep['path']}  ({rep['model_type']}, method {rep['method']}, "
        f"format v{rep['format_version']})",
        f"size on disk {rep['size_on_disk_bytes'] / mb:.2f} MiB  (fp16 equivalent "
        f"{rep['fp16_equivalent_bytes'] / mb:.2f} MiB)",
        f"quantized    {rep['quantized_layers']} linears, {rep['quantized_weights']:,} weights, "
        f"{rep['bits_per_weight_quantized']:.3f} bits/weight (codes, scales, zeros and "
        f"indices counted)",
        f"other        {rep['other_params']:,} params in {rep['other_tensors_bytes'] / mb:.2f} MiB "
        f"(embeddings, norms, biases); overall {rep['bits_per_weight_overall']:.3f} bits/weight",
        *([native.describe(rep["kernels"], "kernels      ")] if "kernels" in rep else []),
        "",
        f"{'layer':48s} {'format':6s} {'bits':>4s} {'group':>6s} {'shape':>12s} {'bpw':>6s} "
        f"{'sparsity':>8s}",
    ]
    for r in rep["layers"]:
        gs = "chan" if r["group_size"] == -1 else str(r["group_size"])
        sp = f"{r['sparsity']:.2f}" if "sparsity" in r else "-"
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        lines.append(f"{r['name']:48s} {r['format']:6s} {r['bits']:>4d} {gs:>6s} {shape:>12s} "
                     f"{r['bits_per_weight']:6.3f} {sp:>8s}")
        if "code_histogram" in r:
            h = r["code_histogram"]
            tot = max(sum(h), 1)
            lines.append(" " * 4 + "codes: " + " ".join(f"{100 * c / tot:.1f}%" for c in h))
    return "\n".join(lines)
