"""The kernels' own weight layouts, built once per weight and cached (shared mechanism:
:mod:`bitpress.kernels.repack_cache`), and the validation done when a weight is repacked."""
from __future__ import annotations

import os

import torch

from ..repack_cache import RepackCache, tensor_sig
from . import config as _cfg
from . import hugebuf
from .config import _C, _PKIND
from .support import dense_supports, sparse_supports

_CACHE = RepackCache()


def clear_cache() -> None:
    _CACHE.clear()
    hugebuf.reset()
    _cfg.bump()


_sig = tensor_sig


def _params(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    if scales.dtype == zeros.dtype and scales.dtype in _PKIND:
        return scales.contiguous(), zeros.contiguous(), _PKIND[scales.dtype]
    return scales.float().contiguous(), zeros.float().contiguous(), _PKIND[torch.float32]


def _cached(owner: torch.Tensor, sig: tuple, build, layout: int = 0):
    return _CACHE.get(owner, sig, build, layout)


def _check_dense(qweight, scales, zeros, bits: int, gs: int, in_features: int) -> None:
    probe = torch.empty(0, in_features)
    if not dense_supports(probe, qweight, scales, zeros, None, bits, gs, in_features):
        raise ValueError("dense_qmm_cpu: unsupported weight (bits 2/3/4/8, int32 qweight "
                         "[out, ceil(in/pf)], group size a multiple of 16 up to 256 or "
                         "per-channel, CPU tensors)")
    out = qweight.shape[0]
    ng = (in_features + gs - 1) // gs
    if tuple(scales.shape) != (out, ng) or tuple(zeros.shape) != (out, ng):
        raise ValueError(f"scales/zeros must be {(out, ng)}, got {tuple(scales.shape)} / "
                         f"{tuple(zeros.shape)}")


def _dense_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                  gs: int, in_features: int, layout: int = 0) -> tuple[torch.Tensor, int]:
    sig = (_sig(qweight), _sig(scales), _sig(zeros), bits, gs, in_features)

    def build():
        _check_dense(qweight, scales, zeros, bits, gs, in_features)
        out = qweight.shape[0]
        qw = qweight.contiguous()
        sc, zr, pk = _params(scales, zeros)
        buf = hugebuf.empty(_C.qmm_dense_packed_bytes(out, in_features, bits, gs, pk))
        _C.qmm_repack_dense(qw.data_ptr(), out, qw.shape[1], in_features, bits, gs,
                            sc.data_ptr(), zr.data_ptr(), pk, buf.data_ptr(),
                            torch.get_num_threads(), layout)
        return buf, pk

    return _cached(qweight, sig, build, layout)


def _check_sparse(row_ptr, col_idx, qvalues, scales, zeros, bits: int, gs: int,
                  in_features: int) -> None:
    probe = torch.empty(0, in_features)
    if not sparse_supports(probe, row_ptr, col_idx, qvalues, scales, zeros, None, bits, gs,
                           in_features):
        raise ValueError("sparse_qmm_cpu: unsupported weight (bits 2/3/4, int32 BSR tensors, "
                         "group size a multiple of 16 up to 256, CPU tensors)")
    if qvalues.shape[0] != col_idx.numel() or scales.numel() != col_idx.numel() \
            or zeros.numel() != col_idx.numel():
        raise ValueError("sparse_qmm_cpu: qvalues/scales/zeros need one entry per kept group")
    ng = (in_features + gs - 1) // gs
    nnz = col_idx.numel()
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz or bool((row_ptr[1:] < row_ptr[:-1]).any()):
        raise ValueError("sparse_qmm: row_ptr must start at 0, not decrease and end at nnz")
    if nnz and (int(col_idx.min()) < 0 or int(col_idx.max()) >= ng):
        raise ValueError(f"sparse_qmm: col_idx out of range [0, {ng})")


_SPARSE_LAYOUTS = {"auto": None, "streams": 0, "tiles": 1}


def sparse_layout(bits: int) -> int:
    """The runtime layout a group-sparse weight is repacked into (csrc/cpu/qmm.h): 1, row
    tiles (16-32 rows per tile, a column group's kept rows in the lanes of a vector, int8 dot
    products; 2- and 4-bit weights), where the AVX-512 kernels run, else 0, row streams. ``BITPRESS_SPARSE_LAYOUT=streams|tiles``
    forces one (``tiles`` on another ISA runs the portable scalar kernel: for tests)."""
    forced = _SPARSE_LAYOUTS.get(os.environ.get("BITPRESS_SPARSE_LAYOUT", "auto"), "bad")
    if forced == "bad":
        raise ValueError("BITPRESS_SPARSE_LAYOUT must be 'auto', 'streams' or 'tiles', got "
                         f"{os.environ['BITPRESS_SPARSE_LAYOUT']!r}")
    if bits not in (2, 4):
        return 0
    if forced is not None:
        return forced
    return 1 if _cfg._isa == "avx512" else 0


def _tile_rows() -> int:
    """Rows per tile of the row-tile layout: 0, the default, picks 16, 24 or 32 for each
    weight's masks (csrc/cpu/qmm.cpp, repack_sparse_tiles); ``BITPRESS_SPARSE_TILE_ROWS`` =
    16, 24 or 32 forces one (tests, benchmarks)."""
    v = os.environ.get("BITPRESS_SPARSE_TILE_ROWS", "0")
    if v not in ("0", "16", "24", "32"):
        raise ValueError(f"BITPRESS_SPARSE_TILE_ROWS must be 16, 24 or 32, got {v!r}")
    return int(v)


def _sparse_packed(row_ptr: torch.Tensor, col_idx: torch.Tensor, qvalues: torch.Tensor,
                   scales: torch.Tensor, zeros: torch.Tensor, bits: int, gs: int,
                   in_features: int) -> tuple[torch.Tensor, int, int]:
    sig = (_sig(row_ptr), _sig(col_idx), _sig(qvalues), _sig(scales), _sig(zeros), bits, gs,
           in_features)
    layout, rows = sparse_layout(bits), _tile_rows()

    def build():
        _check_sparse(row_ptr, col_idx, qvalues, scales, zeros, bits, gs, in_features)
        rp, ci, qv = row_ptr.contiguous(), col_idx.contiguous(), qvalues.contiguous()
        sc, zr, pk = _params(scales.reshape(-1), zeros.reshape(-1))
        out, nnz = rp.numel() - 1, ci.numel()
        buf = hugebuf.empty(_C.qmm_sparse_packed_bytes(nnz, out, in_features, bits, gs, pk,
                                                       layout))
        _C.qmm_repack_sparse(rp.data_ptr(), ci.data_ptr(), qv.data_ptr(), qv.shape[1],
                             sc.data_ptr(), zr.data_ptr(), pk, out, in_features, bits, gs,
                             buf.data_ptr(), layout, rows)
        return buf, nnz, pk

    return _cached(qvalues, sig, build, ("sparse", layout, rows))
