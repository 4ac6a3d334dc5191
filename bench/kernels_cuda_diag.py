#!/usr/bin/env python3
"""bitpress GPU diagnostic: host overhead vs kernel time of the Triton qmm paths (4096x4096).

Run from the repo root on the GPU machine (no network needed, < 120 s):

    PYTHONPATH=$PWD python3 bench/kernels_cuda_diag.py            # heuristic configs (tuning off)
    DIAG_TUNE=1 PYTHONPATH=$PWD python3 bench/kernels_cuda_diag.py  # + run bitpress's tuner on 2 keys

Columns of the main table (all microseconds, medians):
  full    triton.testing.do_bench of the whole Python call, L2 flushed (= what bench/kernels_cuda.py reports)
  host    host time per call (perf_counter over 40 calls while the GPU is held busy by torch.cuda._sleep)
  graph   the same call captured in a CUDA graph, replayed under do_bench (= GPU time of all its kernels,
          zeros/cast included, no host overhead)
  bare    do_bench of the main Triton kernel alone, launched with precomputed arguments (no wrapper)
  b.host  host time of that bare launch
  b.graph the bare launch in a CUDA graph (= main kernel GPU time only)
  loop    50 back-to-back full calls between two events, no flush (hot L2; ~max(host, GPU) per call:
          what a decode loop sees)
  floor   packed bytes / measured copy bandwidth
If full >> graph, the benchmark number is host overhead, not the kernel.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import time
import traceback
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)   # cupy ExternalStream noise
os.environ.pop("TRITON_INTERPRET", None)
os.environ["BITPRESS_TRITON_TUNE"] = "0"          # heuristic configs; DIAG_TUNE=1 tunes explicitly
os.environ.setdefault("BITPRESS_TRITON_CACHE", "/tmp/bitpress_diag_tune")
T0 = time.time()
BUDGET = float(os.environ.get("DIAG_BUDGET_S", "100"))
faulthandler.dump_traceback_later(BUDGET + 15, exit=True)   # hard stop, never hang
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def say(*a) -> None:
    print(*a, flush=True)


def left() -> float:
    return BUDGET - (time.time() - T0)


def err(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}".replace("\n", " ")
    return s[:110]


try:
    import torch
    import torch.nn.functional as F
except Exception as e:  # noqa: BLE001
    say("torch import failed:", err(e))
    sys.exit(2)
if not torch.cuda.is_available():
    say("no CUDA device: this diagnostic needs the GPU machine")
    sys.exit(2)
try:
    import triton
    from triton.testing import do_bench

    import kernels_cuda  # noqa: E402  (bench/, the random weights of the benchmark)
    from bitpress.kernels.triton import api, repack, tune
    from bitpress.kernels.triton import kernels as KM
except Exception as e:  # noqa: BLE001
    traceback.print_exc()
    say("import failed:", err(e))
    sys.exit(2)

DEV = torch.device("cuda")
N = K = 4096
SLEEP_CYCLES = int(os.environ.get("DIAG_SLEEP_CYCLES", "40000000"))   # ~20 ms at ~2 GHz
props = torch.cuda.get_device_properties(0)
say(f"{torch.cuda.get_device_name(0)} ({props.multi_processor_count} SMs) torch {torch.__version__} "
    f"triton {triton.__version__} python {sys.version.split()[0]}")


# ---- timing helpers ---------------------------------------------------------------------------
def t_bench(fn, rep: int = 25) -> float:
    return do_bench(fn, warmup=5, rep=rep, return_mode="median") * 1e3


def t_host(fn, n: int = 40) -> str:
    fn()
    torch.cuda.synchronize()
    try:
        torch.cuda._sleep(SLEEP_CYCLES)
    except Exception:  # noqa: BLE001
        pass
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    ev = torch.cuda.Event()
    ev.record()
    busy = not ev.query()
    torch.cuda.synchronize()
    us = (t1 - t0) / n * 1e6
    return f"{us:.1f}" + ("" if busy else "*")   # * = GPU drained before the host finished


def t_graph(fn, rep: int = 25) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        fn()
    gr.replay()
    torch.cuda.synchronize()
    us = t_bench(gr.replay, rep)
    del gr
    return us


def t_loop(fn, n: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / n


def t_tuner(fn) -> float:
    """What tune.pick measures: do_bench(warmup=3, rep=15), mean."""
    return do_bench(fn, warmup=3, rep=15) * 1e3


def safe(f, *a, **k) -> str:
    if left() < 0:
        return "skip"
    try:
        r = f(*a, **k)
        return r if isinstance(r, str) else f"{r:.1f}"
    except Exception as e:  # noqa: BLE001
        say(f"    [error in {getattr(f, '__name__', f)}] {err(e)}")
        try:
            torch.cuda.synchronize()
        except Exception as e2:  # noqa: BLE001
            say(f"    [sync after error failed] {err(e2)}")
        return "ERR"


# ---- data (same generators as bench/kernels_cuda.py) -------------------------------------------
g = torch.Generator(device="cuda").manual_seed(0)


def rand_dense(bits: int, gs: int):
    return kernels_cuda.rand_dense(N, K, bits, gs, g)


def rand_bsr(bits: int = 4, gs: int = 128):
    return kernels_cuda.rand_bsr(N, K, bits, gs, False, g)


DENSE = {"W4 g128": (4, 128), "W2 g64": (2, 64)}
dense = {name: rand_dense(b, gs) for name, (b, gs) in DENSE.items()}
bsr = rand_bsr()
w16 = torch.randn(N, K, generator=g, device="cuda").half() * 0.02
XS = {m: torch.randn(m, K, generator=g, device="cuda").half() for m in (1, 16)}


def dense_full(name, x, cfg=None, kernel="auto"):
    qw, s, z = dense[name]
    bits, gs = DENSE[name]
    return lambda: api.triton_dense_qmm(x, qw, s, z, None, bits, gs, K, kernel=kernel, config=cfg)


def sparse_full(split, x, cfg=None):
    rp, ci, qv, s, z = bsr
    return lambda: api.triton_sparse_qmm(x, rp, ci, qv, s, z, None, 4, 128, K, split=split,
                                         config=cfg)


def dense_bare(name, x, cfg=None, kernel="auto"):
    """The main Triton launch of api._run_dense with everything precomputed."""
    qw, s, z = dense[name]
    bits, gs = DENSE[name]
    p = repack.dense_packed(qw, s, z, bits, gs, K)
    x2 = x.reshape(-1, K)
    m = x2.shape[0]
    if kernel == "auto":
        kernel = "gemv" if m <= api.GEMV_MAX_M else "mm"
    if cfg is None:
        cfg = (tune.gemv_default if kernel == "gemv" else tune.mm_default)(m, N, K, gs, DEV)
    split = int(cfg.get("SPLIT_K", 1))
    bm, bn, bk = int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"]), int(cfg["BLOCK_K"])
    y = torch.zeros(m, N, dtype=torch.float32 if split > 1 else x.dtype, device=DEV)
    common = dict(BITS=bits, PF=32 // bits, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
                  GROUP_TILE=tune.group_tile(gs, K, bk), HAS_BIAS=False, **api._launch_opts(cfg))
    args = (x2, p.qw, p.s, p.z, y, y, m, N, K, gs, x2.stride(0), y.stride(0))
    if kernel == "gemv":
        launcher = KM.dense_gemv_kernel[(triton.cdiv(N, bn), split, triton.cdiv(m, bm))]
    else:
        launcher = KM.dense_mm_kernel[(triton.cdiv(m, bm) * triton.cdiv(N, bn), split)]
        common["DOT_F32"] = False
    return lambda: launcher(*args, **common)


def sparse_bare(split, x, cfg=None):
    rp, ci, qv, s, z = bsr
    p = repack.sparse_packed(rp, ci, qv, s, z, 4, 128, K)
    x2 = x.reshape(-1, K)
    m = x2.shape[0]
    cfg = cfg or tune.sparse_default(m, p.n, p.nnz, p.gs, DEV)
    opts = api._launch_opts(cfg)
    common = dict(BITS=4, PF=8, GS_PAD=triton.next_power_of_2(p.gs), BLOCK_G=int(cfg["BLOCK_G"]),
                  **opts)
    wpg = p.qv.shape[1]
    if split == "task":
        y = torch.zeros(m, p.n, dtype=torch.float32, device=DEV)
        gpt = triton.cdiv(p.nnz, max(1, int(cfg["n_tasks"])))
        launcher = KM.sparse_task_kernel[(triton.cdiv(p.nnz, gpt),)]
        args = (x2, p.rows, p.cols, p.qv, p.s, p.z, y, m, p.nnz, p.k, p.gs, wpg, gpt,
                x2.stride(0), y.stride(0))
    else:
        y = torch.empty(m, p.n, dtype=x.dtype, device=DEV)
        launcher = KM.sparse_row_kernel[(p.n, m)]
        args = (x2, p.row_ptr, p.cols, p.qv, p.s, p.z, y, y, p.n, p.k, p.gs, wpg, x2.stride(0),
                y.stride(0))
        common["HAS_BIAS"] = False
    return lambda: launcher(*args, **common)


def packed_bytes(name):
    if name.startswith("sparse"):
        rp, ci, qv, s, z = bsr
        return qv.numel() * 4 + 4 * s.numel() + ci.numel() * 4 + rp.numel() * 4
    if name.startswith("fp16"):
        return w16.numel() * 2
    if name.startswith("cuda_raw"):
        name = name.split(None, 1)[1]
    qw, s, z = dense[name.split()[0] + " " + name.split()[1]]
    return qw.numel() * 4 + 4 * s.numel()


# ---- 0. bandwidth floor -------------------------------------------------------------------------
try:
    _src = torch.empty(1 << 26, dtype=torch.float32, device="cuda")
    _dst = torch.empty_like(_src)
    _ms = do_bench(lambda: _dst.copy_(_src), warmup=5, rep=30, return_mode="min")
    BW = 2 * _src.numel() * 4 / (_ms * 1e-3)
    _src = _dst = None
except Exception as e:  # noqa: BLE001
    BW = 4.264e12
    say("copy bw failed:", err(e))
say(f"copy bandwidth {BW / 1e9:.0f} GB/s; heuristic configs: "
    f"gemv W4 M1 {tune.gemv_default(1, N, K, 128, DEV)}, mm W4 M16 {tune.mm_default(16, N, K, 128, DEV)}, "
    f"sparse {tune.sparse_default(1, N, bsr[1].numel(), 128, DEV)}")

# ---- 1. main table ------------------------------------------------------------------------------
CASES = []
for m in (1, 16):
    x = XS[m]
    CASES.append((f"fp16 F.linear M={m}", lambda x=x: F.linear(x, w16), None))
    for name in DENSE:
        CASES.append((f"{name} M={m}", dense_full(name, x), lambda name=name, x=x: dense_bare(name, x)))
    for split in ("task", "row"):
        CASES.append((f"sparse W4S50 {split} M={m}", sparse_full(split, x),
                      lambda split=split, x=x: sparse_bare(split, x)))
try:
    from bitpress.kernels import cuda_raw

    qw4, s4, z4 = dense["W4 g128"]
    CASES.append(("cuda_raw W4 g128 M=1",
                  lambda: cuda_raw.cuda_raw_dense_qmm(XS[1], qw4, s4, z4, None, 4, 128, K), None))
except Exception as e:  # noqa: BLE001
    say("cuda_raw unavailable:", err(e))

hdr = (f"{'case':<26}{'full':>8}{'host':>8}{'graph':>8}{'bare':>8}{'b.host':>8}{'b.graph':>8}"
       f"{'loop':>8}{'floor':>7}")
say("\n== 1. full call vs host vs GPU (us) ==")
say(hdr)
say("-" * len(hdr))
for label, full, mk_bare in CASES:
    if left() < 0:
        say(f"{label:<26} skipped (budget)")
        continue
    try:
        full()   # compile (+ repack) outside timing
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        say(f"{label:<26} first call failed: {err(e)}")
        continue
    cols = [safe(t_bench, full), safe(t_host, full), safe(t_graph, full)]
    if mk_bare is not None:
        try:
            bare = mk_bare()
            bare()
            torch.cuda.synchronize()
            cols += [safe(t_bench, bare), safe(t_host, bare), safe(t_graph, bare)]
        except Exception as e:  # noqa: BLE001
            say(f"    [bare launch failed] {err(e)}")
            cols += ["ERR"] * 3
    else:
        cols += ["-"] * 3
    cols.append(safe(t_loop, full))
    floor = packed_bytes(label) / BW * 1e6
    say(f"{label:<26}" + "".join(f"{c:>8}" for c in cols) + f"{floor:>7.1f}")

# ---- 2. host-side breakdown of one dense W4 M=1 call ---------------------------------------------
say("\n== 2. host cost of the pieces of triton_dense_qmm (W4 g128, M=1), us/call ==")


def t_py(fn, n: int = 2000) -> str:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return f"{(time.perf_counter() - t0) / n * 1e6:.2f}"


if left() > 0:
    try:
        qw, s, z = dense["W4 g128"]
        x = XS[1]
        p = repack.dense_packed(qw, s, z, 4, 128, K)
        cfg = tune.gemv_default(1, N, K, 128, DEV)
        x2 = x.reshape(-1, K)
        key = f"gemv|4|128|{N}|{K}|1|float16"
        yf = torch.zeros(1, N, dtype=torch.float32, device=DEV)
        pieces = [
            ("repack.dense_packed (cache hit)", lambda: repack.dense_packed(qw, s, z, 4, 128, K), t_py),
            ("api._check_x", lambda: api._check_x(x, K, qw.device, "d"), t_py),
            ("tune.gemv_default", lambda: tune.gemv_default(1, N, K, 128, DEV), t_py),
            ("torch.cuda.get_device_properties", lambda: torch.cuda.get_device_properties(DEV), t_py),
            ("tune.pick (tuning off)", lambda: tune.pick(key, DEV, cfg, list, None), t_py),
            ("torch.zeros(1,N,f32)", lambda: torch.zeros(1, N, dtype=torch.float32, device=DEV), t_host),
            ("torch.empty(1,N,f16)", lambda: torch.empty(1, N, dtype=torch.float16, device=DEV), t_py),
            ("bare triton gemv launch", dense_bare("W4 g128", x), t_host),
            ("y.to(float16)", lambda: yf.to(torch.float16), t_host),
            ("api._run_dense (alloc+launch+cast)",
             lambda: api._run_dense("gemv", cfg, x2, p, None, torch.float16), t_host),
            ("whole triton_dense_qmm", dense_full("W4 g128", x), t_host),
            ("whole triton_sparse_qmm task", sparse_full("task", x), t_host),
            ("whole triton_sparse_qmm row", sparse_full("row", x), t_host),
        ]
        for lab, fn, how in pieces:
            say(f"  {lab:<40}{safe(how, fn):>9}")
    except Exception as e:  # noqa: BLE001
        say("  breakdown failed:", err(e))

# ---- 3. explicit launch configs (GPU time via CUDA graph, + what the tuner would see) ------------
say("\n== 3. launch configs: graph = GPU us of the full call; full = do_bench of the call; "
    "tuner = do_bench(rep=15) mean as tune.pick measures ==")
G1 = dict(BLOCK_M=1)
SWEEPS = [
    ("W4 g128 M=1 gemv", lambda c: dense_full("W4 g128", XS[1], c, "gemv"), [
        None,
        dict(G1, BLOCK_N=32, BLOCK_K=128, SPLIT_K=1, num_warps=4),
        dict(G1, BLOCK_N=16, BLOCK_K=128, SPLIT_K=1, num_warps=2),
        dict(G1, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=4),
        dict(G1, BLOCK_N=64, BLOCK_K=128, SPLIT_K=16, num_warps=4),
        dict(G1, BLOCK_N=128, BLOCK_K=64, SPLIT_K=8, num_warps=4),
        dict(G1, BLOCK_N=32, BLOCK_K=128, SPLIT_K=8, num_warps=2),
        dict(G1, BLOCK_N=64, BLOCK_K=128, SPLIT_K=8, num_warps=8),
        dict(G1, BLOCK_N=64, BLOCK_K=128, SPLIT_K=8, num_warps=4, num_stages=1),
        dict(G1, BLOCK_N=64, BLOCK_K=128, SPLIT_K=8, num_warps=4, num_stages=4),
    ]),
    ("sparse task M=1", lambda c: sparse_full("task", XS[1], c), [
        None,
        dict(n_tasks=1056, BLOCK_G=16, num_warps=4),
        dict(n_tasks=2112, BLOCK_G=16, num_warps=4),
        dict(n_tasks=4224, BLOCK_G=16, num_warps=4),
        dict(n_tasks=8192, BLOCK_G=8, num_warps=2),
        dict(n_tasks=264, BLOCK_G=32, num_warps=4),
    ]),
    ("sparse row M=16", lambda c: sparse_full("row", XS[16], c), [
        None,
        dict(BLOCK_G=32, num_warps=4),
        dict(BLOCK_G=16, num_warps=2),
        dict(BLOCK_G=8, num_warps=1),
    ]),
    ("W4 g128 M=16", lambda c: dense_full("W4 g128", XS[16], c, "mm"), [
        None,
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=3),
        dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, SPLIT_K=2, num_warps=4, num_stages=3),
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=4),
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=3),
    ]),
    ("W4 g128 M=16 via gemv", lambda c: dense_full("W4 g128", XS[16], c, "gemv"), [
        dict(BLOCK_M=4, BLOCK_N=64, BLOCK_K=64, SPLIT_K=8, num_warps=4),
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=8, num_warps=4),
    ]),
    ("W2 g64 M=1 gemv", lambda c: dense_full("W2 g64", XS[1], c, "gemv"), [
        None,
        dict(G1, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, num_warps=2),
        dict(G1, BLOCK_N=16, BLOCK_K=64, SPLIT_K=1, num_warps=1),
        dict(G1, BLOCK_N=64, BLOCK_K=64, SPLIT_K=16, num_warps=4),
        dict(G1, BLOCK_N=128, BLOCK_K=64, SPLIT_K=8, num_warps=4),
    ]),
    ("sparse task M=16", lambda c: sparse_full("task", XS[16], c), [
        None,
        dict(n_tasks=2112, BLOCK_G=16, num_warps=4),
        dict(n_tasks=8192, BLOCK_G=8, num_warps=2),
    ]),
]
for title, mk, cfgs in SWEEPS:
    say(f"-- {title}")
    for c in cfgs:
        if left() < 0:
            say("   (budget exhausted, rest skipped)")
            break
        lab = "heuristic" if c is None else ",".join(
            f"{k.replace('BLOCK_', '').replace('num_', '').replace('SPLIT_K', 'S')}={v}"
            for k, v in c.items())
        try:
            fn = mk(c)
            fn()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            say(f"   {lab:<44} compile/run failed: {err(e)}")
            continue
        say(f"   {lab:<44} graph {safe(t_graph, fn):>7}  full {safe(t_bench, fn):>7}  "
            f"tuner {safe(t_tuner, fn):>7}")

# ---- 4. bitpress's own tuner (opt-in: compiles ~12-25 configs per key) ---------------------------
if os.environ.get("DIAG_TUNE") == "1":
    say("\n== 4. tune.pick (BITPRESS_TRITON_TUNE on, fresh cache) ==")
    os.environ["BITPRESS_TRITON_TUNE"] = "1"
    for title, fn in (("W4 g128 M=1", dense_full("W4 g128", XS[1])),
                      ("sparse task M=1", sparse_full("task", XS[1]))):
        if left() < 20:
            say(f"   {title}: skipped (budget)")
            continue
        try:
            t = time.time()
            fn()
            torch.cuda.synchronize()
            picked = dict(tune._picked)
            say(f"   {title}: tuned in {time.time() - t:.1f} s; picks {picked}")
            say(f"   {title}: graph {safe(t_graph, fn)}  full {safe(t_bench, fn)}")
        except Exception as e:  # noqa: BLE001
            say(f"   {title}: tuning failed: {err(e)}")
    os.environ["BITPRESS_TRITON_TUNE"] = "0"

# ---- 5. per-kernel GPU time (CUPTI) for 3 paths ------------------------------------------------
if left() > 8:
    say("\n== 5. torch.profiler per-kernel GPU time (avg us per launch, 20 calls) ==")
    try:
        from torch.profiler import ProfilerActivity, profile

        for title, fn in (("W4 g128 M=1", dense_full("W4 g128", XS[1])),
                          ("sparse task M=1", sparse_full("task", XS[1])),
                          ("sparse row M=16", sparse_full("row", XS[16]))):
            if left() < 4:
                break
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
            rows = []
            for e in prof.key_averages():
                tot = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                if tot and tot > 0:
                    rows.append((e.key, e.count, tot / max(1, e.count)))
            say(f"-- {title}")
            for name, cnt, avg in sorted(rows, key=lambda r: -r[1] * r[2])[:6]:
                say(f"   {name[:60]:<60} x{cnt:<4} {avg:8.1f}")
    except Exception as e:  # noqa: BLE001
        say("   profiler failed:", err(e))

say(f"\ndone in {time.time() - T0:.0f} s")
faulthandler.cancel_dump_traceback_later()
