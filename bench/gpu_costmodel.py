"""Cost model of the GPU kernels: predicted time per call for every kernel x shape x batch.

    t = max(bytes / (eta * BW), warp_instructions / issue_rate) + t_fixed

* bytes: the weight as each kernel stores it (codes, scale/zero, sparse tile indices and
  padding) + x + y; the fp16/bf16 peers read the dense fp16 weight;
* BW: the copy bandwidth (measured by bench/gpu_suite.sh, ``--calib``), else the nominal
  bandwidth of ``--device``; eta = 0.8 of it for a streaming read (a guess until measured);
* issue: warp instructions per k16 step of one 16-row tile (256 codes) of the tensor-core
  kernel: 3 shifts + 4 lop3 + 4 fma per step (W4; W2/W3 similar, W3 +4 for the bit plane),
  plus per batch tile 2 x loads + 2 mma; Triton's GEMV about 3 + 2m instructions per code
  and thread (m <= 4), its GEMM about 5 per code per 16 rows; 4 warp instructions per clock
  per SM;
* t_fixed: launch + pipeline fill, 2 us (a guess; the suite's empty-kernel graph time
  replaces it with ``--calib``).

    python bench/gpu_costmodel.py [--device h100|h200] [--calib DIR/kernels.json]
                                  [--out bench/results/gpu/costmodel_h100.json]

Prints the predicted µs and the predicted speed-up over cuBLAS fp16 beside each kernel.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when a test imports it
from _common import write_json  # noqa: E402

DEVICES = {  # nominal HBM bandwidth, SMs, boost clock
    "h100": {"bw_GBps": 3350.0, "sms": 132, "ghz": 1.755},
    "h200": {"bw_GBps": 4800.0, "sms": 132, "ghz": 1.83},
}
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
BATCHES = [1, 2, 4, 8, 16, 64]
KERNELS = ["fp16", "mma_w4g128", "mma_w2g64", "mma_w3g128", "mma_w4g128_s50",
           "triton_w4g128", "triton_w2g64", "tinygemm_w4g128", "gemlite_w4g128",
           "gemlite_w2g64"]


def spec(kernel: str) -> tuple[int, int]:
    """(bits, group size) of a kernel name such as ``mma_w4g128_s50``."""
    m = re.search(r"_w(\d)g(\d+)", kernel)
    return int(m[1]), int(m[2])


def weight_bytes(kernel: str, n: int, k: int) -> float:
    if kernel in ("fp16", "bf16"):
        return n * k * 2.0
    bits, gs = spec(kernel)
    ng = math.ceil(k / gs)
    if kernel.startswith("mma_"):
        chunk = 64 if bits == 4 else 128
        npad, kpad = math.ceil(n / 16) * 16, math.ceil(k / chunk) * chunk
        if "_s50" in kernel:
            kept = 0.5 * n * ng
            tiles = kept / 16 * 1.06          # ~6 % padding of the 16-row tiles
            gpad = math.ceil(gs / chunk) * chunk
            return tiles * (16 * gpad * bits / 8 + 16 * 4 + 16 * 4 + 4)   # codes, sz, rows, col
        return npad * kpad * bits / 8 + npad * ng * 4
    if kernel.startswith("tinygemm"):
        return n * k / 2 + n * ng * 4
    return n * k * bits / 8 + n * ng * 4      # triton / gemlite: packed codes + fp16 s, z


def warp_instr(kernel: str, n: int, k: int, m: int) -> float:
    if kernel in ("fp16", "bf16"):
        return 0.0
    codes = n * k * (0.5 if "_s50" in kernel else 1.0)
    if kernel.startswith("mma_"):
        bits = spec(kernel)[0]
        nt = 1 if m <= 8 else (2 if m <= 16 else (4 if m <= 32 else 8))
        per_step = 11 + (4 if bits == 3 else 0) + 4 * nt
        return codes / 256 * per_step
    if kernel.startswith("triton_"):
        # GEMV (m <= 4): unpack once (~3/code) + one FMA per code and row; above: the tl.dot
        # GEMM dequantises each tile once per 16 rows of x (~5/code)
        return codes * (3 + 2 * m) / 32 if m <= 4 else codes * 5 / 32 * math.ceil(m / 16)
    return codes * 3 / 32                       # tinygemm / gemlite: mma-based, rough


def predict(kernel: str, n: int, k: int, m: int, dev: dict, eta: float, t_fixed: float) -> dict:
    wb = weight_bytes(kernel, n, k)
    total = wb + m * k * 2 + m * n * 2
    t_mem = total / (eta * dev["bw_GBps"] * 1e9) * 1e6
    t_issue = warp_instr(kernel, n, k, m) / (dev["sms"] * 4 * dev["ghz"] * 1e9) * 1e6
    return {"kernel": kernel, "N": n, "K": k, "m": m, "bytes": total,
            "t_mem_us": t_mem, "t_issue_us": t_issue,
            "predicted_us": max(t_mem, t_issue) + t_fixed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="h100", choices=sorted(DEVICES))
    ap.add_argument("--calib", help="kernels.json of bench/gpu_bench.py (copy bandwidth, "
                                    "empty-kernel time)")
    ap.add_argument("--eta", type=float, default=0.8)
    ap.add_argument("--t-fixed-us", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", action="store_true",
                    help="also print a markdown table (predicted, and measured beside it when "
                         "--calib's file has kernel rows)")
    a = ap.parse_args()
    dev = dict(DEVICES[a.device])
    t_fixed, source = a.t_fixed_us, "nominal"
    if a.calib:
        with open(a.calib) as f:
            cal = json.load(f).get("calibration", {})
        if "copy_GBps" in cal:
            dev["bw_GBps"], source = cal["copy_GBps"] / a.eta * 0.9, "measured copy"
        if "empty_kernel_us" in cal:
            t_fixed = cal["empty_kernel_us"] + 1.0
    rows = []
    for n, k in SHAPES:
        for m in BATCHES:
            base = predict("fp16", n, k, m, dev, a.eta, t_fixed)["predicted_us"]
            for kern in KERNELS:
                r = predict(kern, n, k, m, dev, a.eta, t_fixed)
                r["predicted_vs_fp16"] = base / r["predicted_us"]
                rows.append(r)
    print(f"cost model, {a.device}: BW {dev['bw_GBps']:.0f} GB/s ({source}), eta {a.eta}, "
          f"t_fixed {t_fixed:.2f} us")
    print(f"{'kernel':20s} {'shape':>12s} " + " ".join(f"{'m=' + str(m):>14s}" for m in BATCHES))
    for n, k in SHAPES:
        for kern in KERNELS:
            cells = [r for r in rows if r["kernel"] == kern and r["N"] == n and r["K"] == k]
            print(f"{kern:20s} {f'{n}x{k}':>12s} " + " ".join(
                f"{c['predicted_us']:6.1f}us x{c['predicted_vs_fp16']:4.2f}" for c in cells))
    if a.markdown:
        measured = {}
        if a.calib:
            with open(a.calib) as f:
                for r in json.load(f).get("rows", []):
                    measured[(r["kernel"], r["N"], r["K"], r["m"])] = r["gpu_us"]
        print()
        print("| kernel | shape | " + " | ".join(f"m={m}" for m in BATCHES) + " |")
        print("|---|---|" + "---|" * len(BATCHES))
        for n, k in SHAPES:
            for kern in KERNELS:
                cells = []
                for m in BATCHES:
                    r = next(r for r in rows if r["kernel"] == kern and r["N"] == n
                             and r["K"] == k and r["m"] == m)
                    got = measured.get((kern, n, k, m))
                    cells.append((f"{got:.1f} / " if got is not None else "") +
                                 f"{r['predicted_us']:.1f}")
                print(f"| {kern} | {n}×{k} | " + " | ".join(cells) + " |")
        print("\n(µs; 'measured / predicted' where measured)")
    out = a.out or f"bench/results/gpu/costmodel_{a.device}.json"
    write_json(out, {"device": a.device, "params": {**dev, "eta": a.eta, "t_fixed_us": t_fixed,
                                                    "bandwidth_source": source},
                     "model": "t = max(bytes/(eta*BW), warp_instr/issue_rate) + t_fixed",
                     "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
