"""Pure-torch reference implementations of the bitpress ops.

They run on any device (the fallback for devices without a fast kernel, e.g. NPUs) and are
the oracle every fast kernel is tested against. Computation is in float32 whatever the
activation dtype; the result is cast back to the activation dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formats.packing import unpack_codes


def dense_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int, in_features: int) -> torch.Tensor:
    """Dequantised float32 ``[out, in]`` weight of the canonical dense layout.

    ``group_size`` here is the effective group size (``in_features`` for per-channel)."""
    codes = unpack_codes(qweight, bits, in_features).float()
    s = scales.float().repeat_interleave(group_size, dim=-1)[:, :in_features]
    z = zeros.float().repeat_interleave(group_size, dim=-1)[:, :in_features]
    return codes * s + z


def sparse_weight(row_ptr: torch.Tensor, col_idx: torch.Tensor, qvalues: torch.Tensor,
                  scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                  in_features: int) -> torch.Tensor:
    """Dequantised float32 ``[out, in]`` weight of the block-sparse-row layout (pruned
    groups are 0)."""
    out = row_ptr.numel() - 1
    ng = (in_features + group_size - 1) // group_size
    rp = row_ptr.long()
    rows = torch.repeat_interleave(torch.arange(out, device=qvalues.device), rp[1:] - rp[:-1])
    vals = unpack_codes(qvalues, bits, group_size).float() * scales.float()[:, None] \
        + zeros.float()[:, None]
    w = torch.zeros(out, ng, group_size, dtype=torch.float32, device=qvalues.device)
    w[rows, col_idx.long()] = vals
    return w.reshape(out, ng * group_size)[:, :in_features]


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
