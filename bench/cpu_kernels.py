"""CPU kernel benchmark for bitpress::dense_qmm / sparse_qmm (issue 5).

For Llama-7B-like and SmolLM2 shapes and batch 1/4/16/64, times (same run, same process):

* bitpress dense W2 g64 (default ``lut`` mode: lookup-table kernel; ``lut63``: the opt-in
  folded variant) and W2 g64 on the int8 path, W3 g128, W4 g128 (int8 activation mode) and
  W4 g128 exact,
* bitpress group-sparse W4 g128 at 50% sparsity (block-sparse rows),
* torch dense ``F.linear`` in fp32 / bf16 / fp16,
* torch ``_weight_int4pack_mm_for_cpu`` (g128, bf16 activations) and ``_weight_int8pack_mm``,

each over a rotation of weight copies whose total size exceeds the last-level cache (so
every call streams its weight from memory), next to the machine's read bandwidth measured
in the same run by a large-array reduction (the better of a 4 KiB-page and a 2 MiB-page array:
the kernels' weight layouts live on 2 MiB pages where the OS gives them, see
bitpress/kernels/cpu/hugebuf.py). GB/s counts the bytes a method must read for
its weight (packed codes + fp16 scales/zeros for bitpress; indices too for sparse).

    .venv/bin/python bench/cpu_kernels.py                 # full table, writes bench/results/kernels.json
    .venv/bin/python bench/cpu_kernels.py --quick         # 4096x4096 and SmolLM2 only, batch 1/16
    .venv/bin/python bench/cpu_kernels.py --threads 1 --methods "bp W2 g64,bp W2 g64 int8" \
        --shapes 4096x4096 --batches 1,4 --json /tmp/k.json   # a subset
    .venv/bin/python bench/cpu_kernels.py --threads 1 --rounds 7 --shapes 4096x4096 --batches 1 \
        --methods "bp W2 g64,torch fp16"   # interleaved rounds: robust to bandwidth drift
    .venv/bin/python bench/cpu_kernels.py --threads 1 --compare-w2 \
        --json bench/results/kernels_w2_lut_ab.json           # W2 lut vs int8, interleaved
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _common import cpu_model, rand_bsr, rand_dense, timeit, write_json  # noqa: E402
from bitpress.kernels import cpu, native  # noqa: E402
from bitpress.kernels.cpu import hugebuf  # noqa: E402

LLAMA = [(4096, 4096), (11008, 4096), (4096, 11008)]
SMOL = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
BATCHES = [1, 4, 16, 64]
EXTRA = {(4096, 4096): ([128, 512], ["bp W4 g128", "bp W2 g64", "bp W2 g64 int8", "torch fp32",
                                     "torch bf16"])}
LLC_BYTES = 8 << 20


def llc_bytes() -> int:
    try:
        for idx in range(8):
            base = f"/sys/devices/system/cpu/cpu0/cache/index{idx}/"
            if open(base + "level").read().strip() == "3":
                s = open(base + "size").read().strip()
                return int(s[:-1]) * (1 << 10 if s.endswith("K") else 1 << 20)
    except OSError:
        pass
    return LLC_BYTES


_BW_ARRAYS: dict = {}


def _bw_arrays() -> dict:
    """512 MiB fp32 arrays to sum: one from torch's allocator (4 KiB pages) and, where the OS
    gives them, one on the 2 MiB pages the kernels' weight layouts live on (hugebuf)."""
    if not _BW_ARRAYS:
        _BW_ARRAYS["4k"] = torch.ones(128 << 20, dtype=torch.float32)
        if hugebuf.enabled():
            _BW_ARRAYS["2m"] = hugebuf.empty(512 << 20).view(torch.float32).fill_(1.0)
    return _BW_ARRAYS


#: per page size, the best read rate of the last read_bandwidth call (GB/s)
LAST_BW: dict = {}


def read_bandwidth(reps: int = 7) -> float:
    """GB/s of a sum over a 512 MiB fp32 array (best of ``reps``, torch's threads): the better
    of a 4 KiB-page and a 2 MiB-page array, so that a kernel reading from huge pages is held
    to the rate the machine reads them at (``LAST_BW`` keeps both)."""
    for name, x in _bw_arrays().items():
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
        LAST_BW[name] = x.numel() * 4 / best / 1e9
    return max(LAST_BW.values())


#: the cache size the weight rotation must exceed (--llc-mib overrides the sysfs figure: some
#: VMs report the host's whole L3, hundreds of MiB, which would need GBs of copies per method)
_LLC = {"bytes": None}


def copies(nbytes: int) -> int:
    llc = _LLC["bytes"] or llc_bytes()
    return max(2, -(-3 * llc // max(nbytes, 1)))


def _lean(fast, slow):
    """The plan's call, or the regular one where the plan declines (no plan, or x it does
    not take)."""
    if fast is None:
        return slow
    return lambda x: y if (y := fast(x)) is not None else slow(x)


def methods(out: int, inf: int, g: torch.Generator, skip: set[str]) -> dict:
    """name -> (bytes per weight, builder(k) -> callable(x))"""
    m: dict = {}

    # bitpress is timed through the lean call path its modules run (cpu.dense_plan /
    # sparse_plan: the weight bound once, ~3 us of Python per call instead of ~25 us for the
    # checked dense_qmm_cpu / sparse_qmm_cpu functions)
    def add_dense(name, bits, gs, mode):
        def build():
            w = rand_dense(out, inf, bits, gs, g)
            fast = cpu.dense_plan((torch.zeros(1, inf), w["qweight"], w["scales"], w["zeros"],
                                   None, bits, gs, inf), mode=mode)
            return w["bytes"], _lean(fast, lambda x: cpu.dense_qmm_cpu(
                x, w["qweight"], w["scales"], w["zeros"], None, bits, gs, inf, mode=mode))
        m[name] = build

    add_dense("bp W2 g64", 2, 64, "lut")  # the default: lookup-table kernel on AVX2
    add_dense("bp W2 g64 lut63", 2, 64, "lut63")  # opt-in: tables in +-63, folded lookups
    add_dense("bp W2 g64 int8", 2, 64, "int8")
    add_dense("bp W3 g128", 3, 128, "int8")
    add_dense("bp W4 g128", 4, 128, "int8")
    add_dense("bp W4 g128 exact", 4, 128, "exact")
    add_dense("bp W2 g64 exact", 2, 64, "exact")
    add_dense("bp W8 g128", 8, 128, "int8")
    add_dense("bp W8 g128 exact", 8, 128, "exact")
    for gs in (16, 32, 64):  # every group size the format allows runs the same kernels
        add_dense(f"bp W4 g{gs}", 4, gs, "int8")
        add_dense(f"bp W4 g{gs} exact", 4, gs, "exact")

    def add_sparse(name, gs, sparsity, mode):
        def build():
            w = rand_bsr(out, inf, 4, gs, sparsity, g)
            fast = cpu.sparse_plan((torch.zeros(1, inf), w["row_ptr"], w["col_idx"],
                                    w["qvalues"], w["scales"], w["zeros"], None, 4, gs, inf),
                                   mode=mode)
            # what the CPU kernel reads: its layout's masks, fp16 params and codes
            nbytes = native._module().qmm_sparse_used_bytes(
                fast.keep[0].data_ptr(), w["col_idx"].numel(), out, inf, 4, gs, 0)
            return nbytes, _lean(fast, lambda x: cpu.sparse_qmm_cpu(
                x, w["row_ptr"], w["col_idx"], w["qvalues"], w["scales"], w["zeros"], None, 4,
                gs, inf, mode=mode))
        m[name] = build

    add_sparse("bp W4 g128 S50", 128, 0.5, "int8")
    for sp in (30, 50):  # GQSA's own group size
        add_sparse(f"bp W4 g16 S{sp}", 16, sp / 100, "int8")
        add_sparse(f"bp W4 g16 S{sp} exact", 16, sp / 100, "exact")

    for dt, nm in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        def build(dt=dt):
            w = (torch.randn(out, inf, generator=g) * 0.02).to(dt)
            return w.numel() * w.element_size(), (lambda x: F.linear(x.to(dt), w))
        m[f"torch {nm}"] = build

    def int4_build():
        if inf % 128:
            raise NotImplementedError(f"torch int4 needs in % 128 == 0 (in={inf})")
        wi = torch.randint(0, 16, (out, inf), dtype=torch.int32, generator=g)
        wp = torch._convert_weight_to_int4pack_for_cpu(wi, 2)
        sz = (torch.rand(inf // 128, out, 2, generator=g) * 0.02).bfloat16()
        return wp.numel() * wp.element_size() + sz.numel() * 2, \
            (lambda x: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), wp, 128, sz))
    m["torch int4 g128"] = int4_build

    def int8_build():
        w8 = torch.randint(-128, 127, (out, inf), dtype=torch.int8, generator=g)
        s8 = (torch.rand(out, generator=g) * 0.02).bfloat16()
        return w8.numel() + s8.numel() * 2, \
            (lambda x: torch._weight_int8pack_mm(x.bfloat16(), w8, s8))
    m["torch int8"] = int8_build
    return {k: v for k, v in m.items() if k not in skip}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--llc-mib", type=int, default=None,
                    help="rotate weight copies over 3x this many MiB (default: the L3 size "
                         "sysfs reports)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--methods", default=None,
                    help="comma list of method names to run (default: all)")
    ap.add_argument("--shapes", default=None, help="comma list like 4096x4096,576x576")
    ap.add_argument("--batches", default=None, help="comma list like 1,4,16")
    ap.add_argument("--compare-w2", action="store_true",
                    help="only W2 g64 lut vs int8 path, interleaved pass by pass (A/B)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="R > 1: per shape and batch, time every method and the read bandwidth "
                         "R times, interleaved round by round, and report medians (ratios to "
                         "the bandwidth are taken within each round): for a machine whose "
                         "memory bandwidth drifts while it runs")
    ap.add_argument("--isa", default="auto",
                    help="force the bitpress kernels' ISA (avx512, avx2, scalar; default: the "
                         "best the CPU has): run twice to compare two builds on one machine")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "kernels.json"))
    args = ap.parse_args()
    if args.llc_mib:
        _LLC["bytes"] = args.llc_mib << 20
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu.set_isa(args.isa)
    shapes = ([(4096, 4096)] + SMOL) if args.quick else (LLAMA + SMOL)
    batches = [1, 16] if args.quick else BATCHES
    if args.shapes:
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    keep = set(args.methods.split(",")) if args.methods else None
    bw = read_bandwidth()
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "llc_bytes": llc_bytes(), "read_bandwidth_GBs": round(bw, 2),
            "read_bandwidth_pages_GBs": {k: round(v, 2) for k, v in LAST_BW.items()},
            "weight_pages": "2 MiB (hugebuf)" if hugebuf.enabled() else "4 KiB",
            "isa": cpu.get_isa(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print(f"# {info['cpu']}, {info['cores']} cores, {info['threads']} threads, ISA {info['isa']}, "
          f"LLC {info['llc_bytes'] >> 20} MiB, read bandwidth {bw:.1f} GB/s (sum over 512 MiB; "
          f"by page size {info['read_bandwidth_pages_GBs']})")
    g = torch.Generator().manual_seed(0)
    if args.compare_w2:
        compare_w2(shapes, batches, g, bw, info, args.json)
        return
    rows = []
    hdr = f"{'shape':>12} {'M':>3} {'method':<18} {'us':>10} {'GB/s':>7} {'%BW':>5}"
    print(hdr)
    if args.rounds > 1:
        rows, bws, bw_pages = interleaved(shapes, batches, keep, args.rounds, g)
        bw = statistics.median(bws)
        info.update(read_bandwidth_GBs=round(bw, 2), rounds=args.rounds,
                    read_bandwidth_rounds=[round(b, 2) for b in bws],
                    read_bandwidth_by_pages=[{k: round(v, 2) for k, v in d.items()}
                                             for d in bw_pages])
        print(f"# read bandwidth over the rounds: median {bw:.1f} GB/s, "
              f"min {min(bws):.1f}, max {max(bws):.1f}")
    for out, inf in ([] if args.rounds > 1 else shapes):
        for name, (nbytes, ws) in built_methods(out, inf, keep, g):
            extra = EXTRA.get((out, inf)) if not args.quick else None
            bl = batches + (extra[0] if extra and name in extra[1] else [])
            for mb in bl:
                x = torch.randn(mb, inf, generator=g)
                fns = [lambda f=f: f(x) for f in ws]
                t = timeit(fns)
                gbs = nbytes / t / 1e9
                rows.append({"out": out, "in": inf, "batch": mb, "method": name,
                             "us": round(t * 1e6, 2), "weight_bytes": nbytes,
                             "GBs": round(gbs, 2), "pct_bw": round(100 * gbs / bw, 1),
                             "copies": len(ws)})
                print(f"{out:>5}x{inf:<6} {mb:>3} {name:<18} {t * 1e6:>10.1f} {gbs:>7.2f} "
                      f"{100 * gbs / bw:>5.1f}", flush=True)
            del ws
            cpu.clear_cache()
    summary = summarize(rows, bw)
    for line in summary:
        print(line)
    write_json(args.json, {"machine": info, "rows": rows, "summary": summary})
    print(f"wrote {args.json}")


def built_methods(out: int, inf: int, keep, g):
    """Yields ``(name, (weight bytes, callables over the rotating weight copies))`` for the
    methods in ``keep`` (all when None) that run at this shape; one generator step builds
    one method's copies, so a caller that drops them frees the memory before the next."""
    for name, build in methods(out, inf, g, set()).items():
        if keep is not None and name not in keep:
            continue
        try:
            nbytes, f0 = build()
            ws = [f0] + [build()[1] for _ in range(copies(nbytes) - 1)]
            f0(torch.randn(1, inf))
        except (RuntimeError, NotImplementedError) as e:
            print(f"{out}x{inf} {name}: not available ({str(e)[:80]})")
            continue
        yield name, (nbytes, ws)
        del ws, f0  # the caller has dropped them: free before the next method's copies


def interleaved(shapes, batches, keep, rounds: int, g) -> tuple[list[dict], list[float], list[dict]]:
    """Every method of a shape and batch timed once per round, after a read-bandwidth
    measurement of that round; per method the median time and the median of the per-round
    fractions of bandwidth; and per round the read rate by page size."""
    rows, bws = [], []
    bw_pages: list[dict] = []
    for out, inf in shapes:
        built = dict(built_methods(out, inf, keep, g))
        for mb in batches:
            x = torch.randn(mb, inf, generator=g)
            ts = {name: [] for name in built}
            fr = {name: [] for name in built}
            for _ in range(rounds):
                bw = read_bandwidth(reps=3)
                bws.append(bw)
                bw_pages.append(dict(LAST_BW))
                for name, (nbytes, ws) in built.items():
                    t = timeit([lambda f=f: f(x) for f in ws], passes=3)
                    ts[name].append(t)
                    fr[name].append(nbytes / t / 1e9 / bw)
            for name, (nbytes, ws) in built.items():
                t = statistics.median(ts[name])
                pct = 100 * statistics.median(fr[name])
                rows.append({"out": out, "in": inf, "batch": mb, "method": name,
                             "us": round(t * 1e6, 2), "weight_bytes": nbytes,
                             "GBs": round(nbytes / t / 1e9, 2), "pct_bw": round(pct, 1),
                             "pct_bw_rounds": [round(100 * f, 1) for f in fr[name]],
                             "copies": len(ws), "rounds": rounds})
                print(f"{out:>5}x{inf:<6} {mb:>3} {name:<18} {t * 1e6:>10.1f} "
                      f"{nbytes / t / 1e9:>7.2f} {pct:>5.1f}", flush=True)
        built.clear()
        cpu.clear_cache()
    return rows, bws, bw_pages


def compare_w2(shapes, batches, g, bw: float, info: dict, path: str, rounds: int = 7) -> None:
    """W2 g64: the lut kernel vs the int8 path on the same weights, alternating pass by pass
    so that load changes on a shared machine hit both alike; median over ``rounds``."""
    rows = []
    print(f"{'shape':>12} {'M':>3} {'lut us':>9} {'int8 us':>9} {'int8/lut':>8} {'lut %BW':>8}")
    for out, inf in shapes:
        ws = []
        nbytes = rand_dense(out, inf, 2, 64, g)["bytes"]
        for _ in range(copies(nbytes)):
            ws.append(rand_dense(out, inf, 2, 64, g))
        for mb in batches:
            x = torch.randn(mb, inf, generator=g)
            fns = {mode: [lambda w=w, mode=mode: cpu.dense_qmm_cpu(
                x, w["qweight"], w["scales"], w["zeros"], None, 2, 64, inf, mode=mode)
                for w in ws] for mode in ("lut", "int8")}
            res = {"lut": [], "int8": []}
            for _ in range(rounds):
                for mode in ("lut", "int8"):
                    res[mode].append(timeit(fns[mode], min_time=0.05, passes=1))
            tl, ti = statistics.median(res["lut"]), statistics.median(res["int8"])
            gbs = nbytes / tl / 1e9
            rows.append({"out": out, "in": inf, "batch": mb, "lut_us": round(tl * 1e6, 2),
                         "int8_us": round(ti * 1e6, 2), "speedup": round(ti / tl, 3),
                         "lut_GBs": round(gbs, 2), "lut_pct_bw": round(100 * gbs / bw, 1)})
            print(f"{out:>5}x{inf:<6} {mb:>3} {tl * 1e6:>9.1f} {ti * 1e6:>9.1f} {ti / tl:>8.2f} "
                  f"{100 * gbs / bw:>8.1f}", flush=True)
        cpu.clear_cache()
    write_json(path, {"machine": info, "rows": rows})
    print(f"wrote {path}")


def summarize(rows: list[dict], bw: float) -> list[str]:
    def t(out, inf, mb, name):
        for r in rows:
            if (r["out"], r["in"], r["batch"], r["method"]) == (out, inf, mb, name):
                return r
        return None

    lines = ["# targets (4096x4096 unless noted; same-run ratios)"]
    for shape in ((4096, 4096), (11008, 4096), (4096, 11008)):
        r2 = t(*shape, 1, "bp W2 g64")
        r4 = t(*shape, 1, "bp W4 g128")
        if r2 and r4:
            lines.append(f"{shape[0]}x{shape[1]} M=1: W2 g64 {r2['GBs']:.1f} GB/s "
                         f"({r2['pct_bw']:.0f}% BW), W4 g128 {r4['GBs']:.1f} GB/s "
                         f"({r4['pct_bw']:.0f}% BW)")
    for r in rows:
        if r["method"] == "bp W2 g64":
            old = t(r["out"], r["in"], r["batch"], "bp W2 g64 int8")
            if old:
                lines.append(f"{r['out']}x{r['in']} M={r['batch']}: W2 g64 lut {r['us']:.0f} us "
                             f"vs int8 path {old['us']:.0f} us = {old['us'] / r['us']:.2f}x")
    r = t(4096, 4096, 1, "bp W2 g64")
    f16 = t(4096, 4096, 1, "torch fp16")
    if r:
        lines.append(f"W2 g64 GEMV: {r['GBs']:.1f} GB/s = {r['pct_bw']:.0f}% of read bandwidth "
                     f"(target >= 80%)")
    if r and f16:
        lines.append(f"W2 g64 GEMV vs torch fp16: {f16['us'] / r['us']:.1f}x (target >= 5x)")
    for shape in ((4096, 4096), (11008, 4096), (4096, 11008)):
        w4 = t(*shape, 1, "bp W4 g128")
        i4 = t(*shape, 1, "torch int4 g128")
        if w4 and i4:
            lines.append(f"{shape[0]}x{shape[1]} W4 g128 M=1 vs torch int4: "
                         f"{i4['us'] / w4['us']:.2f}x (target >= 1.5x)")
        for mb in (16, 64):
            w4 = t(*shape, mb, "bp W4 g128")
            b16 = t(*shape, mb, "torch bf16")
            f32 = t(*shape, mb, "torch fp32")
            if w4 and b16:
                lines.append(f"{shape[0]}x{shape[1]} W4 g128 M={mb} vs torch bf16: "
                             f"{b16['us'] / w4['us']:.2f}x (target >= 1.2x); vs fp32: "
                             f"{f32['us'] / w4['us']:.2f}x")
        for mb in (128, 512):
            w4 = t(*shape, mb, "bp W4 g128")
            f32 = t(*shape, mb, "torch fp32")
            b16 = t(*shape, mb, "torch bf16")
            if w4 and f32 and b16:
                lines.append(f"{shape[0]}x{shape[1]} W4 g128 M={mb}: vs torch fp32 "
                             f"{f32['us'] / w4['us']:.2f}x, vs bf16 {b16['us'] / w4['us']:.2f}x")
        for mb in (1, 4, 16, 64):
            sp = t(*shape, mb, "bp W4 g128 S50")
            w4 = t(*shape, mb, "bp W4 g128")
            if sp and w4:
                lines.append(f"{shape[0]}x{shape[1]} sparse W4 S50 M={mb} vs dense W4: "
                             f"{w4['us'] / sp['us']:.2f}x (target >= 1.6x)")
    return lines


if __name__ == "__main__":
    main()
