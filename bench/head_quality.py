"""Perplexity cost of packing SmolLM2-135M's tied output head (issue 5, decode).

The body stays fp32; only ``lm_head`` (49152 x 576, 113 MB in fp32) is replaced by a
round-to-nearest packed copy (``bitpress.nn.fuse.pack_output_head``) at each bit width and
group size asked for, or by an unquantised fp16 copy (``16:0``). Reports perplexity on WikiText-2 test (``../shared/data`` when present,
else ``--text``) and the head's packed bytes.

    .venv/bin/python bench/head_quality.py --json bench/results/decode_head_ppl_groups.json
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

from _common import write_json

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bitpress.nn.fuse import pack_output_head  # noqa: E402
from bitpress.pipeline.data import find_wikitext  # noqa: E402
from bitpress.pipeline.evaluate import perplexity  # noqa: E402
from bitpress.pipeline.source import open_source, packaged_gguf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default="16:0,4:128,4:64,4:32,4:16",
                    help="comma list of bits:group_size for the packed head (16:0 = the head "
                         "unquantised in fp16, bitpress.nn.HalfLinear)")
    ap.add_argument("--text", default=None, help="evaluation text (default: WikiText-2 test)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "decode_head_ppl_groups.json"))
    args = ap.parse_args()
    heads = [tuple(int(v) for v in h.split(":")) for h in args.heads.split(",")]
    torch.set_num_threads(args.threads)
    path = args.text or find_wikitext("test")
    if path is None:
        sys.exit("no evaluation text: pass --text (WikiText-2 test is read from ../shared/data)")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    src = open_source(packaged_gguf())
    base = src.load_model().eval()
    tok = src.load_tokenizer()
    res: dict = {"protocol": f"{os.path.basename(path)}, {args.windows} windows x {args.seqlen}, "
                             f"fp32 body", "threads": args.threads}

    def ppl(model) -> float:
        return perplexity(model, tok, text, seqlen=args.seqlen, windows=args.windows,
                          progress=False)["perplexity"]

    with torch.no_grad():
        res["fp32"] = ppl(base)
        print(f"fp32 head: {res['fp32']:.3f}", flush=True)
        for bits, gs in heads:
            m = copy.deepcopy(base)
            h = pack_output_head(m, bits=bits, group_size=max(gs, 1))
            nb = sum(t.numel() * t.element_size() for t in h.buffers())
            p = ppl(m)
            name = "head fp16" if bits == 16 else f"head W{bits} g{gs}"
            res[name] = {"ppl": p, "head_MB": nb / 1e6}
            print(f"{name}: {p:.3f} ({100 * (p / res['fp32'] - 1):+.1f} %), "
                  f"{nb / 1e6:.1f} MB", flush=True)
    write_json(args.json, res)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
