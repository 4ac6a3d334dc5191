"""bitpress: press trained models into few-bit packed weights and run them fast.

Entry points: :func:`save` / :func:`load` (checkpoints), :mod:`bitpress.nn` (drop-in
modules), :mod:`bitpress.formats` (the weight format), :mod:`bitpress.kernels` (ops),
the ``bitpress`` command (:mod:`bitpress.cli`).
"""
from .errors import BitpressError, ConfigError, FormatError, OutputExistsError, SourceError

__version__ = "0.1.0"

from .integrations import install_transformers_hook as _hook  # noqa: E402

_hook()  # transformers' from_pretrained then knows bitpress checkpoints (no import here)


def save(model, out_dir, tokenizer=None, quantization_config=None, overwrite=False, **kw):
    """Write a model holding bitpress modules as a checkpoint (atomically); see
    :func:`bitpress.pipeline.checkpoint.save`."""
    from .pipeline.checkpoint import save as _save

    return _save(model, out_dir, tokenizer, quantization_config, overwrite=overwrite, **kw)


def load(directory, device="cpu"):
    """Rebuild a transformers model from a bitpress checkpoint; see
    :func:`bitpress.pipeline.checkpoint.load`. Its ``generate`` runs on the C++ decode
    engine when it applies (CPU, batch 1; :func:`bitpress.runtime.engine.attach_generate`)."""
    from .pipeline.checkpoint import load as _load
    from .runtime.engine import attach_generate

    return attach_generate(_load(directory, device))


__all__ = ["BitpressError", "ConfigError", "FormatError", "OutputExistsError", "SourceError",
           "save", "load", "__version__"]
