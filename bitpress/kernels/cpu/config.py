"""Configuration of the CPU kernels: the loaded extension, the activation mode, ISA, GEMM
threshold and prefetch distance (environment defaults and setters), and the generation
counter that invalidates the fast call plans when any of them changes."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import native

_C = native._module()
if _C is None or not hasattr(_C, "qmm_dense"):
    raise ImportError("bitpress._C with the CPU qmm kernels is not built")

_PKIND = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
#: largest |table entry| per mode of the lookup-table kernel (csrc/cpu/qmm.h): ``lut63`` adds
#: the two lookups of a block in int8 before one ``vpmaddubsw``, so its entries stay in +-63
LUT_MAX = {"lut": 127, "lut63": 63}
_MODES = {"exact": 0, "int8": 1, "lut": 2, "lut63": 3}
#: calls of ``cpu_native`` with at least this many activation rows take the GEMM path:
#: dequantised fp32 row panels multiplied by torch's BLAS (exact; measured against the
#: activation modes in bench/RESULTS.md, "GEMM path for prefill-sized calls")
DEFAULT_GEMM_ROWS = 256
# software prefetch distance of the AVX2 kernels (bytes ahead of the weight stream)
DEFAULT_PREFETCH_BYTES = 3072
#: the default activation mode: ``exact`` (weight-only, what the reference op computes), so that
#: decoding, evaluation and the reference agree; ``int8`` / ``lut`` / ``lut63`` are opt-in
DEFAULT_ACT_MODE = "exact"
_mode = os.environ.get("BITPRESS_CPU_ACT", DEFAULT_ACT_MODE)
if _mode not in _MODES:
    raise ValueError(f"BITPRESS_CPU_ACT must be 'lut', 'lut63', 'int8' or 'exact', got {_mode!r}")
_isa = _C.qmm_get_isa()
_gemm_env = os.environ.get("BITPRESS_CPU_GEMM_ROWS", str(DEFAULT_GEMM_ROWS))
if not _gemm_env.isdigit() or int(_gemm_env) < 1:
    raise ValueError(f"BITPRESS_CPU_GEMM_ROWS must be a positive integer, got {_gemm_env!r}")
_gemm_rows = int(_gemm_env)
_pf_env = os.environ.get("BITPRESS_CPU_PREFETCH")
if _pf_env is not None:
    if not _pf_env.isdigit():
        raise ValueError(f"BITPRESS_CPU_PREFETCH must be a byte count >= 0, got {_pf_env!r}")
    _C.qmm_set_prefetch(int(_pf_env))
# bumped by set_isa / set_act_mode / clear_cache: invalidates the fast call plans
_gen = 0
# the environment as ops._forced() reads it (os.environ.get re-encodes the key every call)
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = b"BITPRESS_KERNEL" if isinstance(_ENV_DATA, dict) else "BITPRESS_KERNEL"
if not isinstance(_ENV_DATA, dict):
    _ENV_DATA = os.environ


# ---- configuration ---------------------------------------------------------------------------
def set_isa(name: str) -> None:
    """Force the kernel ISA (process-wide): ``"auto"``, ``"avx512"``, ``"avx2"``,
    ``"avx512-emu"`` or ``"scalar"``; :func:`available_isas` lists this CPU's."""
    global _isa, _gen
    _C.qmm_set_isa(name)
    _isa = _C.qmm_get_isa()
    _gen += 1


def get_isa() -> str:
    return _C.qmm_get_isa()


def available_isas() -> list[str]:
    return list(_C.qmm_available_isas())


def set_act_mode(mode: str) -> None:
    """Activation mode of ``cpu_native`` and of the decode engine: ``"exact"`` (default:
    the reference op's function at fp32 accuracy; dense weights on a SIMD ISA run it as
    integer dot products with three int8 planes of x, see the package docstring), or the opt-in
    approximate modes ``"int8"`` (activations rounded to int8 per segment), ``"lut"`` (the
    lookup-table kernel for 2-bit dense weights on a SIMD ISA, ``int8`` for everything else)
    and ``"lut63"`` (the faster lookup-table kernel with twice the table error)."""
    global _mode, _gen
    if mode not in _MODES:
        raise ValueError(f"activation mode must be 'lut', 'lut63', 'int8' or 'exact', got "
                         f"{mode!r}")
    _mode = mode
    _gen += 1


def get_act_mode() -> str:
    return _mode


class kernel_mode:
    """``with kernel_mode("int8"):`` run every CPU packed call of the block on the decode
    kernels in that activation mode, whatever its row count (no GEMM path), so that an
    evaluation scores exactly the kernels :class:`bitpress.runtime.DecodeEngine` runs;
    ``kernel_mode(None)`` changes nothing. Restores the previous mode and GEMM threshold."""

    NO_GEMM = 1 << 62

    def __init__(self, mode: Optional[str]) -> None:
        if mode is not None and mode not in _MODES:
            raise ValueError(f"kernel mode must be one of {sorted(_MODES)}, got {mode!r}")
        self.mode = mode

    def __enter__(self) -> "kernel_mode":
        self.prev = (_mode, _gemm_rows)
        if self.mode is not None:
            set_act_mode(self.mode)
            set_gemm_rows(self.NO_GEMM)
        return self

    def __exit__(self, *exc) -> None:
        if self.mode is not None:
            set_act_mode(self.prev[0])
            set_gemm_rows(self.prev[1])


def describe_mode() -> str:
    """What ``cpu_native`` computes now, for result files: the activation mode, and from how
    many rows calls take the exact GEMM path."""
    if _gemm_rows >= kernel_mode.NO_GEMM:
        return f"{_mode} (decode kernels at every size)"
    return f"{_mode} below {_gemm_rows} rows, exact GEMM path from {_gemm_rows} rows"


def set_gemm_rows(rows: int) -> None:
    """Calls of ``cpu_native`` with at least ``rows`` activation rows (``M``) run the GEMM
    path (dequantised panels through torch's BLAS, exact like the reference op) instead of the
    activation-mode kernel; a huge value keeps every call on the kernel. Default
    :data:`DEFAULT_GEMM_ROWS` or ``BITPRESS_CPU_GEMM_ROWS``."""
    global _gemm_rows, _gen
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"gemm rows must be a positive integer, got {rows!r}")
    _gemm_rows = rows
    _gen += 1


def get_gemm_rows() -> int:
    return _gemm_rows


def set_prefetch(nbytes: int) -> None:
    """Distance, in bytes, at which the AVX2 kernels software-prefetch the packed weight
    stream ahead of use (``0`` turns it off). Default :data:`DEFAULT_PREFETCH_BYTES` or
    ``BITPRESS_CPU_PREFETCH``: the hardware prefetchers stop at every 4 KiB page, and a
    batch-1 GEMV streams each weight once, so prefetching ahead of them is worth 15–25 % at
    the Llama shapes (bench/RESULTS.md). Results do not depend on it."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"prefetch distance must be a byte count >= 0, got {nbytes!r}")
    _C.qmm_set_prefetch(nbytes)


def get_prefetch() -> int:
    return int(_C.qmm_get_prefetch())


def bump() -> None:
    """Invalidate every fast call plan (the repack cache was cleared)."""
    global _gen
    _gen += 1
