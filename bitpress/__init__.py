"""bitpress: press trained models into few-bit packed weights and run them fast."""
from .errors import BitpressError

__version__ = "0.1.0"
__all__ = ["BitpressError", "__version__"]
