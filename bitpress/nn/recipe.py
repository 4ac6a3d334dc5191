"""Recipes: which linears of a model to compress, and how.

A recipe is a small dataclass that round-trips through JSON::

    {"method": "rtn", "bits": 4, "group_size": 128, "sparsity": null,
     "targets": ["*"], "ignore": ["lm_head"]}

A group-sparse recipe may give some linears their own share of pruned groups:
``"sparsity_rules": {"*.down_proj": 0.2, "re:layers\\.0\\.": 0.1}`` (the first matching
pattern wins; unmatched linears take ``sparsity``), e.g. to prune the layers whose loss
grows fastest less and the others more at the same total.

Patterns match module names (``model.layers.0.mlp.up_proj``): shell globs by default,
regular expressions when prefixed ``re:`` (searched, not anchored). ``lm_head`` and every
embedding are excluded by default; only ``nn.Linear`` and GPT-2 ``Conv1D`` are replaced.
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..formats import (PARAM_DTYPES, QuantizedWeight, check_grid_fields, magnitude_keep_mask,
                       quantize_rtn)
from .modules import GroupSparseLinear, QuantLinear, _linear_weight

DEFAULT_IGNORE = ["lm_head", "*embed*", "*wte", "*wpe"]


@dataclass
class Recipe:
    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    sparsity: Optional[float] = None
    sym: bool = False
    param_dtype: str = "float16"
    targets: list[str] = field(default_factory=lambda: ["*"])
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))
    options: dict[str, Any] = field(default_factory=dict)
    sparsity_rules: dict[str, float] = field(default_factory=dict)
    #: zeros on the integer grid (``zero = -zp·scale``, integer ``zp`` in the code range,
    #: exact in ``param_dtype``): exportable to compressed-tensors without rounding
    integer_zeros: bool = False

    def __post_init__(self) -> None:
        check_grid_fields(self.bits, self.group_size, self.sym, self.param_dtype, self.sparsity,
                          self.integer_zeros)
        if self.sparsity is not None and self.group_size == -1:
            raise ConfigError("group sparsity needs a group size (got per-channel)")
        if not isinstance(self.sparsity_rules, dict):
            raise ConfigError(f"sparsity_rules must map module patterns to sparsities, got "
                              f"{self.sparsity_rules!r}")
        if self.sparsity_rules and not self.sparse:
            raise ConfigError("sparsity_rules need a group-sparse recipe (a base sparsity > 0)")
        for pat, v in self.sparsity_rules.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ConfigError(f"sparsity rule {pat!r}: sparsity must lie in [0, 1), got {v!r}")

    def sparsity_for(self, name: Optional[str]) -> Optional[float]:
        """The share of pruned groups for the linear ``name``: the first matching
        ``sparsity_rules`` pattern's, else ``sparsity``."""
        if name is not None:
            for pat, v in self.sparsity_rules.items():
                if _match_any(name, [pat]):
                    return float(v)
        return self.sparsity

    @property
    def torch_param_dtype(self) -> torch.dtype:
        return PARAM_DTYPES[self.param_dtype]

    @property
    def sparse(self) -> bool:
        return bool(self.sparsity)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["integer_zeros"]:  # recorded only when set (older recipes stay the same)
            del d["integer_zeros"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown recipe keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> "Recipe":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read recipe {path}: {e}") from None

    def matches(self, name: str) -> bool:
        return _match_any(name, self.targets) and not _match_any(name, self.ignore)


def _match_any(name: str, patterns: list[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p) or name.split(".")[-1] == p:
            return True
    return False


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def target_linears(model: nn.Module, recipe: Recipe) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every linear the recipe selects, in module order."""
    for name, m in model.named_modules():
        if is_linear(m) and recipe.matches(name):
            yield name, m


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def packed_module(qw: QuantizedWeight, bias: Optional[torch.Tensor],
                  param_dtype: torch.dtype) -> nn.Module:
    """The drop-in module for a solved weight: block-sparse rows when it has a keep mask."""
    if qw.keep is not None:
        return GroupSparseLinear.from_quantized(qw, bias, param_dtype)
    return QuantLinear.from_quantized(qw, bias, param_dtype)


def rtn_quantize_linear(w: torch.Tensor, recipe: Recipe,
                        name: Optional[str] = None) -> QuantizedWeight:
    """The data-free default: magnitude group pruning when the recipe is sparse (at
    ``recipe.sparsity_for(name)``), then RTN."""
    keep = magnitude_keep_mask(w, recipe.group_size, recipe.sparsity_for(name)) \
        if recipe.sparse else None
    return quantize_rtn(w, recipe.bits, recipe.group_size, sym=recipe.sym,
                        param_dtype=recipe.torch_param_dtype, keep=keep,
                        integer_zero=recipe.integer_zeros)


def replace_linears(model: nn.Module, recipe: Recipe,
                    quantize: Optional[Callable[[str, torch.Tensor], QuantizedWeight]] = None,
                    ) -> dict[str, dict[str, Any]]:
    """Replace the selected linears of ``model`` in place with packed modules.

    ``quantize(name, W) -> QuantizedWeight`` solves each weight (default: RTN, with magnitude
    group pruning for sparse recipes). Returns ``{module name: scheme}`` for the
    ``quantization_config``."""
    schemes: dict[str, dict[str, Any]] = {}
    for name, m in list(target_linears(model, recipe)):
        w, b = _linear_weight(m)
        qw = quantize(name, w) if quantize is not None else rtn_quantize_linear(w, recipe, name)
        new = packed_module(qw, b, recipe.torch_param_dtype)
        set_submodule(model, name, new)
        schemes[name] = new.scheme()
    return schemes
