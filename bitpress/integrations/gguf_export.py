"""``bitpress export CKPT --format gguf``: a bitpress checkpoint as a llama.cpp GGUF file.

What maps exactly (the dequantised weights llama.cpp sees are bit-identical to the ones
bitpress's reference op multiplies by; checked per tensor by decoding the written blocks
with the ``gguf`` package's own dequantizer):

* ``bits <= 4``, any zero, group size a multiple of 32 (or per-channel with ``in % 32 ==
  0``) -> **Q4_1** (``W = d*q + m``, ``q`` in 0..15). A bitpress group ``s*c + z`` (``c`` in
  ``[-2^(b-1), 2^(b-1)-1]``) becomes ``d = s``, ``q = c + o``, ``m = z - o*s`` for an offset
  ``o`` (8 by default). ``m`` is stored in fp16, so ``z - 8s`` can be inexact; the encoder
  then tries every offset (and ``d = -s``, ``q = o - c``, ``m = z + o*s``) that keeps ``q``
  in range and takes one whose ``m`` is exact, else the nearest, and reports how many blocks
  stayed inexact with their largest error. 2- and 3-bit codes fit in Q4_1 the same way (at
  Q4_1's 5 bits per weight).
* 4-bit symmetric (all zeros 0) -> **Q4_0** (``d = s``, ``q = c + 8``).
* 8-bit symmetric -> **Q8_0** (``d = s``, ``q = c``); on request (``gguf_type="q8_0"``)
  also any grid whose zeros are integer multiples of the scale (RTN and GPTQ zero points:
  ``q = c + z/s``) when ``c + z/s`` fits int8 -- exact, at 8.5 bits per weight.
* float tensors (embeddings, norms, biases, unquantised heads) -> F32 (1-D tensors) or the
  stored dtype (F16 / BF16 / F32).

Anything else (group size 16, 48, ...; 8-bit with non-zero zeros; a type asked for with
``gguf_type``) needs ``allow_requant=True``: the dequantised weight is re-quantized with
the ``gguf`` package's reference quantizer and the error against bitpress's weight is
measured and reported for every such tensor. Nothing is rounded silently.

Llama-architecture q/k projections are stored with llama.cpp's row order (interleaved rope
pairs, where transformers rotates halves): the permutation moves whole output rows, so
blocks along the input dimension are untouched and exactness is kept.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, FormatError, OutputExistsError

log = logging.getLogger(__name__)

QK = 32  # weights per block of Q4_0 / Q4_1 / Q8_0
#: ``--gguf-type`` choices: ``auto`` = the exact type of each tensor (refusing where none is)
GGUF_TYPES = ("auto", "q4_0", "q4_1", "q8_0", "f16", "f32")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the gguf package: pip install 'bitpress[hf]'") \
            from None
    return gguf


# ---------------------------------------------------------------------------------------
# block encoders (numpy / torch only; no llama.cpp)
# ---------------------------------------------------------------------------------------

def _check_blockable(qw) -> None:
    if qw.in_features % QK:
        raise ConfigError(f"GGUF blocks hold {QK} weights along a row; in_features "
                          f"{qw.in_features} is not a multiple of {QK}")


def maps_exactly(qw, qtype: str) -> Optional[str]:
    """``None`` when ``qtype`` represents ``qw`` (a QuantizedWeight) exactly, else the reason
    it does not."""
    if qw.in_features % QK:
        return f"in_features {qw.in_features} is not a multiple of {QK}"
    if qw.gs % QK:
        return f"group size {qw.gs} is not a multiple of {QK}: a {QK}-weight block spans " \
               f"two groups with different scales"
    if qtype == "q4_1":
        return None if qw.bits <= 4 else f"{qw.bits}-bit codes do not fit Q4_1's 4-bit codes"
    zero = qw.zero if qw.keep is None else qw.zero * qw.keep
    if qtype == "q4_0":
        if qw.bits > 4:
            return f"{qw.bits}-bit codes do not fit Q4_0"
        if qw.bits < 4:  # Q4_0 is d*(q-8): only a 4-bit symmetric grid maps
            return f"{qw.bits}-bit symmetric codes are not on Q4_0's grid"
        return None if not bool(zero.any()) else "non-zero zero points (Q4_0 is symmetric)"
    if qtype == "q8_0":
        c, s, z = _block_params(qw)
        k = _integer_zero(s, z)
        if k is None:
            return "zero points that are not integer multiples of the scale (Q8_0 is d*q)"
        q = c + k[..., None]
        if bool((q < -128).any() | (q > 127).any()):
            return "codes + integer zero point leave int8"
        return None
    return f"{qtype} is not a block type of bitpress's grid"


def _block_params(qw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes int ``[out, nb, 32]``, scale and zero float32 ``[out, nb]`` (pruned groups:
    scale = zero = 0)."""
    out, n = qw.codes.shape
    nb = n // QK
    g = (torch.arange(nb) * QK) // qw.gs
    s, z = qw.scale.float(), qw.zero.float()
    if qw.keep is not None:
        s, z = s * qw.keep, z * qw.keep
    return qw.codes.view(out, nb, QK).to(torch.int32), s[:, g], z[:, g]


def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).numpy().view(np.uint8).reshape(*t.shape, 2)


def _nibbles(q: torch.Tensor) -> np.ndarray:
    """q in 0..15 ``[..., 32]`` -> 16 bytes: byte j = q[j] | q[j+16] << 4 (ggml's order)."""
    q = q.to(torch.uint8)
    return (q[..., :16] | (q[..., 16:] << 4)).numpy()


def encode_q4_1(qw) -> tuple[np.ndarray, dict[str, Any]]:
    """Q4_1 bytes ``[out, in/32*20]`` of a QuantizedWeight with ``bits <= 4`` whose groups
    are unions of 32-blocks; see the module docstring for the offset search."""
    _check_blockable(qw)
    c, s, z = _block_params(qw)
    cmin, cmax = c.amin(-1), c.amax(-1)
    s16 = s.to(torch.float16).float()
    # candidates: (sign, offset) with q = sign*c + o in 0..15, m = z - sign*o*s
    best_err = torch.full_like(s, float("inf"))
    best_sign = torch.ones_like(s)
    best_o = torch.full_like(s, 8.0)
    default_err = None
    order = [8] + [o for o in range(0, 24) if o != 8]
    for sign in (1.0, -1.0):
        for o in order:
            if sign > 0:
                ok = (cmin + o >= 0) & (cmax + o <= 15)
            else:
                ok = (o - cmax >= 0) & (o - cmin <= 15)
            m = z - sign * o * s
            err = (m.to(torch.float16).float() - m).abs()
            err = torch.where(ok, err, torch.full_like(err, float("inf")))
            if sign > 0 and o == 8:
                default_err = err
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_sign = torch.where(better, torch.full_like(s, sign), best_sign)
            best_o = torch.where(better, torch.full_like(s, float(o)), best_o)
            if sign > 0 and o == 8 and not bool((best_err > 0).any()):
                break
        if not bool((best_err > 0).any()):
            break
    q = best_sign[..., None] * c + best_o[..., None]
    d = best_sign * s
    m = z - best_sign * best_o * s
    out, nb = s.shape
    raw = np.concatenate([_f16_bytes(d), _f16_bytes(m), _nibbles(q.to(torch.int32))], axis=-1)
    stats = {"blocks": out * nb,
             "m_inexact_blocks_at_offset_8": int((default_err > 0).sum()),
             "m_inexact_blocks": int((best_err > 0).sum()),
             "scale_not_fp16": int((s16 != s).sum())}
    return raw.reshape(out, nb * 20), stats


def encode_q4_0(qw) -> tuple[np.ndarray, dict[str, Any]]:
    """Q4_0 bytes of a 4-bit symmetric QuantizedWeight: ``d = s``, ``q = c + 8``."""
    reason = maps_exactly(qw, "q4_0")
    if reason:
        raise ConfigError(f"Q4_0 cannot hold this weight exactly: {reason}")
    c, s, _ = _block_params(qw)
    out, nb = s.shape
    raw = np.concatenate([_f16_bytes(s), _nibbles(c + 8)], axis=-1)
    return raw.reshape(out, nb * 18), {"blocks": out * nb,
                                       "scale_not_fp16": int((s.half().float() != s).sum())}


def _integer_zero(s: torch.Tensor, z: torch.Tensor) -> Optional[torch.Tensor]:
    """``k`` with ``z == k*s`` exactly in every block (integer zero points), else None."""
    k = torch.round(z / torch.where(s == 0, torch.ones_like(s), s))
    k = torch.where(s == 0, torch.zeros_like(k), k)
    return k.to(torch.int32) if bool((k * s == z).all()) else None


def encode_q8_0(qw) -> tuple[np.ndarray, dict[str, Any]]:
    """Q8_0 bytes of a QuantizedWeight whose zeros are integer multiples ``k*s`` of the
    scale (symmetric grids, RTN/GPTQ integer zero points): ``d = s``, ``q = c + k``."""
    reason = maps_exactly(qw, "q8_0")
    if reason:
        raise ConfigError(f"Q8_0 cannot hold this weight exactly: {reason}")
    c, s, z = _block_params(qw)
    q = c + _integer_zero(s, z)[..., None]
    out, nb = s.shape
    raw = np.concatenate([_f16_bytes(s), q.to(torch.int8).numpy().view(np.uint8)], axis=-1)
    return raw.reshape(out, nb * 34), {"blocks": out * nb,
                                       "scale_not_fp16": int((s.half().float() != s).sum())}


ENCODERS = {"q4_0": encode_q4_0, "q4_1": encode_q4_1, "q8_0": encode_q8_0}


def qtype_enum(name: str):
    return getattr(_gguf().GGMLQuantizationType, name.upper())


def decode(raw: np.ndarray, name: str) -> np.ndarray:
    """float32 ``[out, in]`` of the GGUF bytes, with the gguf package's dequantizer."""
    gguf = _gguf()
    if name in ("f32", "f16", "bf16"):
        return np.asarray(raw, dtype=np.float32)
    return gguf.quants.dequantize(raw, qtype_enum(name)).astype(np.float32)


def requantize(w: torch.Tensor, name: str) -> np.ndarray:
    """The gguf package's reference quantizer (llama.cpp's, no importance matrix)."""
    gguf = _gguf()
    a = w.float().contiguous().numpy()
    if name == "f32":
        return a
    if name == "f16":
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype_enum(name))


# ---------------------------------------------------------------------------------------
# architecture and tokenizer metadata
# ---------------------------------------------------------------------------------------

#: transformers model_type -> (gguf arch, q/k rows permuted for llama.cpp's rope)
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


def llama_qk_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order of a q (or k) projection in llama.cpp's llama layout, as indices into the
    transformers rows: transformers rotates the two halves of each head (``i`` with ``i +
    d/2``), llama.cpp adjacent pairs (``2i`` with ``2i+1``), so GGUF row ``h*d + 2i + j`` is
    transformers row ``h*d + j*d/2 + i``."""
    d = n_rows // n_head
    if d * n_head != n_rows or d % 2:
        raise FormatError(f"cannot split {n_rows} rows into {n_head} rope heads")
    return torch.arange(n_rows).view(n_head, 2, d // 2).transpose(1, 2).reshape(-1)


def _arch_metadata(w, config, arch: str) -> None:
    gguf = _gguf()
    rs = getattr(config, "rope_scaling", None) or {}
    rtype = rs.get("rope_type", rs.get("type", "default")) if isinstance(rs, dict) else "default"
    if rtype not in ("default", None):
        raise ConfigError(f"rope scaling {rtype!r} is not supported by the GGUF export yet")
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    w.add_rope_dimension_count(head_dim)
    theta = getattr(config, "rope_theta", None)
    if theta is None and isinstance(getattr(config, "rope_parameters", None), dict):
        theta = config.rope_parameters.get("rope_theta")
    w.add_rope_freq_base(float(theta if theta is not None else 10000.0))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if head_dim * n_head != config.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(config.vocab_size)
    del gguf


def _pre_tokenizer_name(tj: dict[str, Any]) -> str:
    """llama.cpp's name of a byte-level BPE pre-tokenizer, read from tokenizer.json."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    regex = " ".join(str((p.get("pattern") or {}).get("Regex", "")) for p in parts
                     if p.get("type") == "Split")
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if "\\p{N}{1,3}" in regex:
        return "llama-bpe"
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in regex and "\\p{N}|" in regex.replace("\\p{N}+", ""):
        return "qwen2"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    log.warning("pre-tokenizer %s not recognised; the GGUF says 'default' and llama.cpp's "
                "text tokenization may differ from transformers' (token ids given directly "
                "are unaffected)", kinds)
    return "default"


def _tokenizer_metadata(w, ckpt: Path, n_vocab: int) -> dict[str, Any]:
    gguf = _gguf()
    path = ckpt / "tokenizer.json"
    if not path.is_file():
        raise FormatError(f"{ckpt} has no tokenizer.json; the GGUF export needs the fast "
                          f"(byte-level BPE) tokenizer that bitpress saves with checkpoints")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tj.get("decoder")):
        raise ConfigError(f"only byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, "
                          f"Qwen2) are exported to GGUF; {path} has a {model.get('type')} "
                          f"model with decoder {(tj.get('decoder') or {}).get('type')}")
    vocab: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        vocab[i] = a["content"]
    if max(vocab) >= n_vocab:
        raise FormatError(f"tokenizer id {max(vocab)} >= the model's vocab_size {n_vocab}")
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in vocab:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(vocab[i])
            types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
        else:
            tokens.append(vocab[i])
            types.append(T.NORMAL)
    pre = _pre_tokenizer_name(tj)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(ckpt, load_merges=True, n_vocab=n_vocab)
    special.add_to_gguf(w, quiet=True)
    return {"tokenizer": "gpt2", "pre": pre, "tokens": len(vocab), "merges": len(special.merges)}


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------

@dataclass
class _Plan:
    name: str
    qtype: str
    exact: bool
    stats: dict[str, Any] = field(default_factory=dict)


def _float_tensor(t: torch.Tensor) -> tuple[np.ndarray, str]:
    if t.dim() == 1 or t.dtype == torch.float32:
        return t.float().contiguous().numpy(), "f32"
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16), "bf16"
    return t.to(torch.float16).contiguous().numpy(), "f16"


def _err(got: np.ndarray, ref: torch.Tensor) -> dict[str, float]:
    g = torch.from_numpy(np.ascontiguousarray(got)).float().reshape(ref.shape)
    diff = g - ref.float()
    den = float(ref.float().norm()) or 1.0
    return {"max_abs_error": float(diff.abs().max()) if diff.numel() else 0.0,
            "relative_error": float(diff.norm()) / den}


def _atomic_file(out: Path, overwrite: bool):
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output file {out} already exists; choose another path or "
                                f"pass --force to replace it")
    if out.exists() and out.is_dir():
        raise OutputExistsError(f"output path {out} is a directory; give a .gguf file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    return Path(tmp)


def export_gguf(src: str | os.PathLike, out_file: str | os.PathLike, gguf_type: str = "auto",
                allow_requant: bool = False, overwrite: bool = False,
                progress: bool = True) -> dict[str, Any]:
    """Write the bitpress checkpoint ``src`` as a GGUF file for llama.cpp (atomically;
    ``src`` is only read). ``gguf_type`` ``auto`` picks the exact block type of every packed
    linear (Q4_0 / Q4_1 / Q8_0) and refuses, naming the tensor, where none is exact unless
    ``allow_requant``; another type forces that type on every packed linear (re-quantized
    with its error reported where not exact). Returns a report with per-type counts and the
    measured error of every tensor that is not exact."""
    from ..nn.modules import HalfLinear, _PackedLinear
    from ..pipeline.checkpoint import load
    from ..pipeline.source import open_source

    gguf = _gguf()
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got "
                          f"{gguf_type!r}")
    info = open_source(src)
    if info.kind != "bitpress":
        raise ConfigError(f"{src} is not a bitpress checkpoint (it is a {info.kind} model); "
                          f"the GGUF export writes packed checkpoints")
    out = Path(out_file).absolute()
    if out.suffix.lower() != ".gguf":
        raise ConfigError(f"the GGUF output {out} should end in .gguf")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output file {out} already exists; choose another path or "
                                f"pass --force to replace it")
    model = load(info.path, dtype=None)
    config = model.config
    if config.model_type not in ARCHS:
        raise ConfigError(f"GGUF export supports {', '.join(sorted(ARCHS))} models; "
                          f"{info.path} is a {config.model_type}")
    arch, permute_qk = ARCHS[config.model_type]
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()),
                                     config.num_hidden_layers)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, (_PackedLinear, HalfLinear))}

    def gguf_name(hf: str) -> str:
        g = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise FormatError(f"no llama.cpp tensor name for {hf!r} ({arch})")
        return g

    def rows(hf_module: str) -> Optional[torch.Tensor]:
        if not permute_qk:
            return None
        if hf_module.endswith("q_proj"):
            return llama_qk_rows(config.hidden_size if getattr(config, "head_dim", None) is None
                                 else n_head * config.head_dim, n_head)
        if hf_module.endswith("k_proj"):
            hd = getattr(config, "head_dim", None) or config.hidden_size // n_head
            return llama_qk_rows(n_kv * hd, n_kv)
        return None

    # tensors in order: (gguf name, bytes, qtype, plan)
    tensors: list[tuple[str, np.ndarray, str, _Plan]] = []
    refused: list[str] = []
    sd = dict(model.state_dict(keep_vars=False))
    done: set[str] = set()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    it = tqdm(list(packed.items()), desc="gguf", unit="linear", disable=not progress,
              leave=False)
    for mod_name, m in it:
        perm = rows(mod_name)
        gname = gguf_name(mod_name + ".weight")
        if isinstance(m, HalfLinear):
            w = m.weight.detach()
            raw, qt = _float_tensor(w[perm] if perm is not None else w)
            tensors.append((gname, raw, qt, _Plan(gname, qt, True)))
        else:
            qw = m.quantized_weight()
            if perm is not None:
                qw = type(qw)(qw.codes[perm], qw.scale[perm], qw.zero[perm], qw.bits,
                              qw.group_size, None if qw.keep is None else qw.keep[perm])
            ref = qw.dequantize()
            if gguf_type == "auto":
                cands = (["q8_0"] if qw.bits == 8 else
                         (["q4_0", "q4_1"] if qw.bits == 4 else ["q4_1"]))
                qt = next((c for c in cands if maps_exactly(qw, c) is None), None)
                if qt is None:
                    why = maps_exactly(qw, cands[-1])
                    if not allow_requant:
                        refused.append(f"{mod_name} ({qw.bits}-bit g{qw.group_size}: {why})")
                        continue
                    qt = "q8_0" if qw.bits == 8 else "q4_1"
            else:
                qt = gguf_type
            if qt in ENCODERS and maps_exactly(qw, qt) is None:
                raw, stats = ENCODERS[qt](qw)
                exact_by_construction = True
            else:
                if not allow_requant and qt not in ("f32",):
                    refused.append(f"{mod_name} ({qw.bits}-bit g{qw.group_size} -> {qt}: "
                                   f"{maps_exactly(qw, qt) if qt in ENCODERS else 'float'})")
                    continue
                raw, stats = requantize(ref, qt), {}
                exact_by_construction = qt == "f32"  # the dequantized weight itself
            got = decode(raw, qt)
            err = _err(got, ref)
            exact = err["max_abs_error"] == 0.0
            if not exact_by_construction:
                log.warning("%s re-quantized to %s: relative error %.4g, max abs %.3g",
                            gname, qt.upper(), err["relative_error"], err["max_abs_error"])
            tensors.append((gname, raw, qt, _Plan(gname, qt, exact,
                                                  {**stats, **err,
                                                   "requantized": not exact_by_construction})))
        if m.bias is not None:
            b = m.bias.detach()
            braw, bqt = _float_tensor(b[perm] if perm is not None else b)
            bname = gguf_name(mod_name + ".bias")
            tensors.append((bname, braw, bqt, _Plan(bname, bqt, True)))
        done.update({mod_name + "." + k for k in m.state_dict()})
    if refused:
        raise ConfigError(
            f"{len(refused)} linear(s) have no exact GGUF block type: {'; '.join(refused[:3])}"
            + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
            + ". Pass --allow-requant to re-quantize them with the gguf reference quantizer "
              "(the error is measured and reported), or compress with a group size that is a "
              "multiple of 32")
    for k, v in sd.items():
        if k in done or not v.is_floating_point():
            continue
        if k.endswith("rotary_emb.inv_freq"):
            continue
        if head is not None and k.startswith(_module_name(model, head)) and tied \
                and head.weight.data_ptr() == emb.data_ptr():
            continue  # llama.cpp reuses token_embd for a tied output
        gname = gguf_name(k)
        perm = rows(k.rsplit(".", 1)[0])
        t = v.detach()
        raw, qt = _float_tensor(t[perm] if perm is not None else t)
        tensors.append((gname, raw, qt, _Plan(gname, qt, True)))
    seen = [t[0] for t in tensors]
    if len(set(seen)) != len(seen):
        raise FormatError("two tensors map to the same GGUF name; the model layout is not "
                          "the one the export knows")

    counts: dict[str, int] = {}
    for _, _, qt, _ in tensors:
        counts[qt] = counts.get(qt, 0) + 1
    main_type = max((c for c in counts if c.startswith("q")), key=lambda c: counts[c],
                    default="f16")
    tmp = _atomic_file(out, overwrite)
    try:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(Path(info.path).name)
        _arch_metadata(w, config, arch)
        w.add_file_type(getattr(gguf.LlamaFileType, "MOSTLY_" + main_type.upper()))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tok = _tokenizer_metadata(w, Path(info.path), config.vocab_size)
        for gname, raw, qt, _ in tensors:
            if qt in ("f32", "f16"):
                w.add_tensor(gname, raw)
            else:
                w.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=qtype_enum(qt))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    plans = [p for *_, p in tensors]
    inexact = [p for p in plans if not p.exact]
    rep: dict[str, Any] = {
        "source": str(src), "out": str(out), "arch": arch, "bytes": out.stat().st_size,
        "tensors": len(tensors), "types": counts, "exact": not inexact,
        "exact_tensors": len(plans) - len(inexact), **tok,
    }
    requant = [p for p in inexact if p.stats.get("requantized")]
    if requant:
        rep["requantized"] = {p.name: {"type": p.qtype,
                                       "relative_error": p.stats["relative_error"],
                                       "max_abs_error": p.stats["max_abs_error"]}
                              for p in requant}
    q41 = [p.stats for p in plans if "m_inexact_blocks" in p.stats]
    if q41:
        rounded = [p for p in inexact if not p.stats.get("requantized")]
        rep["q4_1"] = {
            "blocks": sum(s["blocks"] for s in q41),
            "m_inexact_blocks_at_offset_8": sum(s["m_inexact_blocks_at_offset_8"] for s in q41),
            "m_inexact_blocks": sum(s["m_inexact_blocks"] for s in q41),
            "tensors_not_bit_exact": len(rounded),
            "max_abs_error": max((p.stats["max_abs_error"] for p in rounded), default=0.0),
            "max_relative_error": max((p.stats["relative_error"] for p in rounded),
                                      default=0.0),
        }
        if rounded:
            log.warning("Q4_1: the fp16 block offset m = z - o*s is not exact in %d of %d "
                        "blocks (%d tensors); largest weight error %.3g (relative error of a "
                        "tensor at most %.3g)", rep["q4_1"]["m_inexact_blocks"],
                        rep["q4_1"]["blocks"], len(rounded), rep["q4_1"]["max_abs_error"],
                        rep["q4_1"]["max_relative_error"])
    return rep


def _module_name(model: nn.Module, mod: nn.Module) -> str:
    for n, m in model.named_modules():
        if m is mod:
            return n
    return "\0"
