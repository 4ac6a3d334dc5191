"""lm-eval harness on bitpress models: :func:`hflm` wraps a model (in memory, e.g. from
:func:`bitpress.load`) or a checkpoint directory in lm-eval's ``HFLM``.

From a directory, ``HFLM(pretrained=DIR)`` works as is once bitpress is imported (its
``from_pretrained`` goes through the bitpress quantizer); the command line
``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` loads it through the
checkpoint's remote-code loader.
"""
from __future__ import annotations

import os
from typing import Any


def hflm(model_or_dir: Any, tokenizer: Any = None, **kwargs: Any):
    """lm-eval ``HFLM`` over a bitpress model or checkpoint directory (CPU by default)."""
    from lm_eval.models.huggingface import HFLM

    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("batch_size", 1)
    if isinstance(model_or_dir, (str, os.PathLike)):
        return HFLM(pretrained=str(model_or_dir), tokenizer=tokenizer, **kwargs)
    if tokenizer is None:
        raise ValueError("pass the tokenizer with an in-memory model "
                         "(bitpress.pipeline.checkpoint.load_tokenizer(DIR))")
    return HFLM(pretrained=model_or_dir, tokenizer=tokenizer, **kwargs)
