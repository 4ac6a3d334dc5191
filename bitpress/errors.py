"""User-facing errors.

Every mistake a user can make (bad path, bad option, corrupt file) raises a subclass of
:class:`BitpressError` with a message that says what was wrong and what to do. The CLI
prints the message without a traceback and exits non-zero.
"""
from __future__ import annotations


class BitpressError(Exception):
    """Base class of all user-facing bitpress errors."""


class ConfigError(BitpressError, ValueError):
    """An option or quantization parameter is out of range or inconsistent."""


class FormatError(BitpressError, ValueError):
    """A tensor or file does not follow the bitpress format (wrong shape, dtype, corrupt)."""


class SourceError(BitpressError):
    """A source checkpoint is missing, unreadable or of an unsupported kind."""


class OutputExistsError(BitpressError):
    """The output directory exists already (pass --force / overwrite=True to replace it)."""


class NumericalError(BitpressError, ArithmeticError):
    """A computation produced NaN or Inf or could not be carried out (a model's logits that
    are not finite, so no perplexity is printed; a Hessian that cannot be factorised even
    after raising the damping)."""
