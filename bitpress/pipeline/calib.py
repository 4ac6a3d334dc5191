"""Calibration data: seeded random token windows from a plain-text file.

The text is read as UTF-8 (NUL bytes or invalid UTF-8 are refused), tokenised in one pass
without special tokens (the same tokenisation as the perplexity protocol), and
``nsamples`` windows of ``seqlen`` tokens are drawn at seeded uniformly random start
positions (windows may overlap when the text is short). Without a file the default is
:func:`bitpress.pipeline.data.builtin_text` — the prose of CPython's documentation topics
(``pydoc_data.topics``), shipped with every Python, so calibration works offline.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from ..errors import ConfigError
from .data import builtin_text
from .evaluate import read_text, tokenize_text

log = logging.getLogger(__name__)


def calibration_text(path: Optional[str | os.PathLike]) -> tuple[str, str]:
    """(text, description of where it came from)."""
    if path is None:
        return builtin_text(), "builtin:pydoc_data.topics"
    return read_text(path), str(path)


def calibration_windows(tokenizer, text: str, nsamples: int = 128, seqlen: int = 512,
                        seed: int = 0, context: Optional[int] = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` long tensor of token windows drawn with ``seed``."""
    if nsamples < 1:
        raise ConfigError(f"--nsamples must be positive, got {nsamples}")
    if seqlen < 2:
        raise ConfigError(f"--seqlen must be at least 2, got {seqlen}")
    if context is not None and seqlen > context:
        raise ConfigError(f"calibration seqlen {seqlen} exceeds the model's context of "
                          f"{context} tokens; pass a smaller --seqlen")
    ids = tokenize_text(tokenizer, text)
    if ids.numel() < seqlen:
        raise ConfigError(f"the calibration text has {ids.numel()} tokens, shorter than one "
                          f"window of {seqlen}; give a longer --calib file or a smaller --seqlen")
    if nsamples * seqlen > ids.numel():
        log.warning("the calibration text has %d tokens, fewer than the %d x %d = %d asked for: "
                    "the windows overlap (each token is used about %.1f times), so the "
                    "calibration is less varied than its size suggests; give a longer "
                    "--calib text or fewer --nsamples", ids.numel(), nsamples, seqlen,
                    nsamples * seqlen, nsamples * seqlen / ids.numel())
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=g, device="cpu")
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
