"""``bitpress export CKPT --format onnx|openvino``: a packed decoder as an ONNX graph whose
linears are ONNX Runtime ``com.microsoft.MatMulNBits`` ops, or as an OpenVINO IR whose
linears are group-wise u4/u8 compressed constants, both taken from the checkpoint's codes,
scales and zeros (nothing is re-quantized).

The graph is written op by op with ``onnx.helper`` (no tracing). One graph serves prefill
and decode, in the onnxruntime-genai convention:

* inputs ``input_ids`` int64 ``[batch, seq]``, ``attention_mask`` int64 ``[batch, total]``
  (1 = attend; ``total = past + seq``), ``position_ids`` int64 ``[batch, seq]``, and per
  layer ``past_key_values.N.key`` / ``.value`` float32 ``[batch, kv_heads, past, head_dim]``
  (``past`` may be 0);
* outputs ``logits`` float32 ``[batch, seq, vocab]`` and ``present.N.key`` / ``.value``
  (``[batch, kv_heads, total, head_dim]``).

Weight mapping. bitpress stores ``W = s·c + z`` per group with signed codes
``c ∈ [-2^(b-1), 2^(b-1)-1]``; MatMulNBits computes ``W = (q - zp)·s`` per block. Two exact
encodings exist, and the export uses the fast one:

* ONNX (default): ``q = c + 2^(b-1)`` with the op's default zero point ``2^(b-1)``, so the op
  computes ``s·c`` (exact: a small integer times an fp16-born scale), and the zeros are added
  as ``(Σ_group x)·zᵀ``: one MatMul of the input with a 0/1 group indicator (shared by
  q/k/v and by gate/up) and one ``[n_groups, out]`` MatMul per linear. Float zero points
  ``zp = 2^(b-1) - z/s`` are also exact to float32 rounding (:func:`affine_codes`, used for
  OpenVINO), but onnxruntime 1.32's CPU kernel takes a far slower path with float zero
  points (~7 ms vs ~0.3 ms for a 576x1536 W4 GEMV, bench/onnx_matmulnbits.py) and
  refuses them at 8 bits.
* block size: MatMulNBits takes power-of-two blocks ≥ 16; a bitpress group (a multiple of
  16) is cut into blocks of its largest power-of-two divisor (≤ 256) with the group's
  scale repeated, which is exact; the short last group of a row stays short.
* 2-, 4- and 8-bit codes map natively; 3-bit codes go in the 4-bit container (exact, 4 bits
  a weight). ``container_2bit=4`` also puts 2-bit codes in 4-bit blocks: exact, twice the
  bytes, but onnxruntime's fp32 2-bit kernel is slow (~8 ms vs ~0.3 ms at 4 bits, same GEMV).
* ``accuracy_level``: 0 (default) computes in float32 (exact); 4 lets ORT quantize the
  activations to int8 per block (faster, like llama.cpp's Q8 activations; not exact).
* a group with ``s = 0`` is the constant ``z``: the op gives 0 and the zero term adds ``z``;
  pruned groups of a group-sparse layer (GQSA) are such groups with ``z = 0``: they are
  exported **dense**, zero groups included (MatMulNBits has no sparse form, so group
  sparsity saves no bytes or time there).
* unquantized linears (an fp32 or fp16 head) stay float MatMuls; a tied head reads the
  embedding table through ``Gemm(transB=1)`` (stored once).

The OpenVINO IR is built from the same graph with each linear as the compressed-weight
pattern OpenVINO's CPU plugin recognises (u4/u8 constant ``[out, groups, group]`` →
Convert → Subtract zero point → Multiply scale → Reshape → MatMul), converted with
``openvino.convert_model`` (which keeps the low-bit constants) and saved without fp16
compression. 2- and 3-bit codes go in the u4 container.

Refused with :class:`~bitpress.errors.ConfigError`: architectures other than Llama-style
(``llama``, ``qwen2``), sliding-window attention, activations other than SiLU, and rotary
scalings whose frequencies depend on the sequence length (``dynamic``, ``longrope``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, OutputExistsError, SourceError
from ..formats.checkpoint import atomic_output_dir
from ..formats.qweight import QuantizedWeight, expand_groups

log = logging.getLogger(__name__)

ARCHS = ("llama", "qwen2")
FORMATS = ("onnx", "openvino")
ONNX_FILE, OV_FILE = "model.onnx", "openvino_model.xml"
OPSET = 21
NBITS_OK = (2, 4, 8)  # what ORT's CPU MatMulNBits accepts (checked on onnxruntime 1.32)


def _require(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(f"this needs the {name!r} package: pip install 'bitpress[export]' "
                          f"(onnx, onnxruntime, openvino)") from None


# ---- weight mapping (pure tensor maths, tested on its own) -----------------------------------
def _container_bits(bits: int, allowed: tuple[int, ...]) -> int:
    for b in sorted(allowed):
        if b >= bits:
            return b
    raise ConfigError(f"{bits}-bit codes have no container among {allowed}")


def affine_codes(qw: QuantizedWeight, cbits: int) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """``(q, s, zp)`` with ``W = (q - zp)·s`` per group: ``q`` uint8 ``[out, in]`` in
    ``[0, 2^cbits)``, ``s`` and ``zp`` float32 ``[out, n_groups]``. Pruned groups count as
    ``s = z = 0``; a group with ``s = 0`` and ``z ≠ 0`` is re-encoded as ``q = 1, zp = 0,
    s = z``."""
    off = 1 << (cbits - 1)
    s, z = qw.scale.double(), qw.zero.double()
    if qw.keep is not None:
        s, z = s * qw.keep, z * qw.keep
    q = qw.codes.to(torch.int16) + off
    dead = s == 0
    zp = torch.where(dead, torch.zeros_like(s), off - z / torch.where(dead, 1.0, s))
    fix = dead & (z != 0)
    if bool(fix.any()):
        q = torch.where(expand_groups(fix, qw.group_size, qw.in_features), 1, q)
        s = torch.where(fix, z, s)
    return q.to(torch.uint8), s.float(), zp.float()


def nbits_block_size(group_size: int, in_features: int) -> int:
    """The MatMulNBits block of a bitpress group: its largest power-of-two divisor (≤ 256),
    or 128 when the row is one group (per-channel)."""
    gs = in_features if group_size == -1 else group_size
    if gs >= in_features:
        return 128
    b = gs & -gs
    while b > 256:
        b //= 2
    if b < 16:
        raise ConfigError(f"group size {gs} has no power-of-two divisor ≥ 16, as "
                          f"MatMulNBits needs")
    return b


def pack_bytes(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes ``[..., n]`` (n a multiple of 8/bits) packed little-endian into bytes."""
    per = 8 // bits
    q = q.astype(np.uint8).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    out = np.zeros(q.shape[:-1], np.uint8)
    for i in range(per):
        out |= (q[..., i] << (i * bits)).astype(np.uint8)
    return out


def nbits_tensors(qw: QuantizedWeight, container_2bit: int = 2) -> dict[str, Any]:
    """MatMulNBits inputs of one packed linear, without zero points (so the op uses its
    default ``2^(b-1)`` and computes ``s·c`` exactly): ``B`` uint8 ``[N, blocks, blob]``,
    ``scales`` float32 ``[N, blocks]``, and ``zero_t`` float32 ``[n_groups, N]`` (``zᵀ``;
    None when every zero is 0) for the separate zero term ``(Σ_group x)·zᵀ``.
    ``container_2bit=4`` stores 2-bit codes in 4-bit blocks (exact; ORT's fp32 kernel is
    only fast at 4 bits)."""
    cbits = _container_bits(qw.bits, (4, 8) if container_2bit == 4 else NBITS_OK)
    n, k = qw.out_features, qw.in_features
    bsz = nbits_block_size(qw.group_size, k)
    nb = (k + bsz - 1) // bsz
    grp = torch.tensor([(j * bsz) // qw.gs for j in range(nb)]) if qw.n_groups > 1 \
        else torch.zeros(nb, dtype=torch.long)
    off = 1 << (cbits - 1)
    s, z = qw.scale.float(), qw.zero.float()
    if qw.keep is not None:
        s, z = s * qw.keep, z * qw.keep
    qp = torch.full((n, nb * bsz), off, dtype=torch.int16)
    qp[:, :k] = qw.codes.to(torch.int16) + off
    return {"bits": cbits, "block_size": bsz, "K": k, "N": n,
            "B": pack_bytes(qp.numpy().reshape(n, nb, bsz), cbits),
            "scales": s[:, grp].contiguous().numpy(),
            "zero_t": z.t().contiguous().numpy() if bool((z != 0).any()) else None}


def ov_tensors(qw: QuantizedWeight) -> dict[str, Any]:
    """OpenVINO compressed-weight tensors: codes uint8 ``[N, chunks, chunk]`` (values fit
    u4 for ≤ 4 bits, else u8), ``scale`` and ``zp`` float32 ``[N, chunks, 1]``; ``chunk`` is
    ``gcd(group, in)`` so the grid is uniform and the short last group needs no padding."""
    cbits = _container_bits(qw.bits, (4, 8))
    n, k = qw.out_features, qw.in_features
    chunk = math.gcd(qw.gs, k) if qw.n_groups > 1 else k
    g = k // chunk
    grp = torch.tensor([(j * chunk) // qw.gs for j in range(g)])
    q, s, zp = affine_codes(qw, cbits)
    return {"bits": cbits, "chunk": chunk, "K": k, "N": n,
            "codes": q.numpy().reshape(n, g, chunk),
            "scale": s[:, grp].contiguous().numpy()[..., None],
            "zp": zp[:, grp].contiguous().numpy()[..., None]}


# ---- graph building --------------------------------------------------------------------------
class _Graph:
    def __init__(self, linear_mode: str) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.mode = linear_mode  # "nbits" (ORT) or "ov" (decompression pattern)
        self._n = 0
        self._consts: dict = {}
        self._gsums: dict = {}
        self.accuracy_level = 0  # fp32 arithmetic (exact); 4 = int8 activations (llama.cpp-like)
        self.container_2bit = 2

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def init(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self.name("const"), arr)
        return self._consts[key]

    def op(self, op_type: str, inputs: list, n_out: int = 1, domain: str = "",
           name: Optional[str] = None, **attrs):
        from onnx import helper

        base = name or op_type
        outs = [self.name(base) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(base + "_n"),
                                           domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    # ---- linears ----
    def linear(self, x: str, mod: nn.Module, name: str) -> str:
        from ..nn.modules import HalfLinear, _PackedLinear

        if isinstance(mod, _PackedLinear):
            qw = mod.quantized_weight()
            y = self._nbits(x, qw, name) if self.mode == "nbits" else self._ov(x, qw, name)
        elif isinstance(mod, (nn.Linear, HalfLinear)):
            w = mod.weight.detach().float().t().contiguous().numpy()
            y = self.op("MatMul", [x, self.init(name + ".weight_t", w)], name=name)
        else:
            raise ConfigError(f"module {name} is a {type(mod).__name__}; the ONNX export "
                              f"handles bitpress packed linears and float linears")
        if getattr(mod, "bias", None) is not None:
            y = self.op("Add", [y, self.init(name + ".bias", mod.bias.detach().float().numpy())])
        return y

    def _nbits(self, x: str, qw: QuantizedWeight, name: str) -> str:
        t = nbits_tensors(qw, self.container_2bit)
        ins = [x, self.init(name + ".B", t["B"]), self.init(name + ".scales", t["scales"])]
        y = self.op("MatMulNBits", ins, domain="com.microsoft", name=name, K=t["K"], N=t["N"],
                    bits=t["bits"], block_size=t["block_size"],
                    accuracy_level=self.accuracy_level)
        if t["zero_t"] is not None:  # y += (per-group sums of x) @ zᵀ
            gsum = self._group_sums(x, qw)
            y = self.op("Add", [y, self.op("MatMul", [gsum, self.init(name + ".zero_t",
                                                                       t["zero_t"])])])
        return y

    def _group_sums(self, x: str, qw: QuantizedWeight) -> str:
        """``x @ E`` with ``E`` the 0/1 ``[in, n_groups]`` group indicator: per-group sums of
        the input, shared by the linears that read the same input (q/k/v, gate/up)."""
        key = (x, qw.gs, qw.in_features)
        if key not in self._gsums:
            e = np.zeros((qw.in_features, qw.n_groups), np.float32)
            e[np.arange(qw.in_features), np.arange(qw.in_features) // qw.gs] = 1.0
            self._gsums[key] = self.op("MatMul", [x, self.init(self.name("group_indicator"),
                                                               e)])
        return self._gsums[key]

    def _ov(self, x: str, qw: QuantizedWeight, name: str) -> str:
        from onnx import TensorProto, helper

        t = ov_tensors(qw)
        codes = t["codes"]
        if t["bits"] == 4:
            ttype = TensorProto.UINT4
            tensor = helper.make_tensor(name + ".codes", ttype, list(codes.shape),
                                        codes.reshape(-1).tolist())
            self.inits.append(tensor)
            cname = name + ".codes"
        else:
            cname = self.init(name + ".codes", codes.astype(np.uint8))
        w = self.op("Cast", [cname], to=TensorProto.FLOAT)
        w = self.op("Sub", [w, self.init(name + ".zp", t["zp"])])
        w = self.op("Mul", [w, self.init(name + ".scale", t["scale"])])
        w = self.op("Reshape", [w, self.const([t["N"], t["K"]])])
        w = self.op("Transpose", [w], perm=[1, 0])
        return self.op("MatMul", [x, w], name=name)


def _check_arch(model) -> dict[str, Any]:
    cfg = model.config
    mt = cfg.model_type
    if mt not in ARCHS:
        raise ConfigError(f"ONNX/OpenVINO export supports the {', '.join(ARCHS)} decoders, not "
                          f"{mt!r}")
    if (getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None)) \
            or "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        raise ConfigError("the model uses sliding-window attention, which the exported graph "
                          "does not implement (full causal attention only)")
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"activation {act!r} is not supported by the export (SiLU only)")
    rot = model.model.rotary_emb
    rope_type = getattr(rot, "rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise ConfigError(f"rotary scaling {rope_type!r} changes the frequencies with the "
                          f"sequence length; the export supports static rotary frequencies")
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"model_type": mt, "layers": cfg.num_hidden_layers, "heads": heads, "kv_heads": kv,
            "head_dim": hd, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
            "eps": float(cfg.rms_norm_eps),
            "inv_freq": rot.inv_freq.detach().float().cpu().numpy(),
            "rope_scaling": float(getattr(rot, "attention_scaling", 1.0)),
            "context": int(getattr(cfg, "max_position_embeddings", 2048))}


def build_graph(model, linear_mode: str = "nbits", accuracy_level: int = 0,
                container_2bit: int = 2):
    """The decoder of a loaded bitpress model (Llama-style) as an ``onnx.ModelProto``."""
    _require("onnx")
    from onnx import TensorProto, helper

    a = _check_arch(model)
    if accuracy_level not in (0, 1, 4):
        raise ConfigError(f"accuracy_level must be 0/1 (fp32, exact) or 4 (int8 activations), "
                          f"got {accuracy_level}")
    if container_2bit not in (2, 4):
        raise ConfigError(f"container_2bit must be 2 or 4, got {container_2bit}")
    g = _Graph(linear_mode)
    g.accuracy_level, g.container_2bit = accuracy_level, container_2bit
    L, nh, kvh, hd = a["layers"], a["heads"], a["kv_heads"], a["head_dim"]
    rep = nh // kvh
    f32 = np.float32
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch", "seq", a["vocab"]])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch", kvh, "past", hd]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", TensorProto.FLOAT, ["batch", kvh, "total", hd]))

    base = model.model
    emb = base.embed_tokens.weight.detach().float().contiguous().numpy()
    emb_name = g.init("embed_tokens.weight", emb)
    x = g.op("Gather", [emb_name, "input_ids"], axis=0)

    # rotary tables from position_ids: [B, S, 1, hd]
    pos = g.op("Cast", ["position_ids"], to=TensorProto.FLOAT)
    pos = g.op("Unsqueeze", [pos, g.const([-1])])
    freqs = g.op("Mul", [pos, g.init("rope.inv_freq", a["inv_freq"].astype(f32))])
    emb_f = g.op("Concat", [freqs, freqs], axis=-1)
    cos, sin = g.op("Cos", [emb_f]), g.op("Sin", [emb_f])
    if a["rope_scaling"] != 1.0:
        sc = g.const([a["rope_scaling"]], f32)
        cos, sin = g.op("Mul", [cos, sc]), g.op("Mul", [sin, sc])
    cos, sin = g.op("Unsqueeze", [cos, g.const([2])]), g.op("Unsqueeze", [sin, g.const([2])])

    # mask [B, 1, 1, S, T]: key j visible to query i iff j <= past + i and attention_mask[j]
    t_len = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(1)], axis=0)
    s_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1)], axis=0)
    past = g.op("Sub", [t_len, s_len])
    qpos = g.op("Unsqueeze", [g.op("Range", [past, t_len, g.const(1)]), g.const([1])])
    kpos = g.op("Range", [g.const(0), t_len, g.const(1)])
    causal = g.op("LessOrEqual", [kpos, qpos])
    pad_ok = g.op("Cast", ["attention_mask"], to=TensorProto.BOOL)
    pad_ok = g.op("Unsqueeze", [pad_ok, g.const([1, 2, 3])])
    allowed = g.op("And", [causal, pad_ok])
    neg = g.const(np.finfo(np.float32).min, f32)
    scale = g.const(hd ** -0.5, f32)
    half = hd // 2

    def rms(h, w, nm):
        v = g.op("ReduceMean", [g.op("Mul", [h, h]), g.const([-1])], keepdims=1)
        r = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [v, g.const(a["eps"], f32)])])])
        return g.op("Mul", [g.op("Mul", [h, r]), g.init(nm, w.detach().float().numpy())])

    def rope(t):
        t1, t2 = g.op("Split", [t, g.const([half, half])], n_out=2, axis=-1)
        rot = g.op("Concat", [g.op("Neg", [t2]), t1], axis=-1)
        return g.op("Add", [g.op("Mul", [t, cos]), g.op("Mul", [rot, sin])])

    for i, layer in enumerate(base.layers):
        p = f"model.layers.{i}"
        at = layer.self_attn
        h = rms(x, layer.input_layernorm.weight, f"{p}.input_layernorm.weight")
        q = g.linear(h, at.q_proj, f"{p}.self_attn.q_proj")
        k = g.linear(h, at.k_proj, f"{p}.self_attn.k_proj")
        v = g.linear(h, at.v_proj, f"{p}.self_attn.v_proj")
        q = rope(g.op("Reshape", [q, g.const([0, 0, nh, hd])]))
        k = rope(g.op("Reshape", [k, g.const([0, 0, kvh, hd])]))
        v = g.op("Reshape", [v, g.const([0, 0, kvh, hd])])
        q = g.op("Transpose", [g.op("Reshape", [q, g.const([0, 0, kvh, rep, hd])])],
                 perm=[0, 2, 3, 1, 4])  # [B, kvh, rep, S, hd]
        k = g.op("Transpose", [k], perm=[0, 2, 1, 3])
        v = g.op("Transpose", [v], perm=[0, 2, 1, 3])
        kk = g.op("Concat", [f"past_key_values.{i}.key", k], axis=2)
        vv = g.op("Concat", [f"past_key_values.{i}.value", v], axis=2)
        g.nodes.append(helper.make_node("Identity", [kk], [f"present.{i}.key"]))
        g.nodes.append(helper.make_node("Identity", [vv], [f"present.{i}.value"]))
        kt = g.op("Transpose", [g.op("Unsqueeze", [kk, g.const([2])])], perm=[0, 1, 2, 4, 3])
        sc = g.op("Mul", [g.op("MatMul", [q, kt]), scale])  # [B, kvh, rep, S, T]
        pr = g.op("Softmax", [g.op("Where", [allowed, sc, neg])], axis=-1)
        ctx = g.op("MatMul", [pr, g.op("Unsqueeze", [vv, g.const([2])])])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 3, 1, 2, 4]),
                               g.const([0, 0, nh * hd])])
        x = g.op("Add", [x, g.linear(ctx, at.o_proj, f"{p}.self_attn.o_proj")])
        h = rms(x, layer.post_attention_layernorm.weight, f"{p}.post_attention_layernorm.weight")
        mlp = layer.mlp
        gate = g.linear(h, mlp.gate_proj, f"{p}.mlp.gate_proj")
        up = g.linear(h, mlp.up_proj, f"{p}.mlp.up_proj")
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        x = g.op("Add", [x, g.linear(act, mlp.down_proj, f"{p}.mlp.down_proj")])

    x = rms(x, base.norm.weight, "model.norm.weight")
    head = model.lm_head
    tied = isinstance(head, nn.Linear) and head.weight.data_ptr() == base.embed_tokens.weight \
        .data_ptr()
    if tied:
        x2 = g.op("Reshape", [x, g.const([-1, a["hidden"]])])
        lg = g.op("Gemm", [x2, emb_name], transB=1)
        lg = g.op("Reshape", [lg, g.op("Concat", [g.op("Shape", ["input_ids"]),
                                                  g.const([a["vocab"]])], axis=0)])
    else:
        lg = g.linear(x, head, "lm_head")
    g.nodes.append(helper.make_node("Identity", [lg], ["logits"]))
    graph = helper.make_graph(g.nodes, f"bitpress_{a['model_type']}", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if linear_mode == "nbits":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    m = helper.make_model(graph, opset_imports=opsets, producer_name="bitpress")
    m.ir_version = min(m.ir_version, 10)
    return m, a


def _genai_config(a: dict, tok, filename: str) -> dict:
    def tid(name):
        v = getattr(tok, name, None)
        return int(v) if v is not None else None

    return {"model": {
        "bos_token_id": tid("bos_token_id"), "eos_token_id": tid("eos_token_id"),
        "pad_token_id": tid("pad_token_id") if tid("pad_token_id") is not None
        else tid("eos_token_id"),
        "context_length": a["context"], "type": a["model_type"], "vocab_size": a["vocab"],
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": filename, "head_size": a["head_dim"], "hidden_size": a["hidden"],
            "num_attention_heads": a["heads"], "num_key_value_heads": a["kv_heads"],
            "num_hidden_layers": a["layers"],
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                       "position_ids": "position_ids",
                       "past_key_names": "past_key_values.%d.key",
                       "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"}}},
        "search": {"do_sample": False, "max_length": a["context"], "num_beams": 1,
                   "past_present_share_buffer": False}}


def _save_onnx(m, path: Path) -> None:
    onnx = _require("onnx")
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def export_runtime(src: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "onnx",
                   overwrite: bool = False, accuracy_level: int = 0,
                   container_2bit: int = 2) -> dict[str, Any]:
    """Write the bitpress checkpoint ``src`` as an ONNX (MatMulNBits) or OpenVINO IR model
    directory ``out_dir`` (atomically), with the tokenizer and ``config.json`` beside it.
    ``src`` is only read. ``accuracy_level`` and ``container_2bit``: see the module doc
    (ONNX only)."""
    from ..nn.modules import _PackedLinear
    from ..pipeline.checkpoint import load, load_tokenizer
    from ..pipeline.source import open_source

    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {fmt!r}")
    _require("onnx")
    if fmt == "openvino":
        _require("openvino")
    info = open_source(src)
    if info.kind != "bitpress":
        raise ConfigError(f"{src} is not a bitpress checkpoint (it is a {info.kind} model); "
                          f"compress it first with `bitpress compress`")
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {out} already exists; choose another path "
                                f"or pass --force to replace it")
    model = load(info.path)
    tok = load_tokenizer(info.path)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, _PackedLinear)}
    bits = sorted({m.bits for m in packed.values()})
    sparse = sum(1 for m in packed.values() if m.scheme()["format"] == "bsr")
    notes = []
    if 3 in bits or (2 in bits and (fmt == "openvino" or container_2bit == 4)):
        wide = [b for b in bits if b in (2, 3) and not (b == 2 and fmt == "onnx"
                                                         and container_2bit == 2)]
        notes.append(f"{'/'.join(map(str, wide))}-bit codes stored in the 4-bit container "
                     f"(exact, 4 bits a weight)")
    if fmt == "onnx" and accuracy_level == 4:
        notes.append("accuracy_level=4: ORT quantizes activations to int8 (not exact)")
    if sparse:
        notes.append(f"{sparse} group-sparse linears exported dense (pruned groups are zero "
                     f"groups; no sparse saving in the runtime)")
    for n_ in notes:
        log.warning("export: %s", n_)
    m, a = build_graph(model, "nbits" if fmt == "onnx" else "ov", accuracy_level,
                       container_2bit)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        if fmt == "onnx":
            _save_onnx(m, tmp / ONNX_FILE)
            (tmp / "genai_config.json").write_text(json.dumps(_genai_config(a, tok, ONNX_FILE),
                                                              indent=2))
        else:
            ov = _require("openvino")
            stage = tmp / "_stage"
            stage.mkdir()
            _save_onnx(m, stage / ONNX_FILE)
            ovm = ov.convert_model(str(stage / ONNX_FILE))
            ov.save_model(ovm, str(tmp / OV_FILE), compress_to_fp16=False)
            shutil.rmtree(stage)
        tok.save_pretrained(tmp)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["bitpress_export"] = {"format": fmt, "bits": bits, "linears": len(packed),
                                  "notes": notes}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {"source": str(src), "out": str(out), "format": fmt, "linears": len(packed),
            "bits": bits, "notes": notes, "bytes": size}
