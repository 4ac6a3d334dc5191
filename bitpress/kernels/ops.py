"""The ``bitpress`` torch.library ops and the per-device dispatch layer.

Ops (namespace ``bitpress``)::

    dense_qmm(x, qweight, scales, zeros, bias?, bits, group_size, in_features) -> y
    sparse_qmm(x, row_ptr, col_idx, qvalues, scales, zeros, bias?, bits, group_size,
               in_features) -> y

``x`` is ``[..., in_features]`` (float32 / bfloat16 / float16, any leading batch), ``y`` is
``[..., out_features]`` in ``x``'s dtype. ``group_size`` is the *effective* group size
(``in_features`` for per-channel). Weights are the canonical tensors of
:mod:`bitpress.formats` (dense: ``qweight [out, ceil(in/pf)]``, ``scales/zeros
[out, n_groups]``; block-sparse rows: see ``QuantizedWeight.pack_bsr``).

Each op has a reference implementation (:mod:`.reference`), a fake implementation for
``torch.compile`` and an autograd formula (gradients for ``x``, ``scales``, ``zeros`` and
``bias``; the integer codes are constant). Fast kernels register themselves with
:func:`register_impl` for a device type; the op picks the highest-priority one that
accepts the call, and otherwise runs the reference with a one-time warning.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from ..formats.packing import unpack_codes
from . import native, reference

log = logging.getLogger(__name__)


# ---- dispatch registry ----------------------------------------------------------------------
@dataclass(frozen=True)
class Impl:
    name: str
    fn: Callable[..., torch.Tensor]
    priority: int = 0
    #: optional predicate over the op's arguments; False means "not for this call"
    supports: Optional[Callable[..., bool]] = None


_REGISTRY: dict[tuple[str, str], list[Impl]] = {}
_WARNED: set[tuple[str, str]] = set()
_LOCAL = threading.local()


def register_impl(op: str, device_type: str, name: str, fn: Callable[..., torch.Tensor],
                  priority: int = 0, supports: Optional[Callable[..., bool]] = None) -> None:
    """Register a fast implementation of ``op`` ("dense_qmm" / "sparse_qmm") for a device
    type ("cpu", "cuda", ...). ``fn`` takes exactly the op's arguments."""
    impls = [i for i in _REGISTRY.get((op, device_type), []) if i.name != name]
    impls.append(Impl(name, fn, priority, supports))
    impls.sort(key=lambda i: -i.priority)
    _REGISTRY[(op, device_type)] = impls


def registered_impls(op: str, device_type: str) -> list[str]:
    return [i.name for i in _REGISTRY.get((op, device_type), [])] + ["reference"]


@contextlib.contextmanager
def use_impl(name: str) -> Iterator[None]:
    """Force one implementation by name (``"reference"`` or a registered name) in this
    thread; raises at call time if the forced one is not registered for the device."""
    prev = getattr(_LOCAL, "forced", None)
    _LOCAL.forced = name
    try:
        yield
    finally:
        _LOCAL.forced = prev


def _forced() -> Optional[str]:
    return getattr(_LOCAL, "forced", None) or os.environ.get("BITPRESS_KERNEL") or None


def select_impl(op: str, device_type: str, *args) -> tuple[str, Callable[..., torch.Tensor]]:
    ref = getattr(reference, f"{op}_ref")
    impls = _REGISTRY.get((op, device_type), [])
    forced = _forced()
    if forced == "reference":
        return "reference", ref
    if forced:
        for i in impls:
            if i.name == forced:
                return i.name, i.fn
        raise RuntimeError(f"bitpress::{op}: implementation {forced!r} is not registered for "
                           f"{device_type} (have {registered_impls(op, device_type)})")
    for i in impls:
        if i.supports is None or i.supports(*args):
            return i.name, i.fn
    if device_type == "cpu":
        native.require_if_asked(f"bitpress::{op} on cpu")
    if (op, device_type) not in _WARNED:
        _WARNED.add((op, device_type))
        why = native.reason() if device_type == "cpu" else None
        warnings.warn(f"bitpress::{op}: no fast kernel for this call on {device_type}; using "
                      f"the pure-torch reference (correct but slow)"
                      + (f": {why} (docs/install.md)" if why else ""), RuntimeWarning, stacklevel=3)
    return "reference", ref


# ---- the ops ---------------------------------------------------------------------------------
def _check_common(x: torch.Tensor, in_features: int, bits: int, group_size: int) -> None:
    torch._check(x.shape[-1] == in_features,
                 lambda: f"x has {x.shape[-1]} features, weight expects {in_features}")
    torch._check(x.dtype in (torch.float32, torch.bfloat16, torch.float16),
                 lambda: f"x must be float32/bfloat16/float16, got {x.dtype}")
    torch._check(bits in (2, 3, 4, 8), lambda: f"unsupported bits {bits}")
    torch._check(group_size > 0, lambda: "group_size must be the effective (positive) size")


@torch.library.custom_op("bitpress::dense_qmm", mutates_args=())
def dense_qmm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              zeros: torch.Tensor, bias: Optional[torch.Tensor], bits: int, group_size: int,
              in_features: int) -> torch.Tensor:
    _check_common(x, in_features, bits, group_size)
    args = (x, qweight, scales, zeros, bias, bits, group_size, in_features)
    _, fn = select_impl("dense_qmm", x.device.type, *args)
    return fn(*args)


@dense_qmm.register_fake
def _(x, qweight, scales, zeros, bias, bits, group_size, in_features):
    _check_common(x, in_features, bits, group_size)
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("bitpress::sparse_qmm", mutates_args=())
def sparse_qmm(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
               qvalues: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               bias: Optional[torch.Tensor], bits: int, group_size: int,
               in_features: int) -> torch.Tensor:
    _check_common(x, in_features, bits, group_size)
    args = (x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, group_size, in_features)
    _, fn = select_impl("sparse_qmm", x.device.type, *args)
    return fn(*args)


@sparse_qmm.register_fake
def _(x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, group_size, in_features):
    _check_common(x, in_features, bits, group_size)
    return x.new_empty(*x.shape[:-1], row_ptr.shape[0] - 1)


# ---- autograd -------------------------------------------------------------------------------
def _group_sum(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum ``[out, in]`` over groups of columns → ``[out, n_groups]`` (short last group)."""
    out, n = t.shape
    ng = (n + group_size - 1) // group_size
    pad = ng * group_size - n
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.reshape(out, ng, group_size).sum(-1)


def _dense_setup(ctx, inputs, output):
    x, qweight, scales, zeros, bias, bits, group_size, in_features = inputs
    ctx.save_for_backward(x, qweight, scales, zeros)
    ctx.meta = (bits, group_size, in_features, bias is not None,
                bias.dtype if bias is not None else None)


def _dense_backward(ctx, grad):
    x, qweight, scales, zeros = ctx.saved_tensors
    bits, gs, n, has_bias, bias_dtype = ctx.meta
    need_x, _, need_s, need_z, need_b = ctx.needs_input_grad[:5]
    g2 = grad.reshape(-1, grad.shape[-1]).float()
    gx = gs_ = gz = gb = None
    w = reference.dense_weight(qweight, scales, zeros, bits, gs, n)
    if need_x:
        gx = (g2 @ w).reshape(x.shape).to(x.dtype)
    if need_s or need_z:
        gw = g2.t() @ x.reshape(-1, n).float()
        if need_z:
            gz = _group_sum(gw, gs).to(zeros.dtype)
        if need_s:
            codes = unpack_codes(qweight, bits, n).float()
            gs_ = _group_sum(gw * codes, gs).to(scales.dtype)
    if need_b and has_bias:
        gb = g2.sum(0).to(bias_dtype)
    return gx, None, gs_, gz, gb, None, None, None


dense_qmm.register_autograd(_dense_backward, setup_context=_dense_setup)


def _sparse_setup(ctx, inputs, output):
    x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, group_size, in_features = inputs
    ctx.save_for_backward(x, row_ptr, col_idx, qvalues, scales, zeros)
    ctx.meta = (bits, group_size, in_features, bias is not None,
                bias.dtype if bias is not None else None)


def _sparse_backward(ctx, grad):
    x, row_ptr, col_idx, qvalues, scales, zeros = ctx.saved_tensors
    bits, gs, n, has_bias, bias_dtype = ctx.meta
    need = ctx.needs_input_grad
    need_x, need_s, need_z, need_b = need[0], need[4], need[5], need[6]
    g2 = grad.reshape(-1, grad.shape[-1]).float()
    gx = gsc = gz = gb = None
    if need_x:
        w = reference.sparse_weight(row_ptr, col_idx, qvalues, scales, zeros, bits, gs, n)
        gx = (g2 @ w).reshape(x.shape).to(x.dtype)
    if need_s or need_z:
        out = row_ptr.numel() - 1
        ng = (n + gs - 1) // gs
        gw = g2.t() @ x.reshape(-1, n).float()
        gw = torch.nn.functional.pad(gw, (0, ng * gs - n)).reshape(out, ng, gs)
        rp = row_ptr.long()
        rows = torch.repeat_interleave(torch.arange(out, device=gw.device), rp[1:] - rp[:-1])
        gk = gw[rows, col_idx.long()]  # [nnz, gs]
        if need_z:
            gz = gk.sum(-1).to(zeros.dtype)
        if need_s:
            codes = unpack_codes(qvalues, bits, gs).float()
            gsc = (gk * codes).sum(-1).to(scales.dtype)
    if need_b and has_bias:
        gb = g2.sum(0).to(bias_dtype)
    return gx, None, None, None, gsc, gz, gb, None, None, None


sparse_qmm.register_autograd(_sparse_backward, setup_context=_sparse_setup)
