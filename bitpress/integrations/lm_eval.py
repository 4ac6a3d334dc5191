"""lm-eval harness on bitpress models: :func:`hflm` wraps a model (in memory, e.g. from
:func:`bitpress.load`) or a checkpoint directory in lm-eval's ``HFLM``.

From a directory, ``HFLM(pretrained=DIR)`` works as is once bitpress is imported (its
``from_pretrained`` goes through the bitpress quantizer). On the command line use
``python -m bitpress.integrations.lm_eval --model hf --model_args pretrained=DIR ...`` (lm-eval's
CLI with bitpress imported): the plain ``lm_eval`` command parses the ``quantization_config``
itself before loading, so it fails on ``quant_method: bitpress`` even with
``trust_remote_code=True``.
"""
from __future__ import annotations

import os
from typing import Any


def hflm(model_or_dir: Any, tokenizer: Any = None, **kwargs: Any):
    """lm-eval ``HFLM`` over a bitpress model or checkpoint directory (CPU by default)."""
    from ..deps import require

    HFLM = require("lm_eval.models.huggingface", what="the lm-eval harness").HFLM

    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("batch_size", 1)
    if isinstance(model_or_dir, (str, os.PathLike)):
        return HFLM(pretrained=str(model_or_dir), tokenizer=tokenizer, **kwargs)
    if tokenizer is None:
        raise ValueError("pass the tokenizer with an in-memory model "
                         "(bitpress.pipeline.checkpoint.load_tokenizer(DIR))")
    return HFLM(pretrained=model_or_dir, tokenizer=tokenizer, **kwargs)


def main() -> None:
    """``python -m bitpress.integrations.lm_eval ARGS``: lm-eval's own command line with
    bitpress imported first (the ``lm_eval`` command parses ``quantization_config`` before
    any remote code runs, so ``trust_remote_code`` alone is not enough there)."""
    import bitpress  # noqa: F401  (registers the quantizer with transformers)
    from bitpress.deps import require

    cli_evaluate = require("lm_eval.__main__", what="the lm-eval harness").cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
