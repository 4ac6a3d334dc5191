"""What the benchmark scripts share: the machine's description, timers and random packed
weights (import as ``from _common import ...``; bench/ is on ``sys.path`` when a script in
it runs)."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Optional

import torch

#: instruction-set flags worth reporting next to a CPU timing
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_int8")


def _cpuinfo_field(name: str) -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name")."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    """Which of :data:`ISA_FLAGS` the CPU has."""
    flags = (_cpuinfo_field("flags") or "").split()
    return [f for f in ISA_FLAGS if f in flags]


def cpu_info() -> dict:
    """``{"model", "flags", "cores"}`` of this machine."""
    return {"model": cpu_model(), "flags": cpu_flags(), "cores": os.cpu_count()}


def median_time(fn: Callable[[], object], reps: int = 1, rounds: int = 7, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter,
                sync: Optional[Callable[[], object]] = None) -> float:
    """Seconds per call of ``fn``: ``warmup`` calls, then the median over ``rounds`` of the
    mean of ``reps`` calls. ``sync`` (e.g. ``torch.cuda.synchronize``) runs after the
    warm-up and after each round; ``clock=time.process_time`` counts this process's CPU time
    only (on a shared machine wall time also counts other processes' turns)."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    res = []
    for _ in range(rounds):
        t0 = clock()
        for _ in range(reps):
            fn()
        if sync is not None:
            sync()
        res.append((clock() - t0) / reps)
    return statistics.median(res)


def timeit(fns: list[Callable[[], object]], min_time: float = 0.25, passes: int = 5) -> float:
    """Seconds per call: calls cycle through ``fns`` (rotating weight copies, so each call
    reads its weight from memory); the median over ``passes`` of the mean call time of one
    pass of at least ``min_time`` seconds."""
    for f in fns:
        f()
    t = time.perf_counter()
    fns[0]()
    one = max(time.perf_counter() - t, 1e-6)
    if one > 0.2:
        passes = 3
    n = max(len(fns), int(min_time / passes / one))
    n = (n + len(fns) - 1) // len(fns) * len(fns)
    return median_time(lambda: [fns[i % len(fns)]() for i in range(n)], rounds=passes,
                       warmup=0) / n


def _rand_words(rows: int, n: int, bits: int, g: Optional[torch.Generator],
                device: str) -> torch.Tensor:
    """Random canonical packed codes: int32 ``[rows, packed_words(n, bits)]``."""
    from bitpress.formats.packing import packed_words
    w = torch.randint(-2 ** 31, 2 ** 31 - 1, (rows, packed_words(n, bits)), dtype=torch.int32,
                      generator=g, device=device)
    if bits == 3:  # canonical 3-bit words use 30 bits
        w &= (1 << 30) - 1
    return w


def _rand_params(shape: tuple[int, ...], g: Optional[torch.Generator], device: str,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    scales = (torch.rand(*shape, generator=g, device=device) * 0.02 + 0.001).to(dtype)
    zeros = (torch.randn(*shape, generator=g, device=device) * 0.01).to(dtype)
    return scales, zeros


def rand_dense(out: int, inf: int, bits: int, gs: int, g: Optional[torch.Generator] = None,
               device: str = "cpu", dtype: torch.dtype = torch.float16) -> dict:
    """A random dense packed weight (uniform codes, scales/zeros of a typical layer's size):
    ``qweight``, ``scales``, ``zeros`` and ``bytes`` (what a kernel reads for it)."""
    ng = -(-inf // gs)
    qw = _rand_words(out, inf, bits, g, device)
    sc, zr = _rand_params((out, ng), g, device, dtype)
    return {"qweight": qw, "scales": sc, "zeros": zr,
            "bytes": qw.numel() * 4 + (sc.numel() + zr.numel()) * sc.element_size()}


def rand_bsr(out: int, inf: int, bits: int, gs: int, sparsity: float = 0.5,
             g: Optional[torch.Generator] = None, device: str = "cpu", skew: bool = False,
             dtype: torch.dtype = torch.float16) -> dict:
    """A random block-sparse-row weight (each group kept with probability ``1 − sparsity``;
    ``skew``: a tenth of the rows keep 90 % of their groups, the rest fewer, same total):
    ``row_ptr``, ``col_idx``, ``qvalues``, ``scales``, ``zeros`` and ``bytes``."""
    ng = -(-inf // gs)
    p = torch.full((out, 1), 1.0 - sparsity, device=device)
    if skew:
        p[: out // 10] = 0.9
        p[out // 10:] = ((1.0 - sparsity) * out - 0.9 * (out // 10)) / (out - out // 10)
    keep = torch.rand(out, ng, generator=g, device=device) < p
    cols = keep.nonzero(as_tuple=True)[1]
    row_ptr = torch.zeros(out + 1, dtype=torch.int32, device=device)
    row_ptr[1:] = keep.sum(1).cumsum(0).to(torch.int32)
    nnz = cols.numel()
    qv = _rand_words(nnz, gs, bits, g, device)
    sc, zr = _rand_params((nnz,), g, device, dtype)
    return {"row_ptr": row_ptr, "col_idx": cols.to(torch.int32).contiguous(), "qvalues": qv,
            "scales": sc, "zeros": zr,
            "bytes": qv.numel() * 4 + nnz * (2 * sc.element_size() + 4) + (out + 1) * 4}


def write_json(path: str, obj: object, indent: int = 1, **kwargs: object) -> None:
    """Write a benchmark's JSON record to ``path``, creating its folder."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent, **kwargs)
