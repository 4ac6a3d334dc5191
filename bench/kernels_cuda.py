"""GPU kernel benchmark for bitpress::dense_qmm / sparse_qmm (issue 7).

For the Llama-7B linear shapes (out x in: 4096x4096, 11008x4096, 4096x11008) and batch
1/16/64/256, times in the same process:

* Triton dense W2 g64, W3 g128, W4 g128 (``triton_dense_qmm``, autotuned; the first run on a
  new GPU model tunes and caches configs under ~/.cache/bitpress/triton),
* Triton group-sparse W4 g128 at 50% sparsity, task split and row split, on a uniform
  random mask and on a skewed one (a tenth of the rows keep 90% of their groups),
* the hand-written CUDA GEMV (``cuda_raw``, W2 g64 / W4 g128, batch <= 8) when CuPy is there,
* torch fp16 ``F.linear`` (cuBLAS),

with ``triton.testing.do_bench`` (median, L2 flushed between runs), next to the device's copy
bandwidth measured in the same run (a 1 GiB device-to-device copy, read + write bytes).
GB/s counts the bytes a method must read: packed codes + fp16 scales/zeros (+ indices for
sparse), fp16 weights for torch, plus activations and outputs.

    .venv/bin/python bench/kernels_cuda.py                       # everything, JSON to bench/results/
    .venv/bin/python bench/kernels_cuda.py --shapes 4096x4096 --batches 1,16
    .venv/bin/python bench/kernels_cuda.py --methods "torch fp16,triton W2 g64"

Needs a CUDA GPU and Triton; without them it exits with a message (status 2).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bitpress.formats.packing import packed_words  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from _common import write_json  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
BATCHES = [1, 16, 64, 256]
DENSE = {"triton W2 g64": (2, 64), "triton W3 g128": (3, 128), "triton W4 g128": (4, 128)}
RAW = {"cuda_raw W2 g64": (2, 64), "cuda_raw W4 g128": (4, 128)}
SPARSE = ["triton W4S50 task", "triton W4S50 row", "triton W4S50 skew task",
          "triton W4S50 skew row"]
METHODS = ["torch fp16", *DENSE, *RAW, *SPARSE]


def require_gpu() -> None:
    problems = []
    if not torch.cuda.is_available():
        problems.append("no CUDA device is visible to torch "
                        f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    try:
        import triton  # noqa: F401
    except ImportError:
        problems.append("triton is not installed (pip install triton)")
    if problems:
        print("bench/kernels_cuda.py needs a CUDA GPU with Triton: " + "; ".join(problems)
              + ". Run it on a GPU machine; the CPU kernel benchmark is bench/cpu_kernels.py.",
              file=sys.stderr)
        sys.exit(2)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in bytes/s (read + write), best of a few copies."""
    from triton.testing import do_bench

    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=5, rep=50, return_mode="min")
    del a, b
    return 2 * nbytes / (ms * 1e-3)


def rand_dense(out: int, inf: int, bits: int, gs: int, g: torch.Generator):
    """``(qweight, scales, zeros)`` of a random dense weight on the GPU."""
    w = _common.rand_dense(out, inf, bits, gs, g, device="cuda")
    return w["qweight"], w["scales"], w["zeros"]


def rand_bsr(out: int, inf: int, bits: int, gs: int, skew: bool, g: torch.Generator):
    """``(row_ptr, col_idx, qvalues, scales, zeros)`` of a random 50 %-sparse weight."""
    w = _common.rand_bsr(out, inf, bits, gs, 0.5, g, device="cuda", skew=skew)
    return w["row_ptr"], w["col_idx"], w["qvalues"], w["scales"], w["zeros"]


def run(shapes, batches, methods, json_path: Optional[str]) -> None:
    import triton
    from triton.testing import do_bench

    from bitpress.kernels.triton import triton_dense_qmm, triton_sparse_qmm

    try:
        from bitpress.kernels import cuda_raw
    except ImportError as e:
        cuda_raw = None
        print(f"cuda_raw unavailable: {e}")
    bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    info = {"gpu": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
            "memory_GiB": round(props.total_memory / 2 ** 30, 1),
            "copy_bandwidth_GBs": round(bw / 1e9, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__,
            "host": platform.node(), "date": datetime.date.today().isoformat(),
            "command": " ".join(sys.argv)}
    print(f"{info['gpu']} ({info['sms']} SMs), copy bandwidth {bw / 1e9:.0f} GB/s, "
          f"torch {torch.__version__}, triton {triton.__version__}")
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    hdr = f"{'shape':>12} {'M':>4} {'method':<24} {'us':>9} {'GB/s':>7} {'%bw':>5} {'vs fp16':>8}"
    print(hdr)
    print("-" * len(hdr))
    for out, inf in shapes:
        w16 = torch.randn(out, inf, generator=g, device="cuda").half() * 0.02
        dense = {n: rand_dense(out, inf, b, gs, g) for n, (b, gs) in {**DENSE, **RAW}.items()
                 if n in methods}
        sparse = {}
        for n in methods:
            if n in SPARSE:
                skew = "skew" in n
                key = ("skew" if skew else "uniform")
                if key not in sparse:
                    sparse[key] = rand_bsr(out, inf, 4, 128, skew, g)
        for m in batches:
            x = torch.randn(m, inf, generator=g, device="cuda").half()
            io = 2 * m * (inf + out)
            base_us = None
            for name in methods:
                fn: Optional[Callable[[], torch.Tensor]] = None
                if name == "torch fp16":
                    fn, wbytes = (lambda: F.linear(x, w16)), 2 * out * inf
                elif name in DENSE:
                    bits, gs = DENSE[name]
                    qw, s, z = dense[name]
                    fn = (lambda qw=qw, s=s, z=z, bits=bits, gs=gs:
                          triton_dense_qmm(x, qw, s, z, None, bits, gs, inf))
                    wbytes = qw.numel() * 4 + 2 * s.numel() * 2
                elif name in RAW:
                    bits, gs = RAW[name]
                    if cuda_raw is None or m > cuda_raw.MAX_M:
                        continue
                    qw, s, z = dense[name]
                    fn = (lambda qw=qw, s=s, z=z, bits=bits, gs=gs:
                          cuda_raw.cuda_raw_dense_qmm(x, qw, s, z, None, bits, gs, inf))
                    wbytes = qw.numel() * 4 + 2 * s.numel() * 2
                elif name in SPARSE:
                    rp, ci, qv, s, z = sparse["skew" if "skew" in name else "uniform"]
                    split = "task" if name.endswith("task") else "row"
                    if m > 16:
                        continue  # large batches run the densified GEMM (the dense rows)
                    fn = (lambda rp=rp, ci=ci, qv=qv, s=s, z=z, split=split:
                          triton_sparse_qmm(x, rp, ci, qv, s, z, None, 4, 128, inf,
                                            split=split))
                    wbytes = qv.numel() * 4 + 2 * s.numel() * 2 + ci.numel() * 8 + rp.numel() * 4
                if fn is None:
                    continue
                fn()  # compile + tune outside the timing
                torch.cuda.synchronize()
                us = do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e3
                if name == "torch fp16":
                    base_us = us
                gbs = (wbytes + io) / (us * 1e-6) / 1e9
                row = {"out": out, "in": inf, "M": m, "method": name, "us": round(us, 2),
                       "GBs": round(gbs, 1), "pct_bw": round(100 * gbs * 1e9 / bw, 1),
                       "speedup_vs_fp16": round(base_us / us, 2) if base_us else None}
                rows.append(row)
                sp = f"{row['speedup_vs_fp16']:.2f}x" if base_us else "-"
                print(f"{out:>5}x{inf:<6} {m:>4} {name:<24} {us:>9.1f} {gbs:>7.0f} "
                      f"{row['pct_bw']:>5.0f} {sp:>8}")
        del w16, dense, sparse
        torch.cuda.empty_cache()
    if json_path:
        write_json(json_path, {"machine": info, "rows": rows})
        print(f"wrote {json_path}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma list like 4096x4096,11008x4096")
    ap.add_argument("--batches", default=None, help="comma list like 1,16")
    ap.add_argument("--methods", default=None, help=f"comma list from {METHODS}")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "kernels_cuda.json"))
    args = ap.parse_args(argv)
    shapes = SHAPES if not args.shapes else [
        tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = BATCHES if not args.batches else [int(b) for b in args.batches.split(",")]
    methods = METHODS if not args.methods else [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
    if "torch fp16" in methods:  # the baseline first, so speed-ups are against it
        methods = ["torch fp16"] + [m for m in methods if m != "torch fp16"]
    require_gpu()
    run(shapes, batches, methods, args.json)


if __name__ == "__main__":
    main()
