"""Which calls the CPU kernels take (the others fall back to the reference)."""
from __future__ import annotations

from typing import Optional

import torch

from ...formats.packing import packed_words
from .config import _PKIND


def _gs_ok(gs: int, in_features: int, allow_per_channel: bool) -> bool:
    if gs >= in_features:
        return allow_per_channel
    return gs % 16 == 0 and 16 <= gs <= 256


def _common_ok(x: torch.Tensor, *tensors: Optional[torch.Tensor]) -> bool:
    if x.device.type != "cpu" or x.dtype not in _PKIND:
        return False
    return all(t is None or t.device.type == "cpu" for t in tensors)


def dense_supports(x, qweight, scales, zeros, bias, bits, group_size, in_features) -> bool:
    return (bits in (2, 3, 4, 8) and _common_ok(x, qweight, scales, zeros, bias)
            and qweight.dtype == torch.int32 and qweight.dim() == 2
            and qweight.shape[1] == packed_words(in_features, bits)
            and scales.is_floating_point() and zeros.is_floating_point()
            and _gs_ok(group_size, in_features, True) and in_features > 0)


def sparse_supports(x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, group_size,
                    in_features) -> bool:
    return (bits in (2, 3, 4) and _common_ok(x, row_ptr, col_idx, qvalues, scales, zeros, bias)
            and row_ptr.dtype == torch.int32 and col_idx.dtype == torch.int32
            and qvalues.dtype == torch.int32 and qvalues.dim() == 2
            and qvalues.shape[1] == packed_words(group_size, bits)
            and scales.is_floating_point() and zeros.is_floating_point()
            and group_size % 16 == 0 and 16 <= group_size <= 256 and in_features > 0)
