"""Inference-time helpers for packed models: one kernel call for linears that share an input,
and a packed copy of a (tied) output head.

:func:`fuse_linears` groups sibling :class:`QuantLinear` modules that read the same input
(names given by the caller: the pipeline's architecture table,
:func:`bitpress.pipeline.arch.fused_projections`, knows them per family — ``q_proj``/
``k_proj``/``v_proj`` and ``gate_proj``/``up_proj`` for Llama-style models) so that the first
member called runs **one** packed GEMV over the concatenated rows and the other members
pick up their slice of it. The modules, their buffers and the state dict are unchanged (the
checkpoint format does not move); the group keeps a concatenated copy of the packed tensors
(built on first use, rebuilt when a member's tensors are replaced or updated in place).
Exact: codes, scales and zeros are per output row, so every row of the fused call is
computed exactly as in the member's own call (the same kernel, bit for bit).

A member's result is handed out only for the very tensor (and version) the group computed
it from; anything else — another input, autograd, ``torch.compile``, a non-CPU or non-fp32
input, a forced implementation other than the CPU kernels — runs the member on its own.

:func:`fuse_norms` swaps a model's hand-written RMSNorm modules (Llama-style: six or more
elementwise ops per call in eager mode) for ``torch.nn.RMSNorm`` — one fused op sharing the
same weight — where a probe shows the two agree; a decode step of a 30-block model runs 61 of
them, so this is a measurable share of what an eager step costs beside few-bit kernels.

:func:`pack_output_head` replaces a model's output head (``get_output_embeddings()``) by a
packed copy; with tied embeddings the input embedding stays float (opt-in: it changes the
model's numbers, see bench/RESULTS.md "Decode").
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .modules import HalfLinear, QuantLinear

class FusedGroup:
    """Sibling :class:`QuantLinear` modules computed by one packed call (see module doc)."""

    def __init__(self, members: Sequence[QuantLinear]) -> None:
        m0 = members[0]
        self.members = list(members)
        self.index = {id(m): i for i, m in enumerate(members)}
        self.splits = [m.out_features for m in members]
        self.in_features, self.bits, self.group_size = m0.in_features, m0.bits, m0.group_size
        self._fused: Optional[QuantLinear] = None
        self._checks: Optional[tuple] = None  # per member: what the concatenation was made of
        # (x, x version, outputs of the last call; an entry is None once taken)
        self._pending: Optional[tuple] = None

    # ---- the concatenated module ---------------------------------------------------------
    @staticmethod
    def _member_checks(m: QuantLinear) -> Optional[tuple]:
        """(buffer dict, name, tensor, version) of the member's tensors, to see later whether
        they were replaced or updated in place; None when they are not plain buffers (e.g.
        float parts made trainable): such a group is not fused."""
        b = m._buffers
        if b.get("qweight") is None or b.get("scales") is None or b.get("zeros") is None \
                or "bias" in m._parameters:
            return None
        out = []
        for name in ("qweight", "scales", "zeros", "bias"):
            t = b.get(name)
            # inference tensors have no version counter (-1: identity checks only)
            v = None if t is None else (-1 if t.is_inference() else t._version)
            out.append((b, name, t, v))
        return tuple(out)

    @staticmethod
    def _valid(checks: Optional[tuple]) -> bool:
        if checks is None:
            return False
        for b, name, t, v in checks:
            if b.get(name) is not t:
                return False
            if t is not None and v != -1 and t._version != v:
                return False
        return True

    def _build(self) -> Optional[QuantLinear]:
        ms = self.members
        if any(c is None for c in self._checks):
            return None
        qw = [m.qweight for m in ms]
        sc, zr, bs = [m.scales for m in ms], [m.zeros for m in ms], [m.bias for m in ms]
        if (len({t.dtype for t in sc + zr}) != 1 or len({t.device for t in qw + sc + zr}) != 1
                or any(b is None for b in bs) != all(b is None for b in bs)):
            return None
        f = QuantLinear(self.in_features, sum(self.splits), self.bits, self.group_size,
                        bias=bs[0] is not None, param_dtype=sc[0].dtype, device=qw[0].device)
        f.qweight = torch.cat([t.detach() for t in qw])
        f.scales = torch.cat([t.detach() for t in sc])
        f.zeros = torch.cat([t.detach() for t in zr])
        if bs[0] is not None:
            f.bias = torch.cat([b.detach().float() for b in bs])
        return f.eval()

    def fused(self) -> Optional[QuantLinear]:
        """The concatenated module, rebuilt when a member's tensors changed (None when the
        members cannot be fused as they are now)."""
        checks = self._checks
        if checks is None or not all(self._valid(c) for c in checks):
            self._checks = tuple(self._member_checks(m) for m in self.members)
            self._pending = None
            self._fused = self._build()
        return self._fused

    # ---- forward -------------------------------------------------------------------------
    def member_forward(self, member: QuantLinear, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The member's output from the group's call, or ``None`` (run it alone)."""
        if (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling() \
                or x.dtype is not torch.float32 or not x.is_cpu:
            return None
        i = self.index[id(member)]
        # inference tensors track no version (and asking raises, which is slow): their
        # identity alone ties a member's output to the group's call
        xv = -1 if x.is_inference() else x._version
        p = self._pending
        if p is not None and p[0] is x and p[1] == xv:
            # made moments ago by the group's call on this very input (version included),
            # from weights validated then
            y = p[2][i]
            if y is not None:
                p[2][i] = None
                return y
        f = self.fused()
        if f is None:
            return None
        y = f._fast_forward(x)
        if y is None:
            y = f(x)  # binds the kernel's plan on the first call
        outs = list(torch.split(y, self.splits, dim=-1))
        if x.numel() != self.in_features:  # several rows: the slices are strided
            outs = [o.contiguous() for o in outs]
        mine = outs[i]
        outs[i] = None
        self._pending = (x, xv, outs)
        return mine


def fuse_linears(model: nn.Module, groups: Iterable[Sequence[str]]) -> int:
    """Make sibling :class:`QuantLinear` children that share an input (names in one of
    ``groups``, under the same parent; for a transformers model
    ``bitpress.pipeline.arch.fused_projections(model)``) run as one packed call at inference. Only members
    with the same ``in_features``, bits, group size, parameter dtype and bias presence are
    fused. Returns the number of groups formed; :func:`unfuse_linears` undoes it."""
    n = 0
    for parent in model.modules():
        for names in groups:
            mods = [getattr(parent, nm, None) for nm in names]
            if len(mods) < 2 or not all(isinstance(m, QuantLinear) for m in mods):
                continue
            m0 = mods[0]
            if any((m.in_features, m.bits, m.group_size, m.scales.dtype, m.bias is None)
                   != (m0.in_features, m0.bits, m0.group_size, m0.scales.dtype, m0.bias is None)
                   for m in mods):
                continue
            if any(m.__dict__.get("_fused") is not None for m in mods):
                continue
            g = FusedGroup(mods)
            for m in mods:
                m.__dict__["_fused"] = g
            n += 1
    return n


def unfuse_linears(model: nn.Module) -> int:
    """Undo :func:`fuse_linears` (drops the concatenated copies); returns modules released."""
    n = 0
    for m in model.modules():
        if m.__dict__.pop("_fused", None) is not None:
            n += 1
    return n


def pack_output_head(model: nn.Module, bits: int = 4, group_size: int = 128,
                     param_dtype: torch.dtype = torch.float16) -> nn.Module:
    """Replace the model's output head (``get_output_embeddings()``, an ``nn.Linear``) by a
    round-to-nearest packed copy (:class:`QuantLinear`, ``bits`` 2-8), or with ``bits=16`` by
    an unquantised 16-bit copy (:class:`HalfLinear` in ``param_dtype``, fp16 or bf16: half
    the bytes of fp32, only the rounding to 16 bits). A tied input embedding stays float.
    Returns the new head. Opt-in: it changes the model's numbers (bench/RESULTS.md "Decode":
    W4 adds 9-15 % perplexity on SmolLM2-135M, fp16 nothing measurable)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if not isinstance(head, nn.Linear):
        raise ConfigError("pack_output_head: the model has no nn.Linear output head "
                          "(get_output_embeddings())")
    if bits == 16:
        q = HalfLinear.from_linear(head, dtype=param_dtype)
    else:
        q = QuantLinear.from_linear(head, bits=bits, group_size=group_size,
                                    param_dtype=param_dtype)
    q = q.to(head.weight.device)
    if hasattr(model, "set_output_embeddings"):
        model.set_output_embeddings(q)
    else:  # pragma: no cover - HF models have the setter
        raise ConfigError("pack_output_head: the model has no set_output_embeddings()")
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        cfg.tie_word_embeddings = False  # keep HF from re-tying the packed head to the embedding
    return q


def _probe_input(mod: nn.Module, dim: int) -> torch.Tensor:
    w = mod.weight
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, dim, generator=g) * 4.0
    return x.to(device=w.device, dtype=w.dtype)


def fuse_norms(model: nn.Module, rtol: float = 1e-5) -> int:
    """Replace every RMSNorm-like child (a class named ``*RMSNorm`` with a 1-D ``weight`` and
    an ``eps``/``variance_epsilon``) by ``torch.nn.RMSNorm`` holding the **same** weight
    parameter (state-dict names unchanged), after checking on a probe input that both give
    the same output (relative error ≤ ``rtol`` for fp32, bf16/fp16 rounding for those); a
    module whose formula differs (e.g. Gemma's ``1 + weight``) fails the probe and is kept.
    Returns the number replaced. Opt-in: outputs agree to rounding, not bit for bit."""
    n = 0
    for parent in list(model.modules()):
        for name, mod in list(parent.named_children()):
            if isinstance(mod, nn.RMSNorm) or not type(mod).__name__.endswith("RMSNorm"):
                continue
            w = getattr(mod, "weight", None)
            eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
            if not isinstance(w, torch.Tensor) or w.dim() != 1 or not isinstance(eps, float):
                continue
            new = nn.RMSNorm(w.shape[0], eps=eps, elementwise_affine=True,
                             device="meta")
            new.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)
            new.train(mod.training)
            with torch.no_grad():
                x = _probe_input(mod, w.shape[0])
                want, got = mod(x).float(), new(x).float()
            tol = rtol if w.dtype == torch.float32 else 2.0 ** -7
            if want.shape != got.shape or not bool(torch.isfinite(want).all()) or \
                    float((want - got).abs().max()) > tol * float(want.abs().max()) + 1e-6:
                continue
            setattr(parent, name, new)
            n += 1
    return n
