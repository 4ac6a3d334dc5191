"""What a pass is asked for, and the pass interface.

A pass is a function ``(W, H, spec) -> QuantizedWeight``: ``W`` float ``[out, in]`` (the
linear's weight, never modified), ``H`` float ``[in, in]`` the input second moment
``XᵀX / n`` (or ``None`` for data-free passes), ``spec`` a :class:`QuantSpec`. Passes know
matrices, not models; the pipeline owns models, calibration and block streaming.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import ConfigError
from ..formats import check_bits, check_group_size, check_integer_zeros

_PARAM_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class QuantSpec:
    bits: int = 4
    group_size: int = 128          # -1: per-channel
    sym: bool = False              # symmetric grid (zero = 0)
    param_dtype: str = "float16"   # dtype of scales/zeros on disk; codes are fitted to it
    sparsity: Optional[float] = None  # share of groups pruned (group-sparse passes)
    options: dict[str, Any] = field(default_factory=dict)  # method-specific knobs
    integer_zeros: bool = False    # zero = -zp·scale with integer zp in the code range

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)
        if self.param_dtype not in _PARAM_DTYPES:
            raise ConfigError(f"param dtype {self.param_dtype!r} not supported; choose one of "
                              f"{sorted(_PARAM_DTYPES)}")
        if self.sparsity is not None and not (0.0 <= self.sparsity < 1.0):
            raise ConfigError(f"sparsity must lie in [0, 1), got {self.sparsity}")
        if not isinstance(self.integer_zeros, bool):
            raise ConfigError(f"integer_zeros must be true or false, got {self.integer_zeros!r}")
        if self.integer_zeros and not self.sym:
            check_integer_zeros(self.bits, self.torch_param_dtype)

    @property
    def torch_param_dtype(self) -> torch.dtype:
        return _PARAM_DTYPES[self.param_dtype]
