"""Quantization passes over matrices: RTN, GPTQ, decoupleQ."""
from .rtn import rtn
from .spec import QuantSpec

__all__ = ["QuantSpec", "rtn"]
