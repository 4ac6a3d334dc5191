"""GPU kernel benchmark (run by bench/gpu_suite.sh; needs a CUDA GPU).

For every kernel x shape x batch: GPU time per call from CUDA-graph replay with the weight
rotated through enough copies to exceed 2x the L2 cache (so each call reads its weight from
DRAM), and eager host time per call (wall time of back-to-back calls without a sync, i.e.
what Python + launch cost the host). Peers measured in the same run: cuBLAS fp16 / bf16
(``F.linear``), torch's int4 tinygemm (``_weight_int4pack_mm``), GemLite (if importable).
Also a calibration: copy bandwidth, empty-kernel time (graph replay), cold reads.

    python bench/gpu_bench.py --out DIR [--quick]

Writes DIR/kernels.json (rows: kernel, shape, m, gpu_us, host_us, bytes, GB/s, vs_fp16) and
prints a table. Every measurement is guarded: a failing kernel records its error and the
run goes on.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
import traceback
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from _common import rand_dense

os.environ.setdefault("BITPRESS_TRITON_TUNE", "0")   # no autotuning inside graph capture

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]     # (N = out, K = in)
BATCHES = [1, 2, 4, 8, 16, 64]


# ---- timing helpers --------------------------------------------------------------------------
def graph_us(calls: list[Callable[[], object]], reps: int = 20) -> float:
    """GPU µs per call: one CUDA graph holding every call once (each on its own weight copy),
    replayed ``reps`` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    us = e0.elapsed_time(e1) * 1e3 / (reps * len(calls))
    del g
    return us


def host_us(call: Callable[[], object], n: int = 200) -> float:
    """Host µs per eager call (back-to-back, no sync inside the timed loop)."""
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def copies_for(nbytes: int) -> int:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, min(64, math.ceil(2 * l2 / max(nbytes, 1)) + 1))


# ---- calibration -----------------------------------------------------------------------------
def calibrate() -> dict:
    out = {}
    n = 1 << 28   # 256 M fp32 = 1 GiB
    a = torch.empty(n // 4, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    out["copy_GBps"] = 2 * a.numel() * 4 * 10 / (e0.elapsed_time(e1) * 1e-3) / 1e9
    del a, b
    t = torch.zeros(1, device="cuda")
    out["empty_kernel_us"] = graph_us([lambda: t.add_(0)] * 64, reps=50)
    for mb in (1, 5, 9, 24):
        bufs = [torch.empty(mb << 18, dtype=torch.float32, device="cuda")
                for _ in range(copies_for(mb << 20))]
        outs = torch.empty(len(bufs), device="cuda")
        calls = [(lambda i=i, x=x: torch.amax(x, 0, out=outs[i])) for i, x in enumerate(bufs)]
        us = graph_us(calls)
        out[f"cold_read_{mb}MB_us"] = us
        out[f"cold_read_{mb}MB_GBps"] = (mb << 20) / (us * 1e-6) / 1e9
        del bufs
    return out


# ---- kernels ---------------------------------------------------------------------------------
def _spec(name: str) -> tuple[int, int]:
    m = re.search(r"_w(\d)g(\d+)", name)
    return int(m[1]), int(m[2])


def make_kernel(name: str, n: int, k: int) -> tuple[Callable[[torch.Tensor, int], object], int]:
    """``(run(x, copy_index), weight_bytes)``; builds enough weight copies to defeat L2."""
    from bitpress.kernels import cuda_mma, gpu_layout

    if name in ("fp16", "bf16"):
        dt = torch.float16 if name == "fp16" else torch.bfloat16
        nbytes = n * k * 2
        ws = [torch.randn(n, k, device="cuda").to(dt) for _ in range(copies_for(nbytes))]
        return (lambda x, i: F.linear(x, ws[i % len(ws)])), nbytes
    bits, gs = _spec(name) if "_w" in name else (0, 0)
    if name.startswith("mma_"):
        spec = name[4:]
        if "_s50" in spec:
            from bitpress.formats import quantize_rtn
            keep = torch.rand(n, k // gs) < 0.5
            if spec.endswith("skew"):
                keep = torch.rand(n, k // gs) < torch.linspace(0.05, 0.95, n)[:, None]
            qw = quantize_rtn(torch.randn(n, k), bits, gs, keep=keep)
            b = qw.pack_bsr(torch.float16)
            lay = gpu_layout.sparse_to_gpu(*[b[s].cuda() for s in (
                "row_ptr", "col_idx", "qvalues", "scales", "zeros")], bits, gs, k)
            nbytes = lay.nbytes()
            lays = [lay] + [gpu_layout.GpuSparse(*[t.clone() if isinstance(t, torch.Tensor) else t
                                                   for t in (lay.qw, lay.q1, lay.sz, lay.rows,
                                                             lay.cols, lay.block_ptr)],
                                                 lay.n, lay.k, lay.bits, lay.gs, lay.nnz,
                                                 lay.param_dtype)
                            for _ in range(copies_for(nbytes) - 1)]
            plans = [cuda_mma.sparse_plan_from_layout(p, None) for p in lays]
        else:
            w = rand_dense(n, k, bits, gs, device="cuda")
            qweight, scales, zeros = w["qweight"], w["scales"], w["zeros"]
            lay = gpu_layout.dense_to_gpu(qweight, scales, zeros, bits, gs, k)
            nbytes = lay.nbytes()
            lays = [lay] + [gpu_layout.GpuDense(lay.qw.clone(), None if lay.q1 is None else
                                                lay.q1.clone(), lay.sz.clone(), lay.n, lay.k,
                                                lay.bits, lay.gs, lay.param_dtype)
                            for _ in range(copies_for(nbytes) - 1)]
            plans = [cuda_mma.dense_plan_from_layout(p, None) for p in lays]
        return (lambda x, i: plans[i % len(plans)](x)), nbytes
    if name.startswith("triton_"):
        from bitpress.kernels.triton import triton_dense_qmm
        w = rand_dense(n, k, bits, gs, device="cuda")
        one = (w["qweight"], w["scales"], w["zeros"])
        nbytes = sum(t.numel() * t.element_size() for t in one)
        ws = [one] + [tuple(t.clone() for t in one) for _ in range(copies_for(nbytes) - 1)]
        return (lambda x, i: triton_dense_qmm(x, *ws[i % len(ws)], None, bits, gs, k)), nbytes
    if name == "tinygemm_w4g128":
        gs = 128
        w = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
        wu8 = (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8)
        packed = torch._convert_weight_to_int4pack(wu8, 8)
        sz = torch.rand(k // gs, n, 2, device="cuda").to(torch.bfloat16)
        nbytes = n * k // 2 + sz.numel() * 2
        ws = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(copies_for(nbytes) - 1)]
        return (lambda x, i: torch._weight_int4pack_mm(x, ws[i % len(ws)][0], gs,
                                                       ws[i % len(ws)][1])), nbytes
    if name.startswith("gemlite_"):
        try:
            from gemlite import GemLiteLinear, DType
        except ImportError:
            from gemlite.core import GemLiteLinearTriton as GemLiteLinear, DType
        layers = []
        nbytes = n * k * bits // 8 + 2 * 2 * n * (k // gs)
        for _ in range(copies_for(nbytes)):
            lin = GemLiteLinear(bits, group_size=gs, in_features=k, out_features=n,
                                input_dtype=DType.FP16, output_dtype=DType.FP16)
            wq = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device="cuda")
            sc = torch.rand(n, k // gs, device="cuda").half() * 0.01
            zr = torch.full((n, k // gs), float(1 << (bits - 1)), device="cuda").half()
            lin.pack(wq, sc, zr, None)
            layers.append(lin)
        return (lambda x, i: layers[i % len(layers)](x)), nbytes
    raise ValueError(name)


KERNELS = ["fp16", "bf16", "mma_w4g128", "mma_w2g64", "mma_w3g128", "mma_w4g128_s50",
           "mma_w4g128_s50skew", "triton_w4g128", "triton_w2g64", "tinygemm_w4g128",
           "gemlite_w4g128", "gemlite_w2g64"]


def x_dtype(name: str) -> torch.dtype:
    return torch.bfloat16 if name in ("bf16", "tinygemm_w4g128") else torch.float16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="batch 1 and 16 only")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--budget-s", type=float, default=200.0)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    t_start = time.time()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "cuda": torch.version.cuda, "calibration": {}, "rows": [], "errors": []}
    try:
        res["calibration"] = calibrate()
        print("calibration:", json.dumps(res["calibration"]))
    except Exception as e:  # noqa: BLE001
        res["errors"].append({"what": "calibration", "error": repr(e)})
    batches = [1, 16] if a.quick else BATCHES
    fp16_us: dict = {}
    for n, k in SHAPES:
        for name in a.kernels.split(","):
            if time.time() - t_start > a.budget_s:
                res["errors"].append({"what": f"{name} {n}x{k}", "error": "time budget spent"})
                continue
            try:
                run, nbytes = make_kernel(name, n, k)
            except Exception as e:  # noqa: BLE001
                res["errors"].append({"what": f"{name} {n}x{k} build", "error": repr(e),
                                      "trace": traceback.format_exc()[-1500:]})
                print(f"{name:22s} {n}x{k}: build failed: {e!r}")
                continue
            ncopies = copies_for(nbytes)
            for m in batches:
                try:
                    x = torch.randn(m, k, device="cuda").to(x_dtype(name))
                    gus = graph_us([(lambda i=i: run(x, i)) for i in range(ncopies)])
                    hus = host_us(lambda: run(x, 0))
                    if name == "fp16":
                        fp16_us[(n, k, m)] = gus
                    base = fp16_us.get((n, k, m))
                    row = {"kernel": name, "N": n, "K": k, "m": m, "gpu_us": gus,
                           "host_us": hus, "weight_bytes": nbytes,
                           "GBps": nbytes / (gus * 1e-6) / 1e9,
                           "speedup_vs_fp16": (base / gus) if base else None}
                    res["rows"].append(row)
                    print(f"{name:22s} {n:5d}x{k:<5d} m={m:<3d} gpu {gus:8.2f} us  host "
                          f"{hus:6.2f} us  {row['GBps']:7.1f} GB/s  x{row['speedup_vs_fp16'] or 0:.2f}")
                except Exception as e:  # noqa: BLE001
                    res["errors"].append({"what": f"{name} {n}x{k} m={m}", "error": repr(e),
                                          "trace": traceback.format_exc()[-1500:]})
                    print(f"{name:22s} {n}x{k} m={m}: failed: {e!r}")
            del run
            torch.cuda.empty_cache()
            with open(os.path.join(a.out, "kernels.json"), "w") as f:
                json.dump(res, f, indent=1)
    res["seconds"] = time.time() - t_start
    with open(os.path.join(a.out, "kernels.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {os.path.join(a.out, 'kernels.json')} in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
