"""Hand-written CUDA GEMV (``bitpress/csrc/cuda/qgemv.cu``) for W2 / W4 dense weights, compiled at run
time with NVRTC through CuPy's ``RawModule`` (no build step; setup.py does not build it).

Importing this module registers ``cuda_raw`` (priority 5, below Triton's 20) for
``bitpress::dense_qmm`` on device type ``cuda`` when CuPy and a CUDA device are present;
select it with ``use_impl("cuda_raw")`` or ``BITPRESS_KERNEL=cuda_raw``. It reads the
canonical layout directly (no repack) and handles batches of up to :data:`MAX_M` rows
of x (one grid row per row of x), bits 2 and 4, group sizes that are a multiple of the
codes per word (16 for W2, 8 for W4) or per-channel. Without CuPy or a GPU, importing raises
``ImportError`` (the guarded import in ``bitpress.kernels`` then skips it).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..formats.packing import packed_words
from .ops import register_impl
from .sources import cuda_source_path, read_cuda_source

MAX_M = 8
_KIND = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
ROWS_PER_BLOCK = 8  # warps per 256-thread block, one output row each


def source_path() -> str:
    # package data (bitpress/csrc/cuda/), so a non-editable install finds it too
    return cuda_source_path("qgemv.cu")


@functools.lru_cache(maxsize=None)
def _module(device_index: int):
    import cupy

    src = read_cuda_source("qgemv.cu")
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=src, options=("--std=c++14",))


def _kernel(bits: int, xt: int, st: int, device_index: int):
    return _module(device_index).get_function(f"bitpress_qgemv_w{bits}_x{xt}_s{st}")


def supports(x, qweight, scales, zeros, bias, bits, group_size, in_features) -> bool:
    pf = 32 // bits if bits in (2, 4) else 0
    return (bits in (2, 4) and x.device.type == "cuda" and x.dtype in _KIND
            and all(t.device == x.device for t in (qweight, scales, zeros))
            and (bias is None or bias.device == x.device)
            and x.reshape(-1, in_features).shape[0] <= MAX_M
            and qweight.dtype == torch.int32 and qweight.dim() == 2
            and qweight.shape[1] == packed_words(in_features, bits)
            and scales.dtype in _KIND and zeros.dtype == scales.dtype
            and (group_size >= in_features or group_size % pf == 0))


def cuda_raw_dense_qmm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
                       group_size: int, in_features: int) -> torch.Tensor:
    """``bitpress::dense_qmm`` by the hand-written CUDA GEMV (see module docstring)."""
    import cupy

    if not supports(x, qweight, scales, zeros, bias, bits, group_size, in_features):
        raise ValueError("cuda_raw_dense_qmm: needs CUDA tensors, bits 2/4, <= "
                         f"{MAX_M} rows of x, group size a multiple of {32 // max(bits, 1)} "
                         "or per-channel, scales and zeros of one float dtype")
    out = qweight.shape[0]
    ng = (in_features + group_size - 1) // group_size
    x2 = x.reshape(-1, in_features).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, out, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], out)
    qw, sc, zr = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    b = bias.reshape(-1).to(x.dtype).contiguous() if bias is not None else None
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    fn = _kernel(bits, _KIND[x.dtype], _KIND[sc.dtype], dev)
    grid = ((out + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK, m, 1)
    ptr = lambda t: cupy.uint64(t.data_ptr()) if t is not None else cupy.uint64(0)  # noqa: E731
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream)
    with cupy.cuda.Device(dev), stream:
        fn(grid, (32 * ROWS_PER_BLOCK, 1, 1),
           (ptr(qw), ptr(sc), ptr(zr), ptr(x2), ptr(b), ptr(y), cupy.int32(out),
            cupy.int32(in_features), cupy.int32(qw.shape[1]), cupy.int32(group_size),
            cupy.int32(ng)))
    return y.reshape(*x.shape[:-1], out)


def _register() -> None:
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        raise ImportError("cupy is not installed (pip install cupy-cuda12x)") from e
    if not torch.cuda.is_available():
        raise ImportError("no CUDA device")
    read_cuda_source("qgemv.cu")  # a missing source says so here, not at the first call
    register_impl("dense_qmm", "cuda", "cuda_raw", cuda_raw_dense_qmm, 5, supports)


_register()
