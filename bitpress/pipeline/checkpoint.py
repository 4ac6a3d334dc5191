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
from ..formats.checkpoint import DEFAULT_SHARD_BYTES, GUARD_SUFFIX, check_finite, write_json
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


def guard_tensor(m: _PackedLinear) -> torch.Tensor:
    """The format-3 guard of a packed module (see ``FORMAT_VERSION``): int32
    ``[out_features, in_features, bits, group_size]``, stored under the module's ``.weight``
    name."""
    return torch.tensor([m.out_features, m.in_features, m.bits, m.group_size],
                        dtype=torch.int32)


def _disk_index(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict as written (format_version 3): each block-sparse module's ``row_ptr``
    and ``col_idx`` replaced by its ``keep_bits`` bitmask, and every packed module's guard
    tensor added."""
    for name, m in packed_modules(model).items():
        if f"{name}.{GUARD_SUFFIX}" in sd:
            raise FormatError(f"packed module {name} has a tensor named {GUARD_SUFFIX!r}, "
                              f"which the checkpoint format reserves for its guard")
        sd[f"{name}.{GUARD_SUFFIX}"] = guard_tensor(m)
        if m.scheme()["format"] != "bsr":
            continue
        rp, ci = sd.pop(f"{name}.row_ptr"), sd.pop(f"{name}.col_idx")
        sd[f"{name}.keep_bits"] = bsr_to_keep_bits(rp, ci, m.n_groups)
    return sd


def disk_state_dict(model: nn.Module, dtype: Optional[torch.dtype] = None
                    ) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint of ``model`` holds, under its on-disk name."""
    return _disk_index(model, _dedup_state_dict(model, dtype))


def quantization_config_of(model: nn.Module,
                           quantization_config: Optional[dict[str, Any]] = None
                           ) -> dict[str, Any]:
    """The ``quantization_config`` describing the packed modules of ``model``: the given
    entries (``method``, ``bits``, ...; default ``method="custom"``) with ``modules`` rebuilt
    from the model, so it cannot disagree with the weights."""
    from ..formats import make_quantization_config

    mods = packed_modules(model)
    if not mods:
        raise FormatError("the model has no bitpress modules; compress it first "
                          "(bitpress.nn.replace_linears or `bitpress compress`)")
    schemes = {n: m.scheme() for n, m in mods.items()}
    q = dict(quantization_config or {})
    first = next(iter(mods.values()))
    return make_quantization_config(
        q.pop("method", "custom"), q.pop("bits", first.bits), q.pop("group_size", first.group_size),
        schemes, sparsity=q.pop("sparsity", None), ignore=q.pop("ignore", None),
        param_dtype=q.pop("param_dtype", str(first.scales.dtype).replace("torch.", "")),
        **{k: v for k, v in q.items() if k not in ("modules", "quant_method", "format_version")})


def write_model_files(directory: Path, config: dict[str, Any], generation_config: Any = None,
                      tokenizer: Any = None) -> None:
    """The files of a checkpoint directory besides its tensors: the remote-code loader (so
    transformers loads it without ``import bitpress``), ``config.json`` (``config`` is not
    modified), the generation config (optional: a failure is logged) and the tokenizer."""
    config = dict(config)
    write_remote_code(directory, config)
    write_json(directory / "config.json", config)
    if generation_config is not None:
        try:
            generation_config.save_pretrained(directory)
        except Exception as e:  # noqa: BLE001 - optional file
            log.warning("generation config not saved: %s", e)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


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
    qcfg = quantization_config_of(model, quantization_config)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if dtype is not None:
        config["dtype"] = str(dtype).replace("torch.", "")
    config["quantization_config"] = qcfg
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_shards(disk_state_dict(model, dtype), tmp, max_shard_bytes,
                     metadata={"bitpress_format_version": str(qcfg["format_version"])})
        write_model_files(tmp, config, getattr(model, "generation_config", None), tokenizer)
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
    _drop_remote_code_entry(raw)
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise FormatError(f"{cfg_path} has no model_type")
    try:
        config = tr.AutoConfig.for_model(model_type, **raw)
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"cannot build a {model_type} config from {cfg_path}: {e}") from None
    return config, qcfg


def _drop_remote_code_entry(config: dict[str, Any]) -> None:
    """Remove the ``auto_map`` entry :func:`write_remote_code` adds (the loaded model's config
    must not name a code file that a later ``save_pretrained`` would not write)."""
    from ..integrations import REMOTE_CODE_CLASS

    am = config.get("auto_map")
    if isinstance(am, dict) and am.get("AutoModelForCausalLM") == REMOTE_CODE_CLASS:
        am = {k: v for k, v in am.items() if k != "AutoModelForCausalLM"}
        if am:
            config["auto_map"] = am
        else:
            config.pop("auto_map")


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


def write_remote_code(directory: Path, config: dict[str, Any]) -> None:
    """Make ``directory`` loadable by ``AutoModelForCausalLM.from_pretrained(directory,
    trust_remote_code=True)`` without importing bitpress first: copy the tiny loader module
    (it imports bitpress and hands over to its quantizer) and name it in ``config["auto_map"]``."""
    import shutil

    from ..integrations import REMOTE_CODE_CLASS, REMOTE_CODE_FILE

    shutil.copyfile(Path(__file__).parent.parent / "integrations" / REMOTE_CODE_FILE,
                    directory / REMOTE_CODE_FILE)
    config["auto_map"] = {**(config.get("auto_map") or {}),
                          "AutoModelForCausalLM": REMOTE_CODE_CLASS}


def replace_packed_modules(model: nn.Module, qcfg: dict[str, Any]) -> dict[str, tuple]:
    """Swap, in place, every linear that ``qcfg["modules"]`` names for an empty packed module
    on the meta device; returns the shape every packed tensor must have (by state-dict name)."""
    expected: dict[str, tuple] = {}
    for name, scheme in qcfg["modules"].items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"quantization_config names module {name!r}, which the "
                              f"{model.config.model_type} model does not have") from None
        w = getattr(lin, "weight", None)
        if w is None or w.dim() != 2:
            raise FormatError(f"quantization_config names module {name!r}, which is a "
                              f"{type(lin).__name__}, not a linear layer")
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
    return expected


def read_state(model: nn.Module, files: SafetensorsDir, qcfg: dict[str, Any],
               expected: dict[str, tuple], device: Optional[str | torch.device] = "cpu",
               dtype: Optional[torch.dtype] = torch.float32) -> None:
    """Fill every parameter and buffer of ``model`` (whose packed modules
    :func:`replace_packed_modules` put in place) from ``files``, checking every name, shape,
    guard and block-sparse index; anything missing, extra or malformed raises
    :class:`FormatError`, so no tensor is ever left uninitialised. ``device=None`` keeps each
    tensor on the device of the model's input embedding."""
    d = files.dir
    if device is None:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        w = getattr(emb, "weight", None)
        device = w.device if w is not None and w.device.type != "meta" else "cpu"
    state = model.state_dict()
    state_keys = list(state.keys())
    sd: dict[str, torch.Tensor] = {}
    index_keys: set[str] = set()  # tensors on disk that are not in the state dict
    derived: set[str] = set()  # ... and state-dict tensors rebuilt from them (not on disk)
    version = qcfg["format_version"]
    for name, scheme in qcfg["modules"].items():
        if version >= 3:
            k = f"{name}.{GUARD_SUFFIX}"
            if k not in files:
                raise FormatError(f"{d} is missing tensor {k!r} (the format-{version} guard of "
                                  f"packed module {name})")
            t = files.get(k)
            want = [scheme["out_features"], scheme["in_features"], scheme["bits"],
                    scheme["group_size"]]
            if t.dtype != torch.int32 or t.shape != (4,) or t.tolist() != want:
                raise FormatError(f"guard tensor {k!r} in {d} is {t.tolist()} ({t.dtype}), "
                                  f"quantization_config says {want}: the checkpoint was edited "
                                  f"or mixed with another one")
            index_keys.add(k)
        if version >= 2 and scheme["format"] == "bsr":
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
        shape = expected.get(k, tuple(state[k].shape))
        if tuple(t.shape) != tuple(shape):
            raise FormatError(f"tensor {k!r} in {d} has shape {tuple(t.shape)}, the model "
                              f"expects {tuple(shape)}")
        want_dtype = expected_dtype(k, expected)
        if want_dtype is not None and t.dtype != want_dtype:
            raise FormatError(f"tensor {k!r} in {d} is {t.dtype}, the packed format stores "
                              f"{want_dtype}")
        if dtype is not None and t.is_floating_point() and not _is_packed_param(k, expected):
            t = t.to(dtype)
        sd[k] = t.to(device)
    unexpected = sorted(set(files.keys()) - (set(state_keys) - derived) - index_keys)
    if unexpected:
        raise FormatError(f"{d} holds tensors the model does not have: {_short(unexpected)}")
    missing = [k for k in state_keys if k not in sd]
    model.load_state_dict(sd, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                  if t.device.type == "meta"]
    if still_meta or (missing and not all(_tied_ok(model, k) for k in missing)):
        raise FormatError(f"{d} is missing tensors: {_short(still_meta or missing)}")
    for name, m in packed_modules(model).items():
        if m.scheme()["format"] == "bsr":
            validate_bsr(m.row_ptr, m.col_idx, m.qvalues, m.scales, m.zeros, m.bits,
                         m.group_size, m.in_features)


def expected_dtype(key: str, expected: dict[str, tuple]) -> Optional[torch.dtype]:
    """The dtype the packed format fixes for ``key`` (codes and indices), else ``None``."""
    if key not in expected:
        return None
    return {"qweight": torch.int32, "qvalues": torch.int32, "row_ptr": torch.int32,
            "col_idx": torch.int32, "keep_bits": torch.uint8}.get(key.rsplit(".", 1)[1])


def load(directory: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: Optional[torch.dtype] = torch.float32):
    """Rebuild the transformers model of a bitpress checkpoint with its packed modules.

    The model skeleton is built on the meta device (no full-precision weights are ever
    materialised); tensors are read from safetensors straight into their modules.
    ``dtype`` is the compute dtype of the unpacked floating tensors (embeddings, norms,
    biases); packed codes, scales and zeros stay as stored. ``None`` keeps the stored dtypes.

    The model carries the bitpress quantization config and quantizer (as
    ``AutoModelForCausalLM.from_pretrained`` sets them), so ``model.save_pretrained`` writes a
    bitpress checkpoint again."""
    from .source import _require_transformers

    tr = _require_transformers()
    from accelerate import init_empty_weights

    d = Path(directory)
    config, qcfg = load_hf_config(d)
    files = SafetensorsDir(d)
    with init_empty_weights(include_buffers=False):
        try:
            model = tr.AutoModelForCausalLM.from_config(config)
        except Exception as e:  # noqa: BLE001
            raise FormatError(f"cannot build the model of {d}: {e}") from None
    expected = replace_packed_modules(model, qcfg)
    read_state(model, files, qcfg, expected, device, dtype)
    model.to(device)
    from ..integrations.hf_quantizer import attach_quantizer

    attach_quantizer(model, qcfg)
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
