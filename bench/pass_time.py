"""Seconds per call of the layer passes that share the error-feedback loop and the clipping
search (GPTQ, decoupleQ, GQSA) on one SmolLM2-sized random layer (576 x 1536, correlated
Hessian), one thread, median of 3 runs. Run it on two trees to compare a refactor:

    OMP_NUM_THREADS=1 PYTHONPATH=<tree> python bench/pass_time.py --label <commit> \
        --out bench/results/one_of_each/pass_time_<name>.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from _common import cpu_info, median_time, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON record (default: print only)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--label", default="", help="what tree this is (e.g. a commit)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from bitpress.quant import QuantSpec, decoupleq, gptq
    from bitpress.sparse import gqsa

    g = torch.Generator().manual_seed(0)
    n = 1536
    W = torch.randn(576, n, generator=g)
    X = torch.randn(4096, n, generator=g) @ (torch.eye(n) + 0.05 * torch.randn(n, n, generator=g))
    H = X.T @ X / X.shape[0]
    cases = {
        "gptq W4 g128": lambda: gptq(W, H, QuantSpec(bits=4, group_size=128)),
        "gptq W4 g128 act_order clip_search": lambda: gptq(W, H, QuantSpec(
            bits=4, group_size=128, options={"act_order": True, "clip_search": True})),
        "decoupleq W2 g64 iters 4": lambda: decoupleq(W, H, QuantSpec(bits=2, group_size=64,
                                                                       options={"iters": 4})),
        "gqsa W4 g16 50%": lambda: gqsa(W, H, QuantSpec(bits=4, group_size=16, sparsity=0.5)),
    }
    rows = []
    for name, fn in cases.items():
        s = median_time(fn, rounds=a.rounds, warmup=0)
        rows.append({"pass": name, "seconds": round(s, 3)})
        print(f"{name:36s} {s:6.2f} s", flush=True)
    if a.out:
        write_json(a.out, {"machine": cpu_info(), "load_avg": os.getloadavg(),
                           "label": a.label,
                           "command": " ".join(["bench/pass_time.py", *sys.argv[1:]]),
                           "rows": rows})


if __name__ == "__main__":
    main()
