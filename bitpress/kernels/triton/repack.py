"""Load-time repack of the canonical tensors into the layouts the Triton kernels read, cached
per weight (keyed by ``id`` of the owning tensor and validated by a weak reference plus the
storage pointer, version counter, shape and dtype of every tensor the repack read, like the
CPU kernels' cache: an in-place update or a recycled id triggers a fresh repack; entries die
with the tensor). The disk format is untouched.

* dense: ``qw`` = ``qweight.T`` (int32 ``[ceil(in/pf), out]``, K-major so tiles load
  coalesced along the output dim), ``s``/``z`` = ``scales.T``/``zeros.T`` ``[n_groups, out]``
  in their own dtype when fp16/bf16/fp32 (scale/zero bytes matter at 2 bits: fp16 adds
  4 bytes to every 16-byte W2 g64 group).
* sparse: the BSR arrays, contiguous, plus ``rows`` int32 ``[nnz]`` (row of each kept
  group) for the task-centric kernel; validated once here. ``densified`` (built only when a
  large batch asks for it) is the dense repack of the same weight with pruned groups as
  scale = zero = 0, so large batches run the tensor-core GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ...formats.packing import pack_codes, packed_words, unpack_codes
from ..repack_cache import RepackCache, tensor_sig

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_CACHE = RepackCache()
_sig = tensor_sig


def clear_cache() -> None:
    _CACHE.clear()


def _cached(owner: torch.Tensor, sig: tuple, build: Callable[[], Any]) -> Any:
    return _CACHE.get(owner, sig, build)


def _param(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in _FLOATS else t.float()


@dataclass
class DensePacked:
    qw: torch.Tensor      # int32 [KW, N]
    s: torch.Tensor       # [NG, N]
    z: torch.Tensor       # [NG, N]
    n: int
    k: int
    bits: int
    gs: int


@dataclass
class SparsePacked:
    row_ptr: torch.Tensor  # int32 [N + 1]
    rows: torch.Tensor     # int32 [nnz]
    cols: torch.Tensor     # int32 [nnz]
    qv: torch.Tensor       # int32 [nnz, WPG]
    s: torch.Tensor        # [nnz]
    z: torch.Tensor        # [nnz]
    n: int
    k: int
    bits: int
    gs: int
    nnz: int
    extra: dict = field(default_factory=dict)   # lazily built: "densified" -> DensePacked


def dense_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 gs: int, in_features: int) -> DensePacked:
    sig = (_sig(qweight), _sig(scales), _sig(zeros), bits, gs, in_features)

    def build() -> DensePacked:
        if bits not in (2, 3, 4):
            raise ValueError(f"triton dense_qmm: bits must be 2, 3 or 4, got {bits}")
        if qweight.dtype != torch.int32 or qweight.dim() != 2 \
                or qweight.shape[1] != packed_words(in_features, bits):
            raise ValueError(f"triton dense_qmm: qweight must be int32 [out, "
                             f"{packed_words(in_features, bits)}], got {qweight.dtype} "
                             f"{tuple(qweight.shape)}")
        out = qweight.shape[0]
        ng = (in_features + gs - 1) // gs
        if tuple(scales.shape) != (out, ng) or tuple(zeros.shape) != (out, ng):
            raise ValueError(f"triton dense_qmm: scales/zeros must be {(out, ng)}, got "
                             f"{tuple(scales.shape)} / {tuple(zeros.shape)}")
        return DensePacked(qweight.t().contiguous(), _param(scales).t().contiguous(),
                           _param(zeros).t().contiguous(), out, in_features, bits, gs)

    return _cached(qweight, sig, build)


def sparse_packed(row_ptr: torch.Tensor, col_idx: torch.Tensor, qvalues: torch.Tensor,
                  scales: torch.Tensor, zeros: torch.Tensor, bits: int, gs: int,
                  in_features: int) -> SparsePacked:
    sig = (_sig(row_ptr), _sig(col_idx), _sig(qvalues), _sig(scales), _sig(zeros), bits, gs,
           in_features)

    def build() -> SparsePacked:
        if bits not in (2, 3, 4):
            raise ValueError(f"triton sparse_qmm: bits must be 2, 3 or 4, got {bits}")
        for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx), ("qvalues", qvalues)):
            if t.dtype != torch.int32:
                raise ValueError(f"triton sparse_qmm: {name} must be int32, got {t.dtype}")
        nnz = col_idx.numel()
        wpg = packed_words(gs, bits)
        if qvalues.dim() != 2 or tuple(qvalues.shape) != (nnz, wpg):
            raise ValueError(f"triton sparse_qmm: qvalues must be [{nnz}, {wpg}], got "
                             f"{tuple(qvalues.shape)}")
        if scales.numel() != nnz or zeros.numel() != nnz:
            raise ValueError("triton sparse_qmm: scales/zeros need one entry per kept group")
        rp = row_ptr.contiguous()
        n = rp.numel() - 1
        ng = (in_features + gs - 1) // gs
        rpl = rp.long()
        counts = rpl[1:] - rpl[:-1]
        if int(rpl[0]) != 0 or int(rpl[-1]) != nnz or bool((counts < 0).any()):
            raise ValueError("triton sparse_qmm: row_ptr must start at 0, not decrease and end "
                             "at nnz")
        ci = col_idx.contiguous()
        if nnz and (int(ci.min()) < 0 or int(ci.max()) >= ng):
            raise ValueError(f"triton sparse_qmm: col_idx out of range [0, {ng})")
        rows = torch.repeat_interleave(torch.arange(n, device=rp.device, dtype=torch.int32),
                                       counts)
        return SparsePacked(rp, rows.contiguous(), ci, qvalues.contiguous(),
                            _param(scales).reshape(-1).contiguous(),
                            _param(zeros).reshape(-1).contiguous(), n, in_features, bits, gs,
                            nnz)

    return _cached(qvalues, sig, build)


def densified(sp: SparsePacked) -> DensePacked:
    """Dense repack of a block-sparse weight (pruned groups: codes 0, scale = zero = 0)."""
    hit: Optional[DensePacked] = sp.extra.get("densified")
    if hit is not None:
        return hit
    n, k, gs, bits = sp.n, sp.k, sp.gs, sp.bits
    ng = (k + gs - 1) // gs
    dev = sp.qv.device
    rows, cols = sp.rows.long(), sp.cols.long()
    codes = torch.zeros(n, ng, gs, dtype=torch.int8, device=dev)
    codes[rows, cols] = unpack_codes(sp.qv, bits, gs)
    qweight = pack_codes(codes.reshape(n, ng * gs)[:, :k].contiguous(), bits)
    s = torch.zeros(n, ng, dtype=sp.s.dtype, device=dev)
    z = torch.zeros(n, ng, dtype=sp.z.dtype, device=dev)
    s[rows, cols] = sp.s
    z[rows, cols] = sp.z
    dp = DensePacked(qweight.t().contiguous(), s.t().contiguous(), z.t().contiguous(), n, k,
                     bits, gs)
    sp.extra["densified"] = dp
    return dp
