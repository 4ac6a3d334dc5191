"""The NPU path, verified on this CPU (issue 31): a packed bitpress checkpoint exported to
ONNX (MatMulNBits) and to an OpenVINO IR (u4/u8 compressed constants) scores the same
WikiText-2 perplexity in ONNX Runtime and OpenVINO as in bitpress, and generates the same
greedy tokens; a short decode timing of each runtime is recorded beside it.

For each ``--ckpt LABEL=DIR`` (a bitpress checkpoint, e.g. from
``bitpress compress <SmolLM2 gguf> --method rtn --bits 4 --group-size 128 --out DIR``):

1. ``bitpress export DIR --format onnx`` and ``--format openvino`` (into ``--work``),
2. perplexity on the WikiText-2 test split (bitpress's protocol: ``--windows`` windows of
   ``--seqlen`` tokens) in bitpress (its default CPU kernels, as ``bitpress eval``), in ONNX
   Runtime (CPU EP) and in OpenVINO (CPU plugin, f32, no dynamic quantization),
3. greedy decode of ``--new-tokens`` tokens from one prompt at ``--threads`` threads in all
   three, timed (``bench/_onnx_peer.py``; bitpress through ``bench/decode.py``'s loop).

    .venv/bin/python bench/onnx_npu.py --ckpt "W4 g128=/tmp/smol_w4g128" \\
        --ckpt "W2 g64=/tmp/smol_w2g64" --windows 8 --seqlen 512 --extra \\
        --out bench/results/onnx/smollm2_rtn.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time

import torch

# bench/ goes last on the path: bench/kernels.py must not shadow the `kernels` package
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]
sys.path.insert(0, os.path.join(_HERE, ".."))
import bitpress  # noqa: E402
from _onnx_peer import time_onnxruntime, time_openvino  # noqa: E402
from bitpress.integrations.onnx_export import export_runtime  # noqa: E402
from bitpress.integrations.onnx_runtime import ExportedDecoder, perplexity  # noqa: E402
from bitpress.pipeline.checkpoint import load_tokenizer  # noqa: E402
from bitpress.pipeline.data import find_wikitext  # noqa: E402
from bitpress.pipeline.evaluate import perplexity as bp_perplexity, read_text  # noqa: E402
from _common import cpu_model, write_json  # noqa: E402
from decode import PROMPT, generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", action="append", required=True, help="LABEL=bitpress checkpoint")
    ap.add_argument("--text", default=None, help="default: WikiText-2 test")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--extra", action="store_true",
                    help="also 2-bit codes in 4-bit blocks (onnx-c4, exact) for 2-bit models")
    ap.add_argument("--acc4", action="store_true",
                    help="also int8 activations (onnx-acc4, accuracy_level=4, not exact)")
    ap.add_argument("--work", default="/tmp/bitpress-onnx-bench")
    ap.add_argument("--out", default="bench/results/onnx/smollm2.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    text_path = args.text or find_wikitext("test")
    text = read_text(text_path)
    rows = []
    for item in args.ckpt:
        label, ck = item.split("=", 1)
        tag = label.replace(" ", "_")
        row: dict = {"label": label, "checkpoint": ck}
        dirs = {}
        with open(os.path.join(ck, "config.json")) as f:
            mods = json.load(f)["quantization_config"]["modules"]
        variants = [("onnx", "onnx", "onnxruntime", {}), ("openvino", "openvino", "openvino", {})]
        if args.extra:
            if any(m["bits"] == 2 for m in mods.values()):
                variants.append(("onnx-c4", "onnx", "onnxruntime", {"container_2bit": 4}))
        if args.acc4:
            variants.append(("onnx-acc4", "onnx", "onnxruntime", {"accuracy_level": 4}))
        for name, fmt, _, kw in variants:
            d = os.path.join(args.work, f"{tag}-{name}")
            t0 = time.time()
            rep = export_runtime(ck, d, fmt, overwrite=True, **kw)
            dirs[name] = d
            row[f"export_{name}"] = {"seconds": round(time.time() - t0, 1), "bytes": rep["bytes"],
                                     "notes": rep["notes"], "options": kw}
        tok = load_tokenizer(ck)
        model = bitpress.load(ck)
        ppl = {"bitpress": bp_perplexity(model, tok, text, args.seqlen, args.windows)}
        print(label, "bitpress", ppl["bitpress"]["perplexity"], flush=True)
        for name, _, backend, _ in variants:
            dec = ExportedDecoder(dirs[name], backend, threads=args.threads)
            ppl[name] = perplexity(dec, tok, text, args.seqlen, args.windows)
            del dec
            print(label, name, ppl[name]["perplexity"], flush=True)
        ref = ppl["bitpress"]["perplexity"]
        for name, *_ in variants:
            ppl[name]["rel_diff_vs_bitpress"] = ppl[name]["perplexity"] / ref - 1
        row["perplexity"] = ppl
        ids = tok(PROMPT, return_tensors="pt")["input_ids"]
        generate(model, ids, 4)
        toks, tp, td = generate(model, ids, args.new_tokens)
        dec_rows = {"bitpress": {"prefill_tok_s": ids.shape[1] / tp,
                                 "decode_tok_s": (len(toks) - 1) / td, "ids": toks}}
        del model
        for name, _, backend, _ in variants:
            f = time_onnxruntime if backend == "onnxruntime" else time_openvino
            dec_rows[name] = f(dirs[name], ids[0].tolist(), args.new_tokens, args.threads)
            same = 0
            for a, b in zip(dec_rows[name]["ids"], toks):
                if a != b:
                    break
                same += 1
            dec_rows[name]["same_greedy_prefix_as_bitpress"] = same
        row["decode"] = dec_rows
        rows.append(row)
        print(json.dumps({k: {kk: round(vv, 2) for kk, vv in v.items()
                              if kk in ("prefill_tok_s", "decode_tok_s")}
                          for k, v in dec_rows.items()}), flush=True)
    import onnxruntime
    import openvino

    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(sys.argv), "cpu": cpu_model(), "cores": os.cpu_count(),
           "machine_note": "shared 2-core machine, loaded by other jobs: timings are indicative",
           "python": platform.python_version(), "torch": torch.__version__,
           "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__,
           "text": str(text_path), "seqlen": args.seqlen, "windows": args.windows,
           "threads": args.threads, "new_tokens": args.new_tokens, "prompt": PROMPT,
           "rows": rows}
    write_json(args.out, res, indent=2, default=str)
    for r in rows:
        for name, p in r["perplexity"].items():
            d = r["decode"][name]
            print(f"{r['label']:<14} {name:<10} ppl {p['perplexity']:.4f} "
                  f"({p.get('rel_diff_vs_bitpress', 0):+.2e})  decode "
                  f"{d['decode_tok_s']:.2f} tok/s  prefill {d['prefill_tok_s']:.1f} tok/s")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
