"""Model-level checkpoint I/O: ``bitpress.save`` and ``bitpress.load``.

A bitpress checkpoint is a Hugging Face model directory: ``config.json`` whose
``quantization_config`` (``quant_method: bitpress``) lists every packed module and its
scheme, tokenizer files, and (sharded) safetensors holding the packed buffers under the
module's state-dict names plus every other tensor of the model as is.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import FormatError, SourceError
from ..formats import (SafetensorsDir, atomic_output_dir, num_groups,
                       bsr_to_keep_bits, keep_bits_bytes, keep_bits_to_bsr,
                       packed_words, validate_bsr, validate_quantization_config, write_shards)
from ..formats.checkpoint import DEFAULT_SHARD_BYTES, check_finite, write_json
from ..nn import packed_module_from_scheme
from ..nn.modules import _PackedLinear
from ..nn.recipe import set_submodule

log = logging.getLogger(__name__)


def packed_modules(model: nn.Module) -> dict[str, _PackedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _PackedLinear)}


def _dedup_state_dict(model: nn.Module, dtype: Optional[torch.dtype] = None
                      ) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once (the first name wins); floating tensors
    outside the packed modules cast to ``dtype`` when given."""
    packed = tuple(n + "." for n in packed_modules(model))
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.device.type != "meta" \
            else (id(v), 0)
        if key in seen and v.numel():
            continue
        seen.add(key)
        if dtype is not None and v.is_floating_point() and not k.startswith(packed):
            v = v.to(dtype)
        out[k] = v
    return out


def _disk_index(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict as written (format_version 2): each block-sparse module's ``row_ptr``
    and ``col_idx`` replaced by its ``keep_bits`` bitmask."""
    for name, m in packed_modules(model).items():
        if m.scheme()["format"] != "bsr":
            continue
        rp, ci = sd.pop(f"{name}.row_ptr"), sd.pop(f"{name}.col_idx")
        sd[f"{name}.keep_bits"] = bsr_to_keep_bits(rp, ci, m.n_groups)
    return sd


def save(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None,
         quantization_config: Optional[dict[str, Any]] = None, overwrite: bool = False,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES,
         extra_files: Optional[dict[str, Any]] = None,
         dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``model`` (a transformers model holding bitpress modules) atomically.

    ``quantization_config`` defaults to the one describing the model's packed modules
    (``method="custom"``); its ``modules`` entry is always rebuilt from the model so it
    cannot disagree with the weights. ``extra_files`` maps file names to JSON objects.
    ``dtype`` is the storage dtype of the tensors that are not packed (embeddings, norms,
    unquantized heads); default: as they are in memory."""
    from ..formats import make_quantization_config

    mods = packed_modules(model)
    if not mods:
        raise FormatError("the model has no bitpress modules; compress it first "
                          "(bitpress.nn.replace_linears or `bitpress compress`)")
    schemes = {n: m.scheme() for n, m in mods.items()}
    q = dict(quantization_config or {})
    first = next(iter(mods.values()))
    qcfg = make_quantization_config(
        q.pop("method", "custom"), q.pop("bits", first.bits), q.pop("group_size", first.group_size),
        schemes, sparsity=q.pop("sparsity", None), ignore=q.pop("ignore", None),
        param_dtype=q.pop("param_dtype", str(first.scales.dtype).replace("torch.", "")),
        **{k: v for k, v in q.items() if k not in ("modules", "quant_method", "format_version")})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if dtype is not None:
        config["dtype"] = str(dtype).replace("torch.", "")
    config["quantization_config"] = qcfg
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_shards(_disk_index(model, _dedup_state_dict(model, dtype)), tmp, max_shard_bytes,
                     metadata={"bitpress_format_version": str(qcfg["format_version"])})
        write_json(tmp / "config.json", config)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception as e:  # noqa: BLE001 - optional file
                log.warning("generation config not saved: %s", e)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            write_json(tmp / name, obj)
    return Path(out_dir)


def load_hf_config(directory: str | os.PathLike):
    """(transformers config without the quantization entry, bitpress quantization_config)."""
    from .source import _require_transformers

    tr = _require_transformers()
    d = Path(directory)
    cfg_path = d / "config.json"
    if not d.exists():
        raise SourceError(f"{d} does not exist; give a bitpress checkpoint directory")
    if not d.is_dir():
        raise SourceError(f"{d} is a file; give a bitpress checkpoint directory (made by "
                          f"`bitpress compress`)")
    if not cfg_path.exists():
        raise SourceError(f"{d} has no config.json; is it a bitpress checkpoint?")
    try:
        raw = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise FormatError(f"{cfg_path} is not valid JSON: {e}") from None
    qcfg = raw.pop("quantization_config", None)
    validate_quantization_config(qcfg)
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise FormatError(f"{cfg_path} has no model_type")
    try:
        config = tr.AutoConfig.for_model(model_type, **raw)
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"cannot build a {model_type} config from {cfg_path}: {e}") from None
    return config, qcfg


def _expected_shapes(m: _PackedLinear) -> dict[str, tuple]:
    ng, out = num_groups(m.group_size, m.in_features), m.out_features
    shapes: dict[str, tuple] = {}
    if m.scheme()["format"] == "dense":
        shapes = {"qweight": (out, packed_words(m.in_features, m.bits)), "scales": (out, ng),
                  "zeros": (out, ng)}
    else:
        nnz = m.nnz
        shapes = {"row_ptr": (out + 1,), "col_idx": (nnz,),
                  "keep_bits": (out, keep_bits_bytes(ng)),
                  "qvalues": (nnz, packed_words(m.group_size, m.bits)), "scales": (nnz,),
                  "zeros": (nnz,)}
    if m.bias is not None:
        shapes["bias"] = (out,)
    return shapes


_FLOAT_DTYPES = ("F16", "BF16", "F32")


def scheme_tensors(scheme: dict[str, Any], format_version: int
                   ) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """The packed tensors a module's scheme promises on disk: ``{suffix: (shape, allowed
    safetensors dtypes)}`` (bias not included). The scheme must have passed
    :func:`bitpress.formats.validate_quantization_config`."""
    bits, gs = int(scheme["bits"]), int(scheme["group_size"])
    in_f, out = int(scheme["in_features"]), int(scheme["out_features"])
    ng = num_groups(gs, in_f)
    if scheme["format"] == "dense":
        return {"qweight": ((out, packed_words(in_f, bits)), ("I32",)),
                "scales": ((out, ng), _FLOAT_DTYPES), "zeros": ((out, ng), _FLOAT_DTYPES)}
    nnz = scheme.get("nnz")
    if isinstance(nnz, bool) or not isinstance(nnz, int) or not 0 <= nnz <= out * ng:
        raise FormatError(f"block-sparse scheme has nnz {nnz!r}, expected an integer in "
                          f"[0, {out * ng}]")
    shapes = {"qvalues": ((nnz, packed_words(gs if gs != -1 else in_f, bits)), ("I32",)),
              "scales": ((nnz,), _FLOAT_DTYPES), "zeros": ((nnz,), _FLOAT_DTYPES)}
    if format_version >= 2:
        shapes["keep_bits"] = ((out, keep_bits_bytes(ng)), ("U8",))
    else:
        shapes["row_ptr"] = ((out + 1,), ("I32",))
        shapes["col_idx"] = ((nnz,), ("I32",))
    return shapes


def load(directory: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: Optional[torch.dtype] = torch.float32):
    """Rebuild the transformers model of a bitpress checkpoint with its packed modules.

    The model skeleton is built on the meta device (no full-precision weights are ever
    materialised); tensors are read from safetensors straight into their modules.
    ``dtype`` is the compute dtype of the unpacked floating tensors (embeddings, norms,
    biases); packed codes, scales and zeros stay as stored. ``None`` keeps the stored dtypes."""
    from accelerate import init_empty_weights

    from .source import _require_transformers

    tr = _require_transformers()
    d = Path(directory)
    config, qcfg = load_hf_config(d)
    files = SafetensorsDir(d)
    with init_empty_weights(include_buffers=False):
        try:
            model = tr.AutoModelForCausalLM.from_config(config)
        except Exception as e:  # noqa: BLE001
            raise FormatError(f"cannot build the model of {d}: {e}") from None
    expected: dict[str, tuple] = {}
    for name, scheme in qcfg["modules"].items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"quantization_config names module {name!r}, which the "
                              f"{config.model_type} model does not have") from None
        w = lin.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if type(lin).__name__ == "Conv1D" else \
            (w.shape[1], w.shape[0])
        if (in_f, out_f) != (scheme["in_features"], scheme["out_features"]):
            raise FormatError(f"module {name}: quantization_config says "
                              f"{scheme['in_features']}->{scheme['out_features']}, the model "
                              f"has {in_f}->{out_f}")
        new = packed_module_from_scheme(scheme, in_f, out_f, getattr(lin, "bias", None) is not None,
                                        torch.float16, nnz=int(scheme.get("nnz", 0)),
                                        device="meta")
        set_submodule(model, name, new)
        for k, shape in _expected_shapes(new).items():
            expected[f"{name}.{k}"] = shape
    state_keys = list(model.state_dict().keys())
    sd: dict[str, torch.Tensor] = {}
    index_keys: set[str] = set()  # format_version 2: bitmasks on disk, rows + columns in memory
    derived: set[str] = set()  # ... so a format-2 file holding row_ptr/col_idx is malformed
    if qcfg["format_version"] >= 2:
        for name, scheme in qcfg["modules"].items():
            if scheme["format"] != "bsr":
                continue
            k = f"{name}.keep_bits"
            if k not in files:
                raise FormatError(f"{d} is missing tensor {k!r} (the index of block-sparse "
                                  f"module {name})")
            t = files.get(k)
            if tuple(t.shape) != expected[k]:
                raise FormatError(f"tensor {k!r} in {d} has shape {tuple(t.shape)}, the model "
                                  f"expects {expected[k]}")
            m = model.get_submodule(name)
            rp, ci = keep_bits_to_bsr(t, m.n_groups)
            if ci.numel() != m.nnz:
                raise FormatError(f"{k!r} in {d} marks {ci.numel()} kept groups, "
                                  f"quantization_config says nnz = {m.nnz}")
            sd[f"{name}.row_ptr"], sd[f"{name}.col_idx"] = rp.to(device), ci.to(device)
            index_keys.add(k)
            derived |= {f"{name}.row_ptr", f"{name}.col_idx"}
    for k in state_keys:
        if k not in files or k in sd:
            continue
        t = files.get(k)
        check_finite(t, k, d)
        ref = model.state_dict()[k]
        shape = expected.get(k, tuple(ref.shape))
        if tuple(t.shape) != tuple(shape):
            raise FormatError(f"tensor {k!r} in {d} has shape {tuple(t.shape)}, the model "
                              f"expects {tuple(shape)}")
        if dtype is not None and t.is_floating_point() and not _is_packed_param(k, expected):
            t = t.to(dtype)
        sd[k] = t.to(device)
    unexpected = sorted(set(files.keys()) - (set(state_keys) - derived) - index_keys)
    if unexpected:
        raise FormatError(f"{d} holds tensors the model does not have: {_short(unexpected)}")
    missing = [k for k in state_keys if k not in sd]
    model.load_state_dict(sd, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                  if t.device.type == "meta"]
    if still_meta or (missing and not all(_tied_ok(model, k) for k in missing)):
        raise FormatError(f"{d} is missing tensors: {_short(still_meta or missing)}")
    for name, m in packed_modules(model).items():
        if m.scheme()["format"] == "bsr":
            validate_bsr(m.row_ptr, m.col_idx, m.qvalues, m.scales, m.zeros, m.bits,
                         m.group_size, m.in_features)
    model.to(device)
    return model.eval()


def _is_packed_param(key: str, expected: dict[str, tuple]) -> bool:
    return key in expected and key.rsplit(".", 1)[1] in ("scales", "zeros")


def _tied_ok(model: nn.Module, key: str) -> bool:
    return key.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)


def _short(vals: list[str]) -> str:
    return ", ".join(vals[:3]) + (f" and {len(vals) - 3} more" if len(vals) > 3 else "")


def load_tokenizer(directory: str | os.PathLike):
    from .source import _require_transformers, check_tokenizer_files

    tr = _require_transformers()
    check_tokenizer_files(directory)
    try:
        return tr.AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"no usable tokenizer in {directory}: {' '.join(str(e).split())}") \
            from None
