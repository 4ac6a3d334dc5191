"""Synthetic Hugging Face checkpoints with real architectures' shapes, written with bounded
memory (one tensor at a time), for testing compression of models larger than RAM.

Weights are random but not white noise: each matrix is a decaying low-rank part (singular
values ``σ_k ∝ k^-0.7`` over ``rank`` directions, the "spikes" trained LLM weights show
above their Marchenko-Pastur bulk) plus Gaussian noise, with per-input-channel scales drawn
log-normally (a few outlier input channels, as real checkpoints have). Every tensor is a
function of ``(seed, name)`` only, so a checkpoint is reproducible tensor by tensor and
can be regenerated on any machine. A small byte-level BPE tokenizer trained on CPython's
documentation topics (:func:`bitpress.pipeline.data.builtin_text`) is written beside it, so
calibration and evaluation run unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from ..formats.stwriter import SafetensorsWriter

#: Llama-2-13B's shapes (fp16: 13.0 G parameters, 26.0 GB)
LLAMA2_13B: dict[str, Any] = dict(
    model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
    num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
    max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2)


def _gen(seed: int, name: str) -> torch.Generator:
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def synth_tensor(name: str, shape: tuple[int, ...], seed: int = 0, rank: int = 32,
                 std: float = 0.02) -> torch.Tensor:
    """The float32 tensor ``name`` of the synthetic checkpoint ``seed``."""
    g = _gen(seed, name)
    if len(shape) == 1:  # norms: around one
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    out, inp = shape
    if "embed" in name or "lm_head" in name:
        return std * torch.randn(shape, generator=g)
    w = torch.randn(out, inp, generator=g).mul_(std)
    r = min(rank, out, inp)
    sig = torch.arange(1, r + 1, dtype=torch.float32).pow_(-0.7).mul_(
        6.0 * std * (out * inp) ** 0.25)
    a = torch.linalg.qr(torch.randn(out, r, generator=g))[0] * sig
    b = torch.linalg.qr(torch.randn(inp, r, generator=g))[0].T
    w.addmm_(a, b)
    col = torch.exp(0.3 * torch.randn(inp, generator=g))
    col[torch.randperm(inp, generator=g)[: max(1, inp // 512)]] *= 8.0  # outlier channels
    return w.mul_(col)


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .data import builtin_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 4096),
                                  special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([builtin_text()], trainer)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


def write_synthetic(out: str | os.PathLike, config: Optional[dict[str, Any]] = None,
                    seed: int = 0, dtype: torch.dtype = torch.float16, rank: int = 32,
                    tokenizer: bool = True, progress: bool = True) -> dict[str, Any]:
    """Write the synthetic checkpoint of ``config`` (default :data:`LLAMA2_13B`) to ``out``
    as sharded safetensors: one shard per decoder block plus one for the rest. Memory: one
    float32 tensor at a time. Returns ``{"bytes", "params", "shards", "seconds"}``."""
    import time

    from accelerate import init_empty_weights
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.time()
    cfg_d = dict(config or LLAMA2_13B)
    mt = cfg_d.pop("model_type")
    cfg = AutoConfig.for_model(mt, **cfg_d)
    cfg.dtype = dtype
    with init_empty_weights():
        skel = AutoModelForCausalLM.from_config(cfg)
    sd = skel.state_dict()
    tie = bool(getattr(cfg, "tie_word_embeddings", False))
    keys = [k for k in sd if not (tie and k.endswith("lm_head.weight"))]
    from .skeleton import find_blocks

    bname, blocks = find_blocks(skel)
    shards: list[list[str]] = [[k for k in keys if k.startswith(f"{bname}.{i}.")]
                               for i in range(len(blocks))]
    rest = [k for k in keys if not any(k in s for s in shards)]
    shards = [rest] + shards
    d = Path(out)
    d.mkdir(parents=True, exist_ok=False)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = params = 0
    bar = tqdm(total=len(keys), desc="synthetic checkpoint", unit="tensor", disable=not progress)
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        w = SafetensorsWriter(d / fname, [(k, dtype, tuple(sd[k].shape)) for k in names],
                              {"format": "pt"})
        for k in names:
            t = synth_tensor(k, tuple(sd[k].shape), seed, rank).to(dtype)
            w.write(k, t)
            weight_map[k] = fname
            total += t.numel() * t.element_size()
            params += t.numel()
            del t
            bar.update(1)
        w.close()
    bar.close()
    with open(d / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    cfg.save_pretrained(d)
    if tokenizer:
        _tokenizer(cfg.vocab_size).save_pretrained(d)
    return {"bytes": total, "params": params, "shards": n, "seconds": round(time.time() - t0, 1)}
