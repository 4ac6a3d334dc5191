"""Running compressed models: the CPU decode engine (:mod:`bitpress.runtime.engine`)."""
from .engine import DecodeEngine, EngineUnsupported, engine_support

__all__ = ["DecodeEngine", "EngineUnsupported", "engine_support"]
