"""Triton GPU kernels of ``bitpress::dense_qmm`` and ``bitpress::sparse_qmm``.

Importing this package registers ``triton`` (priority 20) for device type ``cuda`` when
Triton imports and a CUDA device is available; otherwise it registers nothing and the kernels
are not even compiled. The kernels themselves (``triton.jit``) live in :mod:`.kernels` and are
imported lazily, so ``TRITON_INTERPRET`` is read at first use: tests set it to ``1`` first
and call :func:`triton_dense_qmm` / :func:`triton_sparse_qmm` on CPU tensors.

The same registration step imports :mod:`bitpress.kernels.cuda_raw` (the CuPy-loaded
hand-written CUDA GEMV, priority 5) when CuPy is present.

Variants reachable by name through :func:`bitpress.kernels.use_impl`:
``triton`` (auto), ``triton_sparse_row`` (sparse: row split instead of the task split).
"""
from __future__ import annotations

import importlib.util
from typing import Any, Optional

import torch

from ...formats.packing import packed_words
from ..ops import register_impl

__all__ = ["available", "triton_dense_qmm", "triton_sparse_qmm", "dense_supports",
           "sparse_supports", "clear_cache"]


def available() -> bool:
    """Triton is importable (a GPU is not required: the interpreter runs on CPU)."""
    return importlib.util.find_spec("triton") is not None


def triton_dense_qmm(*args: Any, **kwargs: Any) -> torch.Tensor:
    from .api import triton_dense_qmm as f
    return f(*args, **kwargs)


def triton_sparse_qmm(*args: Any, **kwargs: Any) -> torch.Tensor:
    from .api import triton_sparse_qmm as f
    return f(*args, **kwargs)


def clear_cache() -> None:
    from . import repack
    repack.clear_cache()


def _on_cuda(*ts: Optional[torch.Tensor]) -> bool:
    return all(t is None or t.device.type == "cuda" for t in ts)


def dense_supports(x, qweight, scales, zeros, bias, bits, group_size, in_features) -> bool:
    return (bits in (2, 3, 4) and _on_cuda(x, qweight, scales, zeros, bias)
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and qweight.dtype == torch.int32 and qweight.dim() == 2
            and qweight.shape[1] == packed_words(in_features, bits)
            and scales.is_floating_point() and zeros.is_floating_point() and in_features > 0)


def sparse_supports(x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, group_size,
                    in_features) -> bool:
    return (bits in (2, 3, 4) and _on_cuda(x, row_ptr, col_idx, qvalues, scales, zeros, bias)
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and row_ptr.dtype == torch.int32 and col_idx.dtype == torch.int32
            and qvalues.dtype == torch.int32 and qvalues.dim() == 2
            and qvalues.shape[1] == packed_words(group_size, bits)
            and 1 <= group_size <= 1024
            and scales.is_floating_point() and zeros.is_floating_point() and in_features > 0)


def _sparse_row(x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, group_size,
                in_features):
    return triton_sparse_qmm(x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits,
                             group_size, in_features, split="row")


def _register() -> bool:
    if not torch.cuda.is_available():
        return False
    try:  # the hand-written CUDA GEMV (CuPy/NVRTC), lower priority than Triton
        from .. import cuda_raw  # noqa: F401
    except ImportError:
        pass
    if not available():
        return False
    register_impl("dense_qmm", "cuda", "triton", triton_dense_qmm, 20, dense_supports)
    register_impl("sparse_qmm", "cuda", "triton", triton_sparse_qmm, 20, sparse_supports)
    register_impl("sparse_qmm", "cuda", "triton_sparse_row", _sparse_row, 15, sparse_supports)
    return True


REGISTERED = _register()
