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
from ..formats import PARAM_DTYPES, check_grid_fields


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
        check_grid_fields(self.bits, self.group_size, self.sym, self.param_dtype, self.sparsity,
                          self.integer_zeros)

    @property
    def torch_param_dtype(self) -> torch.dtype:
        return PARAM_DTYPES[self.param_dtype]


class Options:
    """Validated reads of ``spec.options`` for the pass ``name``: unknown keys, and values of
    the wrong kind, raise :class:`ConfigError` naming the pass and the option."""

    def __init__(self, spec: QuantSpec, name: str, known: set[str]) -> None:
        self.opts = dict(spec.options or {})
        self.name = name
        unknown = set(self.opts) - set(known)
        if unknown:
            raise ConfigError(f"unknown {name} option(s) {sorted(unknown)}; known: {sorted(known)}")

    def _bad(self, key: str, what: str, v: Any) -> ConfigError:
        return ConfigError(f"{self.name} option {key!r} must be {what}, got {v!r}")

    def number(self, key: str, default: float) -> float:
        """A non-negative number."""
        v = self.opts.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise self._bad(key, "a non-negative number", v)
        return float(v)

    def integer(self, key: str, default: Optional[int], lo: int = 1) -> Optional[int]:
        """An integer ``>= lo`` (``None`` only as the default of an optional option)."""
        v = self.opts.get(key, default)
        if v is None and default is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise self._bad(key, "a positive integer" if lo == 1 else f"an integer >= {lo}", v)
        return v

    def flag(self, key: str, default: bool) -> bool:
        v = self.opts.get(key, default)
        if not isinstance(v, bool):
            raise self._bad(key, "true or false", v)
        return v

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        v = self.opts.get(key, default)
        if v not in choices:
            raise self._bad(key, f"one of {choices}", v)
        return v

    def factors(self, key: str, default: tuple[float, ...]) -> tuple[float, ...]:
        """A non-empty list of factors in (0, 1] (e.g. a clipping grid)."""
        v = self.opts.get(key, default)
        try:
            grid = tuple(float(c) for c in v)
        except (TypeError, ValueError):
            raise self._bad(key, "a list of numbers", v) from None
        if not grid or not all(0.0 < c <= 1.0 for c in grid):
            raise self._bad(key, "non-empty with factors in (0, 1]", v)
        return grid
