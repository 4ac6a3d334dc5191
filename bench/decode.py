"""Decode speed of SmolLM2-135M: packed bitpress models vs the float model (issue 5).

Batch 1, KV cache on, greedy, the same prompt, a fixed number of new tokens (default 128),
all models built and timed in the same process and interleaved round by round (so a change
in the machine's load hits every model alike). Models:

* ``fp32``  - the float model (dequantised from the packaged GGUF),
* ``bf16``  - the same model cast to bfloat16,
* ``W2 g64``, ``W4 g128`` - every linear but ``lm_head`` replaced by ``QuantLinear``
  (RTN, fp16 scales/zeros) through ``bitpress.nn.replace_linears``,
* ``W4 g16 S50`` - group-sparse: 50% of the 16-column groups pruned by magnitude, then RTN
  (``GroupSparseLinear``),
* ``W2 g64 +head W4`` - W2 g64 with the tied ``lm_head`` (49152 x 576, a third of the fp32
  model's bytes) also packed at W4 g128 (``bitpress.nn.fuse.pack_output_head``; the input
  embedding stays float): what the decoder costs once the head is not fp32,
* ``W2 g64 +head fp16`` - the head unquantised in fp16 instead (``pack_output_head(bits=16)``,
  ``bitpress.nn.HalfLinear``: half the bytes of fp32, fp32 arithmetic),
* with ``--fuse-norms``, every model (the float ones too) runs its RMSNorm modules as
  ``torch.nn.RMSNorm`` (``bitpress.nn.fuse.fuse_norms``: one fused op instead of ~7 eager ones),
* ``W2 g64 fused`` (and ``... fused +head W4``) - the same packed model after
  ``bitpress.nn.fuse.fuse_linears``: q/k/v and gate/up run as one packed call each (the same
  kernel on the concatenated rows; outputs identical bit for bit).

Tokens/s counts the decode steps only (new tokens after the first, which the prefill makes);
prefill time is reported separately. A per-step breakdown for each packed model (time in
the native kernels, in the packed modules' Python, in ``lm_head``, and the rest of the model)
comes from one extra instrumented generation.

    .venv/bin/python bench/decode.py                   # 1 thread, writes bench/results/decode.json
    .venv/bin/python bench/decode.py --threads 1,2 --rounds 3
    .venv/bin/python bench/decode.py --only "W2 g64,W2 g64 fused,W2 g64 fused +head W4"  # + fp32
    .venv/bin/python bench/decode.py --only "W2 g64" --sparsities 0.2,0.5 --ckpt gqsa=/ckpt/dir
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bitpress  # noqa: E402
import bitpress.nn as bnn  # noqa: E402
from bitpress.kernels import cpu as kcpu  # noqa: E402
from bitpress.nn.fuse import fuse_linears, fuse_norms, pack_output_head  # noqa: E402
from bitpress.pipeline.source import open_source, packaged_gguf  # noqa: E402

PROMPT = "The history of the printing press begins"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@torch.inference_mode()
def generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy decode with a KV cache; returns (tokens, prefill seconds, decode seconds)."""
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    toks = [int(nxt)]
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(int(nxt))
    t2 = time.perf_counter()
    return toks, t1 - t0, t2 - t1


def packed(base, recipe: bnn.Recipe):
    m = copy.deepcopy(base)
    bnn.replace_linears(m, recipe)
    return m.eval()


def model_bytes(model) -> int:
    """Bytes of parameters and buffers a decode step reads (the token embedding excluded:
    one row per step), counting a tied lm_head once."""
    seen, total = set(), 0
    emb = model.get_input_embeddings().weight
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if t is emb and getattr(model.get_output_embeddings(), "weight", None) is not emb:
            continue
        total += t.numel() * t.element_size()
    return total


class _Timer:
    """Proxy of the native module that times qmm_dense / qmm_sparse calls."""

    def __init__(self, mod):
        self._mod, self.t, self.n = mod, 0.0, 0

    def __getattr__(self, name):
        f = getattr(self._mod, name)
        if name not in ("qmm_dense", "qmm_sparse"):
            return f

        def timed(*a, **k):
            t = time.perf_counter()
            r = f(*a, **k)
            self.t += time.perf_counter() - t
            self.n += 1
            return r
        return timed


@torch.inference_mode()
def breakdown(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """Per decode step: native kernel time, packed-module time (kernel + Python), lm_head
    time, total. One instrumented generation (hooks add a few µs per module)."""
    acc = {"modules": 0.0, "lm_head": 0.0}
    starts: dict[int, float] = {}
    hooks = []
    head = model.get_output_embeddings()
    for mod in model.modules():
        if isinstance(mod, (bnn.QuantLinear, bnn.GroupSparseLinear)) or mod is head:
            key = "lm_head" if mod is head else "modules"

            def pre(m, _a, _k=None):
                starts[id(m)] = time.perf_counter()

            def post(m, _a, _o, key=key):
                acc[key] += time.perf_counter() - starts[id(m)]
            hooks.append(mod.register_forward_pre_hook(pre))
            hooks.append(mod.register_forward_hook(post))
    timer = _Timer(kcpu._C)
    real = kcpu._C
    kcpu._C = timer
    kcpu.clear_cache()  # the modules' bound kernel plans are re-made through the timer
    try:
        out = model(input_ids=ids, use_cache=True)  # prefill, not counted
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        acc["modules"] = acc["lm_head"] = 0.0
        timer.t, timer.n = 0.0, 0
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        total = time.perf_counter() - t0
    finally:
        kcpu._C = real
        kcpu.clear_cache()
        for h in hooks:
            h.remove()
    n = new_tokens - 1
    kern = timer.t
    head_is_packed = isinstance(head, (bnn.QuantLinear, bnn.GroupSparseLinear))
    mods = acc["modules"] + (acc["lm_head"] if head_is_packed else 0.0)
    return {"step_ms": 1e3 * total / n, "kernel_ms": 1e3 * kern / n,
            "packed_module_python_ms": 1e3 * (mods - kern) / n,
            "lm_head_ms": 1e3 * acc["lm_head"] / n,
            "rest_ms": 1e3 * (total - mods - (0 if head_is_packed else acc["lm_head"])) / n,
            "native_calls_per_step": timer.n / n,
            "packed_calls_per_step": sum(isinstance(m, (bnn.QuantLinear, bnn.GroupSparseLinear))
                                         for m in model.modules())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1", help="comma list, e.g. 1,2")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per model")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--only", default=None,
                    help="comma list of model names to run (fp32 is always kept)")
    ap.add_argument("--ckpt", action="append", default=[], metavar="NAME=DIR",
                    help="also time a bitpress checkpoint (e.g. a GQSA model from `bitpress "
                         "compress`), loaded with bitpress.load; repeatable")
    ap.add_argument("--sparsities", default=None,
                    help="comma list, e.g. 0.2,0.3,0.4,0.6: add 'W4 g16 S<pct>' group-sparse models "
                         "(magnitude-pruned groups, RTN) at these sparsities -- same storage and "
                         "kernel work as a GQSA checkpoint of that sparsity")
    ap.add_argument("--fuse-norms", action="store_true",
                    help="run every model (fp32 and bf16 too) with bitpress.nn.fuse.fuse_norms: "
                         "the HF RMSNorm modules as torch.nn.RMSNorm (one fused op each)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "decode.json"))
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    load_start = os.getloadavg()

    t = time.perf_counter()
    src = open_source(packaged_gguf())
    base = src.load_model().eval()
    tok = src.load_tokenizer()
    print(f"loaded SmolLM2-135M in {time.perf_counter() - t:.1f} s", flush=True)
    ids = tok(PROMPT, return_tensors="pt").input_ids

    w2_base: dict = {}

    def w2_variant(fuse: bool, head: int = 0):
        if "m" not in w2_base:  # quantise once, copy the packed model for the variants
            w2_base["m"] = packed(base, bnn.Recipe(bits=2, group_size=64))
        m = copy.deepcopy(w2_base["m"])
        if fuse:
            fuse_linears(m)
        if head:  # untied: the input embedding stays float
            pack_output_head(m, bits=head, group_size=128)
        return m

    builders = {
        "fp32": lambda: base,
        "bf16": lambda: copy.deepcopy(base).to(torch.bfloat16),
        "W2 g64": lambda: w2_variant(False),
        "W4 g128": lambda: packed(base, bnn.Recipe(bits=4, group_size=128)),
        "W4 g16 S50": lambda: packed(base, bnn.Recipe(bits=4, group_size=16, sparsity=0.5)),
        "W2 g64 +head W4": lambda: w2_variant(False, 4),
        "W2 g64 +head fp16": lambda: w2_variant(False, 16),
        "W2 g64 fused": lambda: w2_variant(True),
        "W2 g64 fused +head W4": lambda: w2_variant(True, 4),
        "W2 g64 fused +head fp16": lambda: w2_variant(True, 16),
    }
    n_fixed = len(builders)
    for sp in ([float(v) for v in args.sparsities.split(",")] if args.sparsities else []):
        if not 0.0 < sp < 1.0:
            raise SystemExit(f"--sparsities: {sp} is not in (0, 1)")
        builders[f"W4 g16 S{round(100 * sp)}"] = (
            lambda sp=sp: packed(base, bnn.Recipe(bits=4, group_size=16, sparsity=sp)))
    for spec in args.ckpt:
        name, sep, path = spec.partition("=")
        if not sep or not name or not os.path.isdir(path):
            raise SystemExit(f"--ckpt wants NAME=DIR with an existing checkpoint folder, not {spec!r}")
        builders[name] = lambda path=path: bitpress.load(path).eval()
    if args.only:
        keep = set(args.only.split(",")) | {"fp32"} | set(list(builders)[n_fixed:])
        unknown = keep - set(builders)
        if unknown:
            raise SystemExit(f"--only: unknown model(s) {sorted(unknown)}; have {list(builders)}")
        builders = {k: v for k, v in builders.items() if k in keep}
    t = time.perf_counter()
    models = {k: build() for k, build in builders.items()}
    if args.fuse_norms:
        print("fused norms: " + ", ".join(f"{k} {fuse_norms(m)}" for k, m in models.items()))
    print(f"built {len(models)} models in {time.perf_counter() - t:.1f} s", flush=True)
    sizes = {k: model_bytes(m) for k, m in models.items()}

    results = {}
    for nt in threads:
        torch.set_num_threads(nt)
        times = {k: [] for k in models}
        prefill = {k: [] for k in models}
        tokens = {}
        for k, m in models.items():  # warm-up: repack caches, allocator
            generate(m, ids, 8)
        for r in range(args.rounds):
            for k, m in models.items():
                toks, tp, td = generate(m, ids, args.new_tokens)
                times[k].append(td)
                prefill[k].append(tp)
                tokens[k] = toks
            print(f"[{nt} thread(s)] round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {(args.new_tokens - 1) / times[k][-1]:.1f}" for k in models), flush=True)
        rows = {}
        for k in models:
            td = statistics.median(times[k])
            rows[k] = {"tokens_per_s": (args.new_tokens - 1) / td,
                       "tokens_per_s_all_rounds": [(args.new_tokens - 1) / x for x in times[k]],
                       "ms_per_token": 1e3 * td / (args.new_tokens - 1),
                       "prefill_ms": 1e3 * statistics.median(prefill[k]),
                       "weight_MB": sizes[k] / 1e6,
                       "same_tokens_as_fp32": sum(a == b for a, b in
                                                  zip(tokens[k], tokens["fp32"])),
                       "text": tok.decode(tokens[k][:24])}
        fp = rows["fp32"]["tokens_per_s"]
        for k in models:
            rows[k]["vs_fp32"] = rows[k]["tokens_per_s"] / fp
        for k in models:
            if k not in ("fp32", "bf16"):
                rows[k]["breakdown"] = breakdown(models[k], ids, min(64, args.new_tokens))
        results[str(nt)] = rows

        print(f"\nSmolLM2-135M decode, batch 1, {args.new_tokens} new tokens, greedy, KV cache, "
              f"torch.set_num_threads({nt}), median of {args.rounds} interleaved rounds")
        print(f"{'model':<22}{'MB read/tok':>12}{'tok/s':>9}{'ms/tok':>9}{'vs fp32':>9}"
              f"{'prefill ms':>12}{'=fp32 toks':>12}")
        for k, v in rows.items():
            print(f"{k:<22}{v['weight_MB']:>12.1f}{v['tokens_per_s']:>9.1f}{v['ms_per_token']:>9.2f}"
                  f"{v['vs_fp32']:>9.2f}{v['prefill_ms']:>12.1f}"
                  f"{v['same_tokens_as_fp32']:>8}/{args.new_tokens}")
        print("\nper decode step (ms): kernels | packed-module Python | lm_head | rest of model")
        for k, v in rows.items():
            b = v.get("breakdown")
            if b:
                print(f"{k:<22} {b['step_ms']:6.2f} = kern {b['kernel_ms']:5.2f} | py "
                      f"{b['packed_module_python_ms']:5.2f} ({b['packed_calls_per_step']} modules, "
                      f"{b['native_calls_per_step']:.0f} native calls) "
                      f"| head {b['lm_head_ms']:5.2f} | rest {b['rest_ms']:5.2f}")

    meta = {"date": dt.date.today().isoformat(), "cpu": cpu_model(), "torch": torch.__version__,
            "isa": kcpu.get_isa(), "act_mode": kcpu.get_act_mode(), "prompt": PROMPT,
            "prompt_tokens": int(ids.shape[1]), "new_tokens": args.new_tokens,
            "rounds": args.rounds, "fuse_norms": args.fuse_norms, "load_average_end": os.getloadavg(),
            "load_average_start": load_start,
            "command": "bench/decode.py " + " ".join(sys.argv[1:])}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
