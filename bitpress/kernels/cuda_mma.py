"""The tensor-core CUDA kernels (``bitpress/csrc/cuda/qmma.cu``) behind launch plans bound once
per weight.

**Compilation.** NVRTC through CuPy's ``RawModule`` (without CuPy: the same source through
NVRTC or nvcc into a disk-cached cubin, launched with ctypes, :mod:`.cuda_driver`): the
``.cu`` ships as package data, each
entry point a process uses is compiled from the source plus one instantiation line (a few
hundred ms), and CuPy's on-disk kernel cache (``~/.cupy/kernel_cache``, keyed by source,
options and GPU architecture) makes every later process load the cubin instead of compiling:
compiled once per machine, never per process. Chosen over torch's ``cpp_extension`` build
because that needs nvcc and a host compiler matching torch's ABI on the user's machine at
install or first use, and couples the build to one torch version; NVRTC needs only the
driver and the ``cupy-cuda12x`` wheel (the ``gpu`` extra).

**Launch plans.** :func:`dense_plan` / :func:`sparse_plan` bind, once: the fragment-ordered
repack (:mod:`.gpu_layout`, cached per weight), the fp32 bias, the stream-K grid (from the SM
count read once here), the workspace and the tile counters (zeroed once; the kernel re-zeroes
them), and the compiled functions. The returned ``fast(x)`` does per call only a shape /
dtype / version check, one ``torch.empty`` for y and one launch: no device-property query,
no memset, no cast, no copy. It returns ``None`` for calls it does not take (fp32 x, more than
:data:`MAX_M` rows, non-contiguous x), which then go through the op's other kernels.
The workspace grows (at most 4 times per plan) the first time a larger batch bucket arrives:
run each batch size once before capturing a CUDA graph.

Importing this module registers ``cuda_mma`` (priority 30, above Triton) for
``bitpress::dense_qmm`` and ``bitpress::sparse_qmm`` on ``cuda`` when a GPU and CuPy (or NVRTC
/ nvcc) exist;
on a machine without them it registers nothing (the plans still run against a stub launcher,
which is how the host path is tested on CPU).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import gpu_layout as L
from .gpu_emulate import Schedule, dense_schedule
from .ops import register_impl
from .sources import cuda_source_path, read_cuda_source

log = logging.getLogger(__name__)

MAX_M = 64
THREADS = 256
XKIND = {torch.float16: 0, torch.bfloat16: 1}
# batch rows -> n8 tiles of the kernel variant (1, 2, 4 or 8)
NT_OF = [0] + [1] * 8 + [2] * 8 + [4] * 16 + [8] * 32
M_I32 = [np.int32(m) for m in range(MAX_M + 1)]


def source_path() -> str:
    return cuda_source_path("qmma.cu")


@functools.lru_cache(maxsize=1)
def _source() -> str:
    return read_cuda_source("qmma.cu")


def entry_name(kind: str, bits: int, xk: int, sk: int, nt: int) -> str:
    mid = "_sparse" if kind == "sparse" else ""
    return f"bitpress_qmma{mid}_w{bits}_x{xk}_s{sk}_n{nt}"


def variant_source(kind: str, bits: int, xk: int, sk: int, nt: int) -> str:
    """The source NVRTC compiles for one entry point: qmma.cu without its instantiations plus
    the one line that instantiates this entry point."""
    macro = "BP_SPARSE" if kind == "sparse" else "BP_DENSE"
    return f"#define BITPRESS_QMMA_ONLY\n{_source()}\n{macro}({bits}, {xk}, {sk}, {nt})\n"


@functools.lru_cache(maxsize=None)
def cupy_function(device_index: int, kind: str, bits: int, xk: int, sk: int, nt: int):
    """The compiled entry point (CuPy ``Function``); compiled by NVRTC on first use on this
    machine, loaded from CuPy's disk cache afterwards."""
    import cupy

    with cupy.cuda.Device(device_index):
        mod = cupy.RawModule(code=variant_source(kind, bits, xk, sk, nt),
                             options=("--std=c++17",))
        return mod.get_function(entry_name(kind, bits, xk, sk, nt))


PARAM_TYPES = {"dense": "p" * 8 + "i" * 6, "sparse": "p" * 11 + "i" * 7}


def backend() -> str:
    """``"cupy"`` (NVRTC through CuPy) when CuPy imports, else ``"driver"`` (NVRTC/nvcc cubin
    on disk + ctypes ``cuLaunchKernel``, :mod:`.cuda_driver`); ``BITPRESS_CUDA_LOADER``
    forces one."""
    forced = os.environ.get("BITPRESS_CUDA_LOADER")
    if forced in ("cupy", "driver"):
        return forced
    return "cupy" if importlib.util.find_spec("cupy") is not None else "driver"


@functools.lru_cache(maxsize=None)
def driver_function(device_index: int, kind: str, bits: int, xk: int, sk: int, nt: int):
    """The entry point loaded through the CUDA driver (cubin cached on disk)."""
    from . import cuda_driver
    major, minor = torch.cuda.get_device_capability(device_index)
    with torch.cuda.device(device_index):
        image = cuda_driver.cubin(variant_source(kind, bits, xk, sk, nt), f"sm_{major}{minor}")
        return cuda_driver.DriverFunction(image, entry_name(kind, bits, xk, sk, nt),
                                          PARAM_TYPES[kind])


def driver_launcher(device: torch.device) -> Callable[[Any, int, tuple], None]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    raw_stream = torch._C._cuda_getCurrentRawStream

    def launch(fn, grid: int, args: tuple) -> None:
        fn(grid, THREADS, args, raw_stream(idx))

    return launch


def _defaults(dev: torch.device, launcher, loader):
    """The launcher and loader of the active backend (what a plan binds)."""
    be = backend() if launcher is None or loader is None else None
    if launcher is None:
        launcher = cupy_launcher(dev) if be == "cupy" else driver_launcher(dev)
    if loader is None:
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        loader = functools.partial(cupy_function if be == "cupy" else driver_function, idx)
    return launcher, loader


class _RawStream:
    """What CuPy's ``Function.__call__`` reads from a stream: ``.ptr``."""
    __slots__ = ("ptr",)

    def __init__(self) -> None:
        self.ptr = 0


def cupy_launcher(device: torch.device) -> Callable[[Any, int, tuple], None]:
    """``launch(fn, grid, args)`` on torch's current stream of ``device`` (read per call, so
    CUDA-graph capture and user streams work)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    raw_stream = torch._C._cuda_getCurrentRawStream
    s = _RawStream()
    block = (THREADS, 1, 1)

    def launch(fn, grid: int, args: tuple) -> None:
        s.ptr = raw_stream(idx)
        fn((grid, 1, 1), block, args, stream=s)

    return launch


def _ptr(t: Optional[torch.Tensor]) -> int:
    """A device pointer argument: a Python int (CuPy passes ints as 64-bit values)."""
    return 0 if t is None else t.data_ptr()


def _versions(ts) -> Callable[[], bool]:
    ts = [t for t in ts if t is not None]
    if any(t.is_inference() for t in ts):
        return lambda: False
    tv = tuple((t, t._version) for t in ts)

    def changed() -> bool:
        for t, v in tv:
            if t._version != v:
                return True
        return False

    return changed


def _sz_kind(dtype: torch.dtype) -> int:
    return 0 if dtype == torch.float16 else 1


# ---- dense ---------------------------------------------------------------------------------------
def dense_supports(x, qweight, scales, zeros, bias, bits, group_size, in_features) -> bool:
    return (bits in (2, 3, 4) and x.device.type == "cuda" and x.dtype in XKIND
            and in_features % 4 == 0 and L.supports_group_size(group_size, in_features)
            and x.numel() // max(in_features, 1) <= MAX_M
            and qweight.dtype == torch.int32 and qweight.dim() == 2
            and all(t.device == x.device for t in (qweight, scales, zeros))
            and (bias is None or bias.device == x.device)
            and scales.is_floating_point() and zeros.is_floating_point())


def dense_plan(args: tuple, *, n_sm: Optional[int] = None, launcher=None, loader=None,
               ctas_per_sm: int = 2):
    """Bind a dense weight (the op's arguments; x is only a sample) and return ``fast(x)``
    (see the module docstring), or ``None`` when the weight is not for this kernel.

    ``n_sm``, ``launcher(fn, grid, args)`` and ``loader(kind, bits, xk, sk, nt)`` default to
    the current GPU's SM count, a CuPy launch on torch's current stream and the NVRTC-compiled
    entry point; the CPU tests pass stubs."""
    x, qweight, scales, zeros, bias, bits, gs, k = args
    if bits not in (2, 3, 4) or k % 4 or not L.supports_group_size(gs, k):
        return None
    p = L.dense_gpu_cached(qweight, scales, zeros, bits, gs, k)
    return dense_plan_from_layout(p, bias, watch=(qweight, scales, zeros, bias), n_sm=n_sm,
                                  launcher=launcher, loader=loader, ctas_per_sm=ctas_per_sm)


def _bound_call(kind: str, bits: int, sk: int, k: int, n: int, dev, grid: int, ws_rows: int,
                head: tuple, tail: tuple, tail2: tuple, changed, b32, counters, launcher,
                loader):
    """``fast(x)`` of a plan: the launch of the ``kind`` ("dense" / "sparse") entry point for
    x's dtype and batch bucket (compiled at first use), with the weight's arguments bound;
    ``None`` for an x it does not take or after an in-place change of a watched tensor.
    ``fast.state`` holds the split-K workspace (``ws_rows`` rows per CTA per 8 batch rows)."""
    state: dict = {"ws": None, "mp": 0}
    fns: dict = {}
    empty, kinds, nt_of, m32 = torch.empty, XKIND, NT_OF, M_I32
    bptr, cptr = _ptr(b32), _ptr(counters)

    def grow(mp: int) -> None:   # at most once per batch bucket over the plan's life
        state["ws"] = torch.empty(grid * 2 * ws_rows * mp, dtype=torch.float32, device=dev)
        state["mp"] = mp
        state["wsp"] = _ptr(state["ws"])

    def fast(x: torch.Tensor) -> Optional[torch.Tensor]:
        xk = kinds.get(x.dtype)
        if xk is None or x.shape[-1] != k or x.device != dev or not x.is_contiguous() \
                or x.data_ptr() & 7 or changed():
            return None
        m = x.numel() // k
        if m > MAX_M or m == 0:
            return None
        nt = nt_of[m]
        fn = fns.get((xk, nt))
        if fn is None:
            fn = fns[(xk, nt)] = loader(kind, bits, xk, sk, nt)
        if state["mp"] < 8 * nt:
            grow(8 * nt)
        y = empty(*x.shape[:-1], n, dtype=x.dtype, device=dev)
        launcher(fn, grid, head + (x.data_ptr(), bptr, y.data_ptr(), state["wsp"], cptr)
                 + tail + (m32[m],) + tail2)
        return y

    fast.state = state
    return fast


def dense_plan_from_layout(p: L.GpuDense, bias: Optional[torch.Tensor], *, watch=(),
                           n_sm: Optional[int] = None, launcher=None, loader=None,
                           ctas_per_sm: int = 2):
    """:func:`dense_plan` on an already repacked weight (``watch``: tensors whose in-place
    update makes ``fast`` decline)."""
    bits, gs, k = p.bits, p.gs, p.k
    dev = p.qw.device
    if n_sm is None:
        n_sm = torch.cuda.get_device_properties(dev).multi_processor_count
    unit_bytes = 512 + (256 if bits == 3 else 0)
    sch = dense_schedule(p.n_tiles, p.n_chunks, n_sm, ctas_per_sm, unit_bytes)
    launcher, loader = _defaults(dev, launcher, loader)
    b32 = None if bias is None else bias.detach().reshape(-1).float().contiguous()
    counters = torch.zeros(p.n_tiles, dtype=torch.int32, device=dev)
    n, sk = p.n, _sz_kind(p.sz.dtype)
    gsteps = np.int32(gs // 16 if gs < k else 1 << 30)
    head = (_ptr(p.qw), _ptr(p.q1), _ptr(p.sz))
    tail = (np.int32(n), np.int32(k))
    tail2 = (gsteps, np.int32(p.n_groups), np.int32(p.n_chunks))
    fast = _bound_call("dense", bits, sk, k, n, dev, sch.ctas, 16, head, tail, tail2,
                       _versions(watch), b32, counters, launcher, loader)
    fast.keep = (p, b32, counters, fast.state)   # the bound buffers live as long as the plan
    fast.layout = p
    fast.schedule = sch
    return fast


# ---- group-sparse -----------------------------------------------------------------------------
def sparse_supports(x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, group_size,
                    in_features) -> bool:
    return (bits in (2, 3, 4) and x.device.type == "cuda" and x.dtype in XKIND
            and in_features % 4 == 0 and group_size % 16 == 0
            and x.numel() // max(in_features, 1) <= MAX_M
            and all(t.dtype == torch.int32 for t in (row_ptr, col_idx, qvalues))
            and all(t.device == x.device for t in (row_ptr, col_idx, qvalues, scales, zeros))
            and (bias is None or bias.device == x.device)
            and scales.is_floating_point() and zeros.is_floating_point())


def sparse_schedule(n_tiles: int, n_sm: int, ctas_per_sm: int = 2, tile_bytes: int = 512,
                    min_bytes_per_cta: int = 16384) -> Schedule:
    by_bytes = max(1, n_tiles * tile_bytes // min_bytes_per_cta)
    return Schedule(max(n_tiles, 1), max(1, min(max(n_tiles, 1), ctas_per_sm * n_sm,
                                                 by_bytes)))


def sparse_plan(args: tuple, *, n_sm: Optional[int] = None, launcher=None, loader=None,
                ctas_per_sm: int = 2):
    """As :func:`dense_plan` for a group-sparse (BSR) weight."""
    x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, gs, k = args
    if bits not in (2, 3, 4) or k % 4 or gs % 16:
        return None
    p = L.sparse_gpu_cached(row_ptr, col_idx, qvalues, scales, zeros, bits, gs, k)
    return sparse_plan_from_layout(p, bias, watch=(row_ptr, col_idx, qvalues, scales, zeros,
                                                   bias), n_sm=n_sm, launcher=launcher,
                                   loader=loader, ctas_per_sm=ctas_per_sm)


def sparse_plan_from_layout(p: L.GpuSparse, bias: Optional[torch.Tensor], *, watch=(),
                            n_sm: Optional[int] = None, launcher=None, loader=None,
                            ctas_per_sm: int = 2):
    """:func:`sparse_plan` on an already repacked weight."""
    bits, gs, k = p.bits, p.gs, p.k
    dev = p.qw.device
    if n_sm is None:
        n_sm = torch.cuda.get_device_properties(dev).multi_processor_count
    n_chunks = p.qw.shape[1]
    sch = sparse_schedule(p.n_tiles, n_sm, ctas_per_sm, 512 * n_chunks)
    launcher, loader = _defaults(dev, launcher, loader)
    b32 = None if bias is None else bias.detach().reshape(-1).float().contiguous()
    n_blocks = p.block_ptr.numel() - 1
    counters = torch.zeros(max(n_blocks, 1), dtype=torch.int32, device=dev)
    sk = _sz_kind(p.sz.dtype)
    head = (_ptr(p.qw), _ptr(p.q1), _ptr(p.sz), _ptr(p.rows), _ptr(p.cols), _ptr(p.block_ptr))
    tail = (np.int32(p.n), np.int32(k))
    tail2 = (np.int32(gs), np.int32(n_chunks), np.int32(p.n_tiles), np.int32(n_blocks))
    fast = _bound_call("sparse", bits, sk, k, p.n, dev, sch.ctas, L.SPARSE_ROW_BLOCK, head,
                       tail, tail2, _versions(watch), b32, counters, launcher, loader)
    fast.keep = (p, b32, counters, fast.state)
    fast.layout = p
    fast.schedule = sch
    return fast


# ---- op implementations (a plan per weight, cached with the repack) ---------------------------
def _cached_plan(kind: str, args: tuple, owner: torch.Tensor, bias):
    """One plan per (weight, bias), kept in the repack cache (dies with the weight)."""
    from .repack_cache import tensor_sig
    ts = [a for a in args[1:] if isinstance(a, torch.Tensor)]
    sig = tuple(tensor_sig(t) for t in ts) + (None if bias is None else tensor_sig(bias),)
    build = lambda: (dense_plan if kind == "dense" else sparse_plan)(args)  # noqa: E731
    return L._cache().get(owner, sig, build, ("plan", kind, id(bias)))


def _fallback(op: str, args: tuple):
    """A call the tensor-core kernel does not take (e.g. more than 64 rows of x, which a module
    that first saw a small batch still routes here): the next registered CUDA kernel that
    accepts it (Triton), else the reference."""
    from . import ops, reference
    for impl in ops._REGISTRY.get((op, "cuda"), []):
        if impl.name != "cuda_mma" and (impl.supports is None or impl.supports(*args)):
            return impl.fn(*args)
    return getattr(reference, f"{op}_ref")(*args)


def cuda_mma_dense_qmm(x, qweight, scales, zeros, bias, bits, group_size, in_features):
    """``bitpress::dense_qmm`` on the tensor-core kernel (fp16/bf16 x, at most 64 rows; other
    calls go to the next CUDA kernel)."""
    args = (x, qweight, scales, zeros, bias, bits, group_size, in_features)
    fast = _cached_plan("dense", args, qweight, bias)
    y = fast(x.contiguous()) if fast is not None else None
    return y if y is not None else _fallback("dense_qmm", args)


def cuda_mma_sparse_qmm(x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, group_size,
                        in_features):
    args = (x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, group_size, in_features)
    fast = _cached_plan("sparse", args, qvalues, bias)
    y = fast(x.contiguous()) if fast is not None else None
    return y if y is not None else _fallback("sparse_qmm", args)


# what modules bind (bitpress.nn.modules._run): one cached plan per (weight, bias), so a call the
# plan declines (batch > 64) and that comes back through the module's slow path re-uses it
cuda_mma_dense_qmm.plan = lambda args: _cached_plan("dense", args, args[1], args[4])
cuda_mma_sparse_qmm.plan = lambda args: _cached_plan("sparse", args, args[3], args[6])


def available() -> bool:
    """A GPU, and a way to compile and launch: CuPy, or NVRTC / nvcc for the driver path."""
    if not torch.cuda.is_available():
        return False
    if backend() == "cupy":
        return True
    from . import cuda_driver
    import shutil
    return cuda_driver._find_nvrtc() is not None or shutil.which("nvcc") is not None


def _register() -> bool:
    if not available():
        return False
    register_impl("dense_qmm", "cuda", "cuda_mma", cuda_mma_dense_qmm, 30, dense_supports)
    register_impl("sparse_qmm", "cuda", "cuda_mma", cuda_mma_sparse_qmm, 30, sparse_supports)
    return True


REGISTERED = _register()
