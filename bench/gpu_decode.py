"""Decode speed on a GPU: the float model (fp16) vs packed bitpress models, batch 1, KV cache,
greedy, same prompt, all in one process (run by bench/gpu_suite.sh).

Models: SmolLM2-135M from the packaged GGUF (``bitpress.pipeline.source.packaged_gguf``), or
any GGUF / HF directory given with ``--source`` (e.g. Qwen2.5-0.5B). Packed variants: every
linear but ``lm_head`` replaced by ``QuantLinear`` (RTN W4 g128, W2 g64) or
``GroupSparseLinear`` (W4 g128 S50), the rest of the model in fp16.

    python bench/gpu_decode.py --out DIR/decode.json [--source PATH] [--new-tokens 64]
    python bench/gpu_decode.py --device cpu --new-tokens 4     # a smoke run without a GPU
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

# bench/ holds a kernels.py that would shadow the `kernels` package transformers may import
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))

import torch  # noqa: E402

import bitpress.nn as bnn  # noqa: E402
from bitpress.pipeline.source import open_source, packaged_gguf  # noqa: E402
sys.path.append(_here)  # after site-packages: nothing in bench/ shadows a package
from _common import write_json  # noqa: E402

PROMPT = "The history of the printing press begins"


@torch.inference_mode()
def generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    """Greedy decode with a KV cache; returns (tokens, decode seconds after the first)."""
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    out = model(input_ids=ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    toks = [int(nxt)]
    sync()
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(int(nxt))
    sync()
    return toks, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default=None, help="GGUF file or HF directory (default: the "
                                                   "packaged SmolLM2-135M)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench/results/gpu/decode.json")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    src = open_source(a.source or packaged_gguf())
    base = src.load_model().eval()
    tok = src.load_tokenizer()
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(dev)
    recipes = {"W4 g128": bnn.Recipe(bits=4, group_size=128),
               "W2 g64": bnn.Recipe(bits=2, group_size=64),
               "W4 g128 S50": bnn.Recipe(bits=4, group_size=128, sparsity=0.5)}
    models = {"fp16" if dtype == torch.float16 else "fp32": copy.deepcopy(base).to(dev, dtype)}
    for name, r in recipes.items():
        m = copy.deepcopy(base)
        bnn.replace_linears(m, r)
        models[name] = m.to(dev, dtype).eval()
    del base
    rows, ref = [], None
    for name, m in models.items():
        generate(m, ids, 4)   # warm-up: compiles / binds the kernel plans
        best, toks = None, None
        for _ in range(a.rounds):
            toks, sec = generate(m, ids, a.new_tokens)
            best = sec if best is None else min(best, sec)
        ref = toks if ref is None else ref
        agree = sum(x == y for x, y in zip(toks, ref)) / len(ref)
        tps = (a.new_tokens - 1) / best
        rows.append({"model": name, "tok_per_s": tps, "agree_with_float": agree})
        print(f"{name:12s} {tps:8.1f} tok/s   greedy agreement with the float model {agree:.2f}",
              flush=True)
    res = {"source": str(a.source or "packaged SmolLM2-135M"), "device": str(dev),
           "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "dtype": str(dtype), "new_tokens": a.new_tokens, "rows": rows}
    write_json(a.out, res)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
