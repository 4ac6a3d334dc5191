"""Host time per call of the tensor-core kernels' launch plans, on CPU, against a stub launcher.

The plan (bitpress.kernels.cuda_mma.dense_plan / sparse_plan) is bound once; each timed call
runs everything the eager GPU path runs on the host (shape / dtype / version checks, one
``torch.empty`` for y, the argument tuple, the launcher call) except the driver launch itself,
which the stub replaces (it records nothing). Target: <= 5 us per call.

    OMP_NUM_THREADS=1 python bench/gpu_host.py [--out bench/results/gpu/host_cpu.json]

On a GPU machine ``--device cuda`` times the same plan with the real CuPy launcher
(bench/gpu_suite.sh does that).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from bitpress.formats import quantize_rtn
from bitpress.kernels import cuda_mma
from _common import cpu_model, median_time, write_json


def _stub(fn, grid, args):
    return None


def _loader(*key):
    return key


def _time(fast, x, reps: int, rounds: int = 7, clock=time.perf_counter) -> float:
    """Median over rounds of µs per call; ``clock=time.process_time`` counts only this
    process's CPU time (on a shared, oversubscribed machine wall time also counts the time
    other processes hold the core)."""
    sync = torch.cuda.synchronize if x.is_cuda else None
    return median_time(lambda: fast(x), reps, rounds, warmup=200, clock=clock, sync=sync) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/gpu/host_cpu.json")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=20000)
    a = ap.parse_args()
    dev = torch.device(a.device)
    stub = dict(n_sm=132, launcher=_stub, loader=_loader) if a.device == "cpu" else {}
    rows = []
    # the host path does not depend on the weight's size: small weights keep the repack fast
    for kind, bits, gs in [("dense", 4, 128), ("dense", 2, 64), ("dense", 3, 128),
                           ("sparse", 4, 128)]:
        n, k = 512, 1024
        keep = (torch.rand(n, k // gs) < 0.5) if kind == "sparse" else None
        qw = quantize_rtn(torch.randn(n, k), bits, gs, keep=keep)
        for m in (1, 16):
            x = torch.randn(m, k, dtype=torch.float16, device=dev)
            if kind == "dense":
                p = {s: t.to(dev) for s, t in qw.pack_dense(torch.float16).items()}
                fast = cuda_mma.dense_plan((x, p["qweight"], p["scales"], p["zeros"], None,
                                            bits, gs, k), **stub)
            else:
                p = {s: t.to(dev) for s, t in qw.pack_bsr(torch.float16).items()}
                fast = cuda_mma.sparse_plan((x, p["row_ptr"], p["col_idx"], p["qvalues"],
                                             p["scales"], p["zeros"], None, bits, gs, k),
                                            **stub)
            us = _time(fast, x, a.reps)
            cpu_us = _time(fast, x, a.reps, clock=time.process_time)
            rows.append({"kernel": f"{kind} W{bits} g{gs}", "m": m, "host_us_per_call": us,
                         "host_cpu_us_per_call": cpu_us})
            print(f"{kind:6s} W{bits} g{gs:<4d} m={m:<3d} {us:7.2f} us/call wall, "
                  f"{cpu_us:6.2f} us/call CPU time")
    # the same run's floor: the one allocation every call must make
    xe = torch.randn(1, 1024, dtype=torch.float16, device=dev)
    empty_us = _time(lambda t: torch.empty(1, 512, dtype=t.dtype, device=dev), xe, a.reps)
    empty_cpu = _time(lambda t: torch.empty(1, 512, dtype=t.dtype, device=dev), xe, a.reps,
                      clock=time.process_time)
    print(f"torch.empty alone (floor inside every call): {empty_us:.2f} us wall, "
          f"{empty_cpu:.2f} us CPU time")
    res = {"what": "launch-plan host time per call (stub launcher)" if a.device == "cpu"
           else "launch-plan eager time per call (real launches, no sync)",
           "device": a.device, "cpu": cpu_model(),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "note": "shared machine (2 cores, several agents): numbers are upper bounds",
           "target_us": 5.0, "torch_empty_us": empty_us, "torch_empty_cpu_us": empty_cpu,
           "load_avg": os.getloadavg(), "rows": rows}
    write_json(a.out, res)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
