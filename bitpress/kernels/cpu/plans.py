"""Lean call paths: a plan binds one weight's arguments once and checks per call only what
can go stale (``QuantLinear`` and the decode engine use them)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from . import config as _cfg
from .calls import _bias
from .config import _C, _ENV_DATA, _ENV_KEY, _MODES
from .gemm import _dense_gemm_fill, _panel_gemm
from .repack import _check_dense, _dense_packed, _sparse_packed
from .support import dense_supports, sparse_supports


def _plan_guard(tensors: tuple, in_features: int):
    """``stale(x)`` for a kernel plan bound to ``tensors`` (``None`` entries skipped): true
    when x is not a contiguous fp32 CPU tensor of ``in_features`` columns, or when a bound
    tensor was updated in place or the mode/ISA/cache generation or a forced implementation
    changed since the plan was made (then the caller takes the regular path)."""
    gen, local, env = _cfg._gen, ops._LOCAL, _ENV_DATA
    forced_local, forced_env = getattr(local, "forced", None), env.get(_ENV_KEY)
    f32 = torch.float32
    ts = [t for t in tensors if t is not None]
    # inference tensors have no version counter (asking raises): identity checks only
    tv = () if any(t.is_inference() for t in ts) else tuple((t, t._version) for t in ts)

    def stale(x: torch.Tensor) -> bool:
        if (x.dtype is not f32 or not x.is_contiguous() or not x.is_cpu or _cfg._gen != gen
                or getattr(local, "forced", None) != forced_local
                or env.get(_ENV_KEY) != forced_env or x.shape[-1] != in_features):
            return True
        for t, v in tv:
            if t._version != v:
                return True
        return False

    return stale


def dense_plan(args: tuple, mode: Optional[str] = None):
    """A lean call path for one dense weight: returns ``fast(x)`` that runs the same kernel
    as :func:`dense_qmm_cpu` with the weight arguments of ``args`` (the op's arguments; the x
    in it is only a sample) bound once, or ``None`` for a call it cannot take.

    ``fast(x)`` returns the output, or ``None`` (then use the regular path) when x is not a
    contiguous fp32 CPU tensor with ``in_features`` columns, when a bound tensor was updated
    in place, or when the mode, ISA, cache or a forced implementation changed since the plan
    was made. It skips what the regular path re-derives per call (support checks, repack
    cache signature, bias conversion): ~3 us of Python instead of ~25 us."""
    x, qweight, scales, zeros, bias, bits, group_size, in_features = args
    if not dense_supports(x, qweight, scales, zeros, bias, bits, group_size, in_features):
        return None
    if mode == "blas":
        return None
    code = _MODES[mode or _cfg._mode]
    if code >= 2 and (bits != 2 or _cfg._isa == "scalar"):
        code = 1
    packed, pk = _dense_packed(qweight, scales, zeros, bits, group_size, in_features,
                               1 if code >= 2 else 0)
    out = qweight.shape[0]
    b, bptr = _bias(bias, out)
    stale = _plan_guard((qweight, scales, zeros, bias), in_features)
    qd, pptr, nthreads, empty = _C.qmm_dense, packed.data_ptr(), torch.get_num_threads, torch.empty
    gemm_rows = _cfg._gemm_rows if mode is None else None
    gemm = None

    def fast(x: torch.Tensor) -> Optional[torch.Tensor]:
        nonlocal gemm
        if stale(x):
            return None
        shape = x.shape
        m = x.numel() // in_features
        if gemm_rows is not None and m >= gemm_rows:
            if gemm is None:
                _check_dense(qweight, scales, zeros, bits, group_size, in_features)
                gemm = _dense_gemm_fill(qweight, scales, zeros, bits, group_size, in_features)
            return _panel_gemm(x.reshape(m, in_features), out, in_features, b,
                               gemm).reshape(*shape[:-1], out)
        y = empty(*shape[:-1], out)
        if m:
            qd(pptr, out, in_features, bits, group_size, pk, x.data_ptr(), m, y.data_ptr(),
               bptr, code, nthreads())
        return y

    fast.keep = (packed, b)  # the bound buffers live as long as the plan
    return fast


def sparse_plan(args: tuple, mode: Optional[str] = None):
    """The lean call path of one group-sparse weight, as :func:`dense_plan` for dense ones:
    ``fast(x)`` runs the tile kernel of :func:`sparse_qmm_cpu` with the weight bound once,
    or returns ``None`` (use the regular path) for an x it does not take (not a contiguous
    fp32 CPU tensor of ``in_features`` columns; GEMM-sized calls of the default mode) or when
    a bound tensor, the mode, the cache or a forced implementation changed."""
    x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, group_size, in_features = args
    if not sparse_supports(x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, group_size,
                           in_features) or mode == "blas":
        return None
    code = min(_MODES[mode or _cfg._mode], 1)
    packed, nnz, pk = _sparse_packed(row_ptr, col_idx, qvalues, scales, zeros, bits,
                                     group_size, in_features)
    out = row_ptr.numel() - 1
    b, bptr = _bias(bias, out)
    stale = _plan_guard((row_ptr, col_idx, qvalues, scales, zeros, bias), in_features)
    qs, tptr, nthreads, empty = _C.qmm_sparse, packed.data_ptr(), torch.get_num_threads, \
        torch.empty
    gemm_rows = _cfg._gemm_rows if mode is None else None

    def fast(x: torch.Tensor) -> Optional[torch.Tensor]:
        if stale(x):
            return None
        shape = x.shape
        m = x.numel() // in_features
        if gemm_rows is not None and m >= gemm_rows:
            return None
        y = empty(*shape[:-1], out)
        if m:
            qs(tptr, nnz, out, in_features, bits, group_size, pk, x.data_ptr(), m,
               y.data_ptr(), bptr, code, nthreads())
        return y

    fast.keep = (packed, b)  # the bound buffers live as long as the plan
    return fast
