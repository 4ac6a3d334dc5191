"""Pure-torch reference implementations of the bitpress ops.

They run on any device (the fallback for devices without a fast kernel, e.g. NPUs) and are
the oracle every fast kernel is tested against. Computation is in float32 whatever the
activation dtype; the result is cast back to the activation dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formats.qweight import dequantize_bsr, dequantize_dense

#: dequantised float32 ``[out, in]`` weight of the dense / block-sparse-row packed layouts
#: (``group_size`` effective: ``in_features`` for per-channel); owned by :mod:`bitpress.formats`
dense_weight = dequantize_dense
sparse_weight = dequantize_bsr


def _linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    b = bias.float() if bias is not None else None
    return torch.nn.functional.linear(x.float(), w, b).to(x.dtype)


def dense_qmm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor, bias: Optional[torch.Tensor], bits: int, group_size: int,
                  in_features: int) -> torch.Tensor:
    return _linear(x, dense_weight(qweight, scales, zeros, bits, group_size, in_features), bias)


def sparse_qmm_ref(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                   qvalues: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bias: Optional[torch.Tensor], bits: int, group_size: int,
                   in_features: int) -> torch.Tensor:
    w = sparse_weight(row_ptr, col_idx, qvalues, scales, zeros, bits, group_size, in_features)
    return _linear(x, w, bias)
