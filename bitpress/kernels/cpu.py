"""CPU fast paths of ``bitpress::dense_qmm`` and ``bitpress::sparse_qmm`` (C++ in csrc/cpu/).

Importing this module registers, for device type ``cpu``:

* ``cpu_native`` (priority 10): the default activation mode (:func:`get_act_mode`, ``exact``
  unless changed with :func:`set_act_mode` or ``BITPRESS_CPU_ACT=int8|lut|lut63``);
* ``cpu_lut``, ``cpu_int8`` and ``cpu_exact`` (priority 6 / 5 / 4): one mode each, for
  ``use_impl``.

``cpu_native`` sends calls with at least :func:`get_gemm_rows` activation rows (default 256:
prefill-sized; ``BITPRESS_CPU_GEMM_ROWS`` / :func:`set_gemm_rows`) to the **GEMM path**
(``cpu_blas`` forces it at any size): fp32 row panels of at most :data:`GEMM_PANEL_BYTES`
are dequantised from the canonical tensors (no repack; ``csrc/cpu/qmm.cpp``
``dequant_dense`` / ``dequant_sparse``, the reference's arithmetic, so bit-identical to
:func:`bitpress.kernels.reference.dense_weight`) and multiplied by torch's BLAS. A weight that
fits one panel gives exactly the reference op's result. Why a switch: at prefill sizes the
approximate activation modes cost accuracy where it is measured (decoupleQ W2 g64 SmolLM2,
WikiText-2, 10 windows: exact 50.166, int8 50.487 (+0.64%), lut 50.538 (+0.74%)) while
the GEMM path equals the fake-quantized model; it runs at fp32 ``F.linear`` speed plus the
dequantisation (~0.6 ms per 1536x576 weight on one thread), ~1.7x slower than ``lut`` and
~1.25x slower than ``int8`` at 1024 rows, so it is kept for calls that large.

``int8`` and ``exact`` run the same repacked weight (8 output rows interleaved, see csrc/cpu/qmm.h;
block-sparse weights are regrouped into tiles of 8 kept groups sharing a column group, so the
same kernels run on them and threads split the kept groups evenly),
built once per weight on first use and cached (keyed by the tensors' storage pointer,
version counter and shape; dropped when the ``qweight`` tensor dies). ``lut`` on a 2-bit
dense weight with the avx2 ISA uses its own repack of the same size ("lut2": bit planes of 4
columns as 4-bit table indices), cached alongside. The disk format is untouched.

Modes and their error against :func:`bitpress.kernels.reference.dense_qmm_ref`:

* ``exact`` (default since 2026-12; one semantics for ``generate``, ``eval`` and the reference
  op): fp32 FMA over the dequantised weight; differs from the reference only by fp32
  summation order (relative error ~1e-6 of ``sum |W||x|``).
* ``lut`` (opt-in; 2-bit dense weights on a SIMD ISA only, every other call runs ``int8``): per
  segment, for every 4 columns, the 16 subset sums of x are rounded to int8 with one step
  ``dt = max|subset sum| / 127``; ``vpshufb`` gathers them with 4-bit indices formed by one
  bit plane of 4 codes, ``vpmaddubsw`` adds plane 0 + 2 * plane 1, then the same fp32 group
  correction. At batch 1 two 8-row tiles share the table loads. Each looked-up entry is off
  by at most ``dt/2`` (entry 0 is exact):

      |y_lut - y_exact| <= sum_seg |scale_g| * (dt_seg / 2) * sum_{4 cols} ([idx0 != 0] + 2 [idx1 != 0])

  :func:`lut_error_bound` computes it. Typical error ~1.5% of ``|y|`` on random data (int8:
  ~0.8%), far below the 2-bit weight error.
* ``lut63`` (opt-in, ``cpu_lut63``): the same with entries in [-63, 63] (``dt = max / 63``),
  so the two lookups of a 16-column block add up in int8 before a single ``vpmaddubsw``:
  ~1.15x faster than ``lut``, twice its bound (``lut_error_bound(..., mode="lut63")``), ~3%
  of ``|y|``; on SmolLM2-135M with W2 down projections WikiText-2 perplexity +2.8% over
  ``exact`` vs +0.4% for ``lut`` (bench/RESULTS.md), hence not the default.
* ``int8``: the activations are quantised per segment (the weight group, or 256
  columns for per-channel weights) to int8 with scale ``d = max|x_seg| / 127``; integer
  u8 x s8 dot products, fp32 group correction, exact fp32 ``sum(x)`` for the zero points.
  Each activation moves by at most ``d/2``, so for every output

      |y_int8 - y_exact| <= sum_seg |scale_g| * (d_seg / 2) * sum_{k in seg} |code_k|

  (``code`` the signed code), plus fp32 rounding. :func:`int8_error_bound` computes it;
  the tests check it on random inputs. In practice the error is ~sqrt(n) smaller than the
  bound and well below the weight-quantisation error itself.

ISA, chosen once by CPU features: ``avx512`` (AVX-512 F/BW/VL + VNNI), else ``avx2``
(AVX2+FMA+F16C), else the portable ``scalar`` path; :func:`set_isa` forces one (``"auto"``
restores the choice). ``avx512`` is the AVX2 kernels and layouts built for AVX-512 with the
int8 dot products as ``vpdpbusd`` (one instruction for AVX2's three); the integers are exact
either way, so its results equal ``avx2``'s bit for bit. ``avx512-emu`` (never automatic;
present when the extension was built with the SIMDe headers) runs that same code with
``vpdpbusd`` emulated by SIMDe, so the tests cover it on CPUs without AVX-512. Its speed on
AVX-512 hardware is not yet measured (no such machine here).
Dense weights of 2, 3, 4 and 8 bits (8-bit: e.g. an output head; int8 mode through
``vpdpbusd`` with AVX512-VNNI, else two nibble ``vpmaddubsw``) and group-sparse weights of 2, 3
and 4 bits, with group sizes that are multiples of 16 up to 256 (or per-channel), are
supported; other calls fall back to the reference.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..formats.packing import packed_words
from . import native
from . import ops
from .ops import register_impl
from .repack_cache import RepackCache, tensor_sig, tensor_version

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
#: largest dequantised panel of the GEMM path (bytes of fp32 weight)
GEMM_PANEL_BYTES = 8 << 20
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
_CACHE = RepackCache()
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
    fp32 FMA over the dequantised weight, the reference op's function), or the opt-in
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


def clear_cache() -> None:
    global _gen
    _CACHE.clear()
    _gen += 1


# ---- repacking cache (shared mechanism: bitpress.kernels.repack_cache) ----------------------
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
        buf = torch.empty(_C.qmm_dense_packed_bytes(out, in_features, bits, gs, pk),
                          dtype=torch.uint8)
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


def _sparse_packed(row_ptr: torch.Tensor, col_idx: torch.Tensor, qvalues: torch.Tensor,
                   scales: torch.Tensor, zeros: torch.Tensor, bits: int, gs: int,
                   in_features: int) -> tuple[torch.Tensor, int, int]:
    sig = (_sig(row_ptr), _sig(col_idx), _sig(qvalues), _sig(scales), _sig(zeros), bits, gs,
           in_features)

    def build():
        _check_sparse(row_ptr, col_idx, qvalues, scales, zeros, bits, gs, in_features)
        rp, ci, qv = row_ptr.contiguous(), col_idx.contiguous(), qvalues.contiguous()
        sc, zr, pk = _params(scales.reshape(-1), zeros.reshape(-1))
        out, nnz = rp.numel() - 1, ci.numel()
        buf = torch.empty(_C.qmm_sparse_packed_bytes(nnz, out, in_features, bits, gs, pk),
                          dtype=torch.uint8)
        _C.qmm_repack_sparse(rp.data_ptr(), ci.data_ptr(), qv.data_ptr(), qv.shape[1],
                             sc.data_ptr(), zr.data_ptr(), pk, out, in_features, bits, gs,
                             buf.data_ptr())
        return buf, nnz, pk

    return _cached(qvalues, sig, build)


# ---- support predicates ----------------------------------------------------------------------
def _gs_ok(gs: int, in_features: int, allow_per_channel: bool) -> bool:
    if gs >= in_features:
        return allow_per_channel
    return gs % 16 == 0 and 16 <= gs <= 256


def _common_ok(x: torch.Tensor, *tensors: Optional[torch.Tensor]) -> bool:
    if x.device.type != "cpu" or x.dtype not in _PKIND:
        return False
    return all(t is None or t.device.type == "cpu" for t in tensors)


def dense_supports(x, qweight, scales, zeros, bias, bits, group_size, in_features) -> bool:
    return (bits in (2, 3, 4, 8) and _common_ok(x, qweight, scales, zeros, bias)
            and qweight.dtype == torch.int32 and qweight.dim() == 2
            and qweight.shape[1] == packed_words(in_features, bits)
            and scales.is_floating_point() and zeros.is_floating_point()
            and _gs_ok(group_size, in_features, True) and in_features > 0)


def sparse_supports(x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, group_size,
                    in_features) -> bool:
    return (bits in (2, 3, 4) and _common_ok(x, row_ptr, col_idx, qvalues, scales, zeros, bias)
            and row_ptr.dtype == torch.int32 and col_idx.dtype == torch.int32
            and qvalues.dtype == torch.int32 and qvalues.dim() == 2
            and qvalues.shape[1] == packed_words(group_size, bits)
            and scales.is_floating_point() and zeros.is_floating_point()
            and group_size % 16 == 0 and 16 <= group_size <= 256 and in_features > 0)


# ---- the kernels -----------------------------------------------------------------------------
def _prep_x(x: torch.Tensor, in_features: int) -> tuple[torch.Tensor, int]:
    # a contiguous fp32 x is passed as is (the kernels read it as [M, in] rows)
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.reshape(-1, in_features).float().contiguous()
    return x, x.numel() // in_features


def _bias(bias: Optional[torch.Tensor], out: int) -> tuple[Optional[torch.Tensor], int]:
    if bias is None:
        return None, 0
    if bias.numel() != out or not bias.is_cpu:
        raise ValueError(f"bias must be a CPU tensor of {out} elements, got {bias.numel()} on "
                         f"{bias.device}")
    b = bias if bias.dtype == torch.float32 and bias.is_contiguous() else \
        bias.reshape(-1).float().contiguous()
    return b, b.data_ptr()


def _finish(y: torch.Tensor, x: torch.Tensor, out: int) -> torch.Tensor:
    return y if x.dtype == torch.float32 else y.to(x.dtype)


# ---- the GEMM path: dequantised panels through torch's BLAS ---------------------------------
def _panel_gemm(x2: torch.Tensor, out: int, in_features: int, b: Optional[torch.Tensor],
                fill) -> torch.Tensor:
    """``x2 [M, in] @ W^T (+ b)`` with ``W`` produced panel by panel: ``fill(r0, r1, dst)``
    writes rows ``[r0, r1)`` of the fp32 weight into ``dst``. One panel when the weight fits
    :data:`GEMM_PANEL_BYTES`, so the call is then exactly the reference op's ``F.linear``."""
    rows = max(8, GEMM_PANEL_BYTES // (4 * in_features))
    if rows >= out:
        w = torch.empty(out, in_features)
        fill(0, out, w)
        return torch.nn.functional.linear(x2, w, b)
    y = torch.empty(x2.shape[0], out)
    w = torch.empty(rows, in_features)
    for r0 in range(0, out, rows):
        r1 = min(out, r0 + rows)
        fill(r0, r1, w)
        y[:, r0:r1] = torch.nn.functional.linear(x2, w[:r1 - r0],
                                                 None if b is None else b[r0:r1])
    return y


def _dense_gemm_fill(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                     gs: int, in_features: int):
    qw = qweight.contiguous()
    sc, zr, pk = _params(scales, zeros)
    words = qw.shape[1]

    def fill(r0: int, r1: int, dst: torch.Tensor) -> None:
        _C.qmm_dequant_dense(qw.data_ptr(), words, in_features, bits, gs, sc.data_ptr(),
                             zr.data_ptr(), pk, r0, r1, dst.data_ptr(), torch.get_num_threads())
    fill.keep = (qw, sc, zr)
    return fill


def _sparse_gemm_fill(row_ptr: torch.Tensor, col_idx: torch.Tensor, qvalues: torch.Tensor,
                      scales: torch.Tensor, zeros: torch.Tensor, bits: int, gs: int,
                      in_features: int):
    rp, ci, qv = row_ptr.contiguous(), col_idx.contiguous(), qvalues.contiguous()
    sc, zr, pk = _params(scales.reshape(-1), zeros.reshape(-1))
    words = qv.shape[1]

    def fill(r0: int, r1: int, dst: torch.Tensor) -> None:
        _C.qmm_dequant_sparse(rp.data_ptr(), ci.data_ptr(), qv.data_ptr(), words, sc.data_ptr(),
                              zr.data_ptr(), pk, in_features, bits, gs, r0, r1, dst.data_ptr(),
                              torch.get_num_threads())
    fill.keep = (rp, ci, qv, sc, zr)
    return fill


def _bias_f32(bias: Optional[torch.Tensor], out: int) -> Optional[torch.Tensor]:
    return _bias(bias, out)[0]


def _use_gemm(mode: Optional[str], m: int) -> bool:
    return mode == "blas" or (mode is None and m >= _gemm_rows)


def dense_qmm_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor, bias: Optional[torch.Tensor], bits: int, group_size: int,
                  in_features: int, mode: Optional[str] = None) -> torch.Tensor:
    # the weight is validated once, when it is repacked (a cache hit implies the same
    # tensors, shapes and versions); per call only the activation side is checked
    if not x.is_cpu or x.dtype not in _PKIND or x.shape[-1] != in_features:
        raise ValueError(f"dense_qmm_cpu: x must be a CPU float tensor [..., {in_features}]")
    out = qweight.shape[0]
    x2, m = _prep_x(x, in_features)
    if _use_gemm(mode, m):
        _check_dense(qweight, scales, zeros, bits, group_size, in_features)
        fill = _dense_gemm_fill(qweight, scales, zeros, bits, group_size, in_features)
        y = _panel_gemm(x2, out, in_features, _bias_f32(bias, out), fill)
        return _finish(y.reshape(*x.shape[:-1], out), x, out)
    code = _MODES[mode or _mode]
    if code >= 2 and (bits != 2 or _isa == "scalar"):
        code = 1  # the lut kernels are 2-bit SIMD only; elsewhere lut means int8
    packed, pk = _dense_packed(qweight, scales, zeros, bits, group_size, in_features,
                               1 if code >= 2 else 0)
    y = torch.empty(*x.shape[:-1], out, dtype=torch.float32)
    b, bptr = _bias(bias, out)
    if m:
        _C.qmm_dense(packed.data_ptr(), out, in_features, bits, group_size, pk, x2.data_ptr(), m,
                     y.data_ptr(), bptr, code, torch.get_num_threads())
    return _finish(y, x, out)


def half_linear_cpu(x: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for an unquantised 16-bit weight (fp16 or bf16, ``[out,
    in]``) with fp32 arithmetic: each weight element is widened exactly and multiplied in
    fp32, so the result equals ``F.linear(x.float(), weight.float(), bias)`` up to fp32
    summation order, while reading half the bytes of an fp32 weight (SmolLM2's 49152x576
    head at batch 1, one AVX2 thread: 6.4 ms, against 14.5 for torch's fp32 ``F.linear``
    and 8.3 / 10.3 for its fp16 / bf16 one, whose outputs are rounded to 16 bits).
    Returns x's dtype."""
    if weight.dim() != 2 or weight.dtype not in (torch.float16, torch.bfloat16) \
            or not weight.is_cpu:
        raise ValueError(f"half_linear_cpu: weight must be a 2-D fp16/bf16 CPU tensor, got "
                         f"{tuple(weight.shape)} {weight.dtype} on {weight.device}")
    out, inf = weight.shape
    if not x.is_cpu or not x.is_floating_point() or x.shape[-1] != inf:
        raise ValueError(f"half_linear_cpu: x must be a CPU float tensor [..., {inf}]")
    w = weight.contiguous()
    x2, m = _prep_x(x, inf)
    b, bptr = _bias(bias, out)
    y = torch.empty(*x.shape[:-1], out, dtype=torch.float32)
    if m:
        _C.half_linear(w.data_ptr(), int(w.dtype == torch.bfloat16), out, inf, x2.data_ptr(), m,
                       y.data_ptr(), bptr, torch.get_num_threads())
    return _finish(y, x, out)


def _plan_guard(tensors: tuple, in_features: int):
    """``stale(x)`` for a kernel plan bound to ``tensors`` (``None`` entries skipped): true
    when x is not a contiguous fp32 CPU tensor of ``in_features`` columns, or when a bound
    tensor was updated in place or the mode/ISA/cache generation or a forced implementation
    changed since the plan was made (then the caller takes the regular path)."""
    gen, local, env = _gen, ops._LOCAL, _ENV_DATA
    forced_local, forced_env = getattr(local, "forced", None), env.get(_ENV_KEY)
    f32 = torch.float32
    ts = [t for t in tensors if t is not None]
    # inference tensors have no version counter (asking raises): identity checks only
    tv = () if any(t.is_inference() for t in ts) else tuple((t, t._version) for t in ts)

    def stale(x: torch.Tensor) -> bool:
        if (x.dtype is not f32 or not x.is_contiguous() or not x.is_cpu or _gen != gen
                or getattr(local, "forced", None) != forced_local
                or env.get(_ENV_KEY) != forced_env or x.shape[-1] != in_features):
            return True
        for t, v in tv:
            if t._version != v:
                return True
        return False

    return stale


def dense_plan(args: tuple, mode: Optional[str] = None):
    """A lean call path for one dense weight: returns ``fast(x)`` that runs the same kernel
    as :func:`dense_qmm_cpu` with the weight arguments of ``args`` (the op's arguments; the x
    in it is only a sample) bound once, or ``None`` for a call it cannot take.

    ``fast(x)`` returns the output, or ``None`` (then use the regular path) when x is not a
    contiguous fp32 CPU tensor with ``in_features`` columns, when a bound tensor was updated
    in place, or when the mode, ISA, cache or a forced implementation changed since the plan
    was made. It skips what the regular path re-derives per call (support checks, repack
    cache signature, bias conversion): ~3 us of Python instead of ~25 us."""
    x, qweight, scales, zeros, bias, bits, group_size, in_features = args
    if not dense_supports(x, qweight, scales, zeros, bias, bits, group_size, in_features):
        return None
    if mode == "blas":
        return None
    code = _MODES[mode or _mode]
    if code >= 2 and (bits != 2 or _isa == "scalar"):
        code = 1
    packed, pk = _dense_packed(qweight, scales, zeros, bits, group_size, in_features,
                               1 if code >= 2 else 0)
    out = qweight.shape[0]
    b, bptr = _bias(bias, out)
    stale = _plan_guard((qweight, scales, zeros, bias), in_features)
    qd, pptr, nthreads, empty = _C.qmm_dense, packed.data_ptr(), torch.get_num_threads, torch.empty
    gemm_rows = _gemm_rows if mode is None else None
    gemm = None

    def fast(x: torch.Tensor) -> Optional[torch.Tensor]:
        nonlocal gemm
        if stale(x):
            return None
        shape = x.shape
        m = x.numel() // in_features
        if gemm_rows is not None and m >= gemm_rows:
            if gemm is None:
                _check_dense(qweight, scales, zeros, bits, group_size, in_features)
                gemm = _dense_gemm_fill(qweight, scales, zeros, bits, group_size, in_features)
            return _panel_gemm(x.reshape(m, in_features), out, in_features, b,
                               gemm).reshape(*shape[:-1], out)
        y = empty(*shape[:-1], out)
        if m:
            qd(pptr, out, in_features, bits, group_size, pk, x.data_ptr(), m, y.data_ptr(),
               bptr, code, nthreads())
        return y

    fast.keep = (packed, b)  # the bound buffers live as long as the plan
    return fast


def sparse_plan(args: tuple, mode: Optional[str] = None):
    """The lean call path of one group-sparse weight, as :func:`dense_plan` for dense ones:
    ``fast(x)`` runs the tile kernel of :func:`sparse_qmm_cpu` with the weight bound once,
    or returns ``None`` (use the regular path) for an x it does not take (not a contiguous
    fp32 CPU tensor of ``in_features`` columns; GEMM-sized calls of the default mode) or when
    a bound tensor, the mode, the cache or a forced implementation changed."""
    x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, group_size, in_features = args
    if not sparse_supports(x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, group_size,
                           in_features) or mode == "blas":
        return None
    code = min(_MODES[mode or _mode], 1)
    packed, nnz, pk = _sparse_packed(row_ptr, col_idx, qvalues, scales, zeros, bits,
                                     group_size, in_features)
    out = row_ptr.numel() - 1
    b, bptr = _bias(bias, out)
    stale = _plan_guard((row_ptr, col_idx, qvalues, scales, zeros, bias), in_features)
    qs, tptr, nthreads, empty = _C.qmm_sparse, packed.data_ptr(), torch.get_num_threads, \
        torch.empty
    gemm_rows = _gemm_rows if mode is None else None

    def fast(x: torch.Tensor) -> Optional[torch.Tensor]:
        if stale(x):
            return None
        shape = x.shape
        m = x.numel() // in_features
        if gemm_rows is not None and m >= gemm_rows:
            return None
        y = empty(*shape[:-1], out)
        if m:
            qs(tptr, nnz, out, in_features, bits, group_size, pk, x.data_ptr(), m,
               y.data_ptr(), bptr, code, nthreads())
        return y

    fast.keep = (packed, b)  # the bound buffers live as long as the plan
    return fast


def sparse_qmm_cpu(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                   qvalues: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                   mode: Optional[str] = None) -> torch.Tensor:
    if not x.is_cpu or x.dtype not in _PKIND or x.shape[-1] != in_features:
        raise ValueError(f"sparse_qmm_cpu: x must be a CPU float tensor [..., {in_features}]")
    out = row_ptr.numel() - 1
    x2, m = _prep_x(x, in_features)
    if _use_gemm(mode, m):
        _check_sparse(row_ptr, col_idx, qvalues, scales, zeros, bits, group_size, in_features)
        fill = _sparse_gemm_fill(row_ptr, col_idx, qvalues, scales, zeros, bits, group_size,
                                 in_features)
        y = _panel_gemm(x2, out, in_features, _bias_f32(bias, out), fill)
        return _finish(y.reshape(*x.shape[:-1], out), x, out)
    packed, nnz, pk = _sparse_packed(row_ptr, col_idx, qvalues, scales, zeros, bits,
                                     group_size, in_features)
    y = torch.empty(*x.shape[:-1], out, dtype=torch.float32)
    b, bptr = _bias(bias, out)
    if m:
        _C.qmm_sparse(packed.data_ptr(), nnz, out, in_features, bits, group_size, pk,
                      x2.data_ptr(), m, y.data_ptr(), bptr, min(_MODES[mode or _mode], 1),
                      torch.get_num_threads())
    return _finish(y, x, out)


def int8_error_bound(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """Upper bound of ``|y_int8 - y_exact|`` per output (``[..., out]``) for signed int8
    ``codes [out, in]`` and float ``scale [out, n_groups]`` (pruned groups: scale 0), at
    effective ``group_size``; fp32 rounding not included."""
    in_features = codes.shape[1]
    seg = group_size if group_size < in_features else min(256, (in_features + 15) // 16 * 16)
    nseg = (in_features + seg - 1) // seg
    x2 = x.reshape(-1, in_features).float()
    pad = nseg * seg - in_features
    xp = torch.nn.functional.pad(x2, (0, pad)).reshape(-1, nseg, seg)
    d = xp.abs().amax(-1) / 127.0                                        # [M, nseg]
    ca = torch.nn.functional.pad(codes.float().abs(), (0, pad)).reshape(-1, nseg, seg).sum(-1)
    gi = (torch.arange(nseg) * seg) // group_size if group_size < in_features \
        else torch.zeros(nseg, dtype=torch.long)
    s = scale.float().abs()[:, gi]                                        # [out, nseg]
    bound = (d / 2) @ (s * ca).t()                                        # [M, out]
    return bound.reshape(*x.shape[:-1], codes.shape[0])


def lut_error_bound(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                    group_size: int, mode: str = "lut") -> torch.Tensor:
    """Upper bound of ``|y_lut - y_exact|`` per output (``[..., out]``) of the 2-bit ``lut``
    kernel, for signed 2-bit ``codes [out, in]`` and float ``scale [out, n_groups]``, at
    effective ``group_size``; fp32 rounding not included.

    Per segment the tables hold, for every 4 columns, the 16 subset sums of x rounded to
    integers in ``[-L, L]`` with one step ``dt = max |subset sum| / L`` (``L`` = 127 for
    ``mode="lut"``, 63 for ``"lut63"``), so each looked-up entry is off by at most ``dt/2``
    (entry 0 is exact). A row adds, per 4 columns, the plane-0 entry
    plus twice the plane-1 entry, hence at most ``dt/2 * ([idx0 != 0] + 2 [idx1 != 0])``."""
    in_features = codes.shape[1]
    seg = group_size if group_size < in_features else min(256, (in_features + 15) // 16 * 16)
    nseg = (in_features + seg - 1) // seg
    pad = nseg * seg - in_features
    x2 = x.reshape(-1, in_features).float()
    xq = torch.nn.functional.pad(x2, (0, pad)).reshape(-1, nseg, seg // 4, 4)
    sub = torch.maximum(xq.clamp(min=0).sum(-1), (-xq).clamp(min=0).sum(-1))  # max |entry|
    dt = sub.amax(-1) / LUT_MAX[mode]                                      # [M, nseg]
    u = torch.nn.functional.pad(codes.long() + 2, (0, pad)).reshape(-1, nseg, seg // 4, 4)
    hits = ((u & 1) != 0).any(-1).float() + 2 * ((u & 2) != 0).any(-1).float()
    cnt = hits.sum(-1)                                                     # [out, nseg]
    gi = (torch.arange(nseg) * seg) // group_size if group_size < in_features \
        else torch.zeros(nseg, dtype=torch.long)
    s = scale.float().abs()[:, gi]                                         # [out, nseg]
    bound = (dt / 2) @ (s * cnt).t()                                       # [M, out]
    return bound.reshape(*x.shape[:-1], codes.shape[0])


def _native(mode: Optional[str]):
    def dense(x, qweight, scales, zeros, bias, bits, group_size, in_features):
        return dense_qmm_cpu(x, qweight, scales, zeros, bias, bits, group_size, in_features,
                             mode=mode)

    def sparse(x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, group_size, in_features):
        return sparse_qmm_cpu(x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits,
                              group_size, in_features, mode=mode)

    # modules (bitpress.nn) bind a weight once through ``plan`` when it is there
    dense.plan = lambda args: dense_plan(args, mode)
    sparse.plan = lambda args: sparse_plan(args, mode)
    return dense, sparse


for _name, _mode_arg, _prio in (("cpu_native", None, 10), ("cpu_lut", "lut", 6),
                                ("cpu_int8", "int8", 5), ("cpu_exact", "exact", 4),
                                ("cpu_lut63", "lut63", 3), ("cpu_blas", "blas", 2)):
    _d, _s = _native(_mode_arg)
    register_impl("dense_qmm", "cpu", _name, _d, _prio, dense_supports)
    register_impl("sparse_qmm", "cpu", _name, _s, _prio, sparse_supports)
