"""Drop-in modules with packed weights, and recipe-driven module replacement."""
from .int8 import Int8Conv2d, Int8Linear
from .modules import GroupSparseLinear, HalfLinear, QuantLinear, packed_module_from_scheme
from .recipe import Recipe, packed_module, replace_linears, target_linears

__all__ = ["QuantLinear", "GroupSparseLinear", "HalfLinear", "Recipe", "replace_linears", "target_linears",
           "packed_module", "packed_module_from_scheme", "Int8Conv2d", "Int8Linear"]
