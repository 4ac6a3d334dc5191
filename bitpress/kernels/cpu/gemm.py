"""The GEMM path: dequantised fp32 row panels multiplied by torch's BLAS (exact, like the
reference op)."""
from __future__ import annotations

from typing import Optional

import torch

from .config import _C
from .repack import _params

#: largest dequantised panel of the GEMM path (bytes of fp32 weight)
GEMM_PANEL_BYTES = 8 << 20


def _panel_gemm(x2: torch.Tensor, out: int, in_features: int, b: Optional[torch.Tensor],
                fill) -> torch.Tensor:
    """``x2 [M, in] @ W^T (+ b)`` with ``W`` produced panel by panel: ``fill(r0, r1, dst)``
    writes rows ``[r0, r1)`` of the fp32 weight into ``dst``. One panel when the weight fits
    :data:`GEMM_PANEL_BYTES`, so the call is then exactly the reference op's ``F.linear``."""
    rows = max(8, GEMM_PANEL_BYTES // (4 * in_features))
    if rows >= out:
        w = torch.empty(out, in_features)
        fill(0, out, w)
        return torch.nn.functional.linear(x2, w, b)
    y = torch.empty(x2.shape[0], out)
    w = torch.empty(rows, in_features)
    for r0 in range(0, out, rows):
        r1 = min(out, r0 + rows)
        fill(r0, r1, w)
        y[:, r0:r1] = torch.nn.functional.linear(x2, w[:r1 - r0],
                                                 None if b is None else b[r0:r1])
    return y


def _dense_gemm_fill(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                     gs: int, in_features: int):
    qw = qweight.contiguous()
    sc, zr, pk = _params(scales, zeros)
    words = qw.shape[1]

    def fill(r0: int, r1: int, dst: torch.Tensor) -> None:
        _C.qmm_dequant_dense(qw.data_ptr(), words, in_features, bits, gs, sc.data_ptr(),
                             zr.data_ptr(), pk, r0, r1, dst.data_ptr(), torch.get_num_threads())
    fill.keep = (qw, sc, zr)
    return fill


def _sparse_gemm_fill(row_ptr: torch.Tensor, col_idx: torch.Tensor, qvalues: torch.Tensor,
                      scales: torch.Tensor, zeros: torch.Tensor, bits: int, gs: int,
                      in_features: int):
    rp, ci, qv = row_ptr.contiguous(), col_idx.contiguous(), qvalues.contiguous()
    sc, zr, pk = _params(scales.reshape(-1), zeros.reshape(-1))
    words = qv.shape[1]

    def fill(r0: int, r1: int, dst: torch.Tensor) -> None:
        _C.qmm_dequant_sparse(rp.data_ptr(), ci.data_ptr(), qv.data_ptr(), words, sc.data_ptr(),
                              zr.data_ptr(), pk, in_features, bits, gs, r0, r1, dst.data_ptr(),
                              torch.get_num_threads())
    fill.keep = (rp, ci, qv, sc, zr)
    return fill
