"""Perplexity and generation.

Perplexity protocol (one for every model, compressed or not): the whole text file is read
as UTF-8 and tokenised in one pass without special tokens (no BOS is added); the token
stream is cut into non-overlapping windows of ``seqlen`` tokens (a trailing partial window
is dropped), optionally only the first ``windows`` of them; each window is scored on its
own (no context carried over), every token but the first predicted from its prefix;
perplexity is ``exp`` of the mean negative log-likelihood over all scored tokens.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, NumericalError, SourceError


def read_text(path: str | os.PathLike) -> str:
    """The whole file as UTF-8 text; the NUL check and the decoding cover every byte."""
    p = Path(path)
    if p.is_dir():
        raise SourceError(f"{p} is a directory; give a UTF-8 text file")
    if not p.exists():
        raise SourceError(f"text file {p} does not exist")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SourceError(f"cannot read {p}: {e.strerror or e}") from None
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise SourceError(f"{p} is not a text file (NUL byte at offset {nul})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{p} is not UTF-8 text ({e})") from None
    if not text.strip():
        raise SourceError(f"{p} is empty (no text to read)")
    return text


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long, device="cpu")


def model_context(model) -> Optional[int]:
    cfg = model.config
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def make_windows(ids: torch.Tensor, seqlen: int, windows: Optional[int] = None) -> torch.Tensor:
    if seqlen < 2:
        raise ConfigError(f"seqlen must be at least 2, got {seqlen}")
    n = ids.numel() // seqlen
    if n == 0:
        raise ConfigError(f"the text has {ids.numel()} tokens, shorter than one window of "
                          f"{seqlen}; use a longer text or a smaller --seqlen")
    if windows is not None:
        if windows <= 0:
            raise ConfigError(f"--windows must be positive, got {windows}")
        n = min(n, windows)
    return ids[: n * seqlen].view(n, seqlen)


def next_token_loss(model, ids: torch.Tensor, reduction: str = "mean"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal-LM loss of ``model`` on windows ``ids`` ``[b, L]``: every token but the
    first predicted from its prefix, cross-entropy in float32, ``reduction`` as torch's
    (``"mean"`` over the ``b·(L−1)`` predictions, or ``"sum"``). Returns the loss and the
    float32 logits. The one next-token evaluator of perplexity and of fine-tuning."""
    logits = model(input_ids=ids, use_cache=False).logits.float()
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
        reduction=reduction)
    return loss, logits


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seqlen: int = 1024, windows: Optional[int] = None,
               batch_size: int = 1, progress: bool = True) -> dict[str, Any]:
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    ctx = model_context(model)
    if ctx is not None and seqlen > ctx:
        raise ConfigError(f"seqlen {seqlen} exceeds the model's context of {ctx} tokens")
    ids = tokenize_text(tokenizer, text)
    win = make_windows(ids, seqlen, windows)
    model.eval()
    nll, count = 0.0, 0
    t0 = time.time()
    bar = tqdm(range(0, win.shape[0], batch_size), desc="perplexity", unit="batch",
               disable=not progress, leave=False)
    for i in bar:
        batch = win[i:i + batch_size]
        loss, logits = next_token_loss(model, batch, reduction="sum")
        if not math.isfinite(float(loss)):
            what = "NaN" if bool(torch.isnan(logits).any()) else "Inf" \
                if not bool(torch.isfinite(logits).all()) else "an infinite loss"
            raise NumericalError(
                f"the model's logits hold {what} on window {i}" +
                (f"..{i + batch.shape[0] - 1}" if batch.shape[0] > 1 else "") +
                ": its weights are not finite or its activations overflow in "
                f"{logits.dtype if what == 'an infinite loss' else _param_dtype(model)}; "
                "no perplexity is reported (check the checkpoint, or evaluate in float32)")
        nll += float(loss)
        count += batch[:, 1:].numel()
        bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}")
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens_scored": count,
            "windows": int(win.shape[0]), "seqlen": seqlen, "text_tokens": int(ids.numel()),
            "seconds": round(time.time() - t0, 2)}


def _param_dtype(model) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None else torch.float32


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32,
             do_sample: bool = False, engine: bool = True) -> dict[str, Any]:
    """Greedy (or sampled) continuation with the KV cache on: on the C++ decode engine
    (:mod:`bitpress.runtime.engine`) when it applies and ``engine`` is true, else with
    transformers' ``generate``; the result names the path (``decode_path``) and splits
    prompt (prefill) and decode time."""
    if max_new_tokens <= 0:
        raise ConfigError("--max-new-tokens must be positive")
    from ..kernels import native
    from ..runtime.engine import EngineUnsupported, engine_for, engine_support, make_sampler

    enc = tokenizer(prompt, return_tensors="pt")
    ids = enc["input_ids"]
    if ids.shape[-1] == 0:
        raise ConfigError("the prompt is empty (it gives no tokens); pass some text with "
                          "--prompt")
    why = engine_support(model) if engine else "--no-engine"
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    eng = None
    if why is None:
        try:
            eng = engine_for(model, ids.shape[1] + max_new_tokens)
        except EngineUnsupported as e:  # a module the engine cannot bind: say which
            why = str(e)
    if eng is not None:
        sampler = make_sampler(getattr(gc, "temperature", 1.0) or 1.0, getattr(gc, "top_k", None),
                               getattr(gc, "top_p", None)) if do_sample else None
        tm: dict[str, Any] = {}
        out = eng.generate(ids, max_new_tokens, eos_token_id=eos, sample=sampler, timings=tm)
        path = f"bitpress engine (C++), kernel mode {eng.mode}"
        dt = tm["prefill_s"] + tm["decode_s"]
        extra = {"prefill_seconds": round(tm["prefill_s"], 4),
                 "decode_tokens_per_second": round(tm["decode_steps"] / tm["decode_s"], 2)
                 if tm["decode_steps"] and tm["decode_s"] > 0 else None}
    else:
        t0 = time.time()
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             use_cache=True, pad_token_id=tokenizer.pad_token_id
                             if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        dt = time.time() - t0
        path = f"transformers generate ({why}), kernel mode {native.describe_mode()}"
        extra = {}
    new = out[0, ids.shape[1]:]
    return {"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True),
            "new_tokens": int(new.numel()), "seconds": round(dt, 3),
            "tokens_per_second": round(new.numel() / dt, 2) if dt > 0 else None,
            "decode_path": path, **extra, "kernels": native.status()}
