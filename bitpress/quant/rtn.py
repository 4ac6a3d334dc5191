"""Round-to-nearest: the data-free baseline pass."""
from __future__ import annotations

from typing import Optional

import torch

from ..formats import QuantizedWeight, quantize_rtn
from .spec import QuantSpec


def rtn(W: torch.Tensor, H: Optional[torch.Tensor], spec: QuantSpec) -> QuantizedWeight:
    """Min/max round-to-nearest per group (``H`` is ignored)."""
    return quantize_rtn(W.detach(), spec.bits, spec.group_size, sym=spec.sym,
                        param_dtype=spec.torch_param_dtype, integer_zero=spec.integer_zeros)
