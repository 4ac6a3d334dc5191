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
block-sparse 2- and 4-bit weights on the ``avx512`` ISA are repacked as row tiles: per tile of
16-32 rows and column group, a mask of the rows that keep it, then those rows' parameters
and codes, computed in the lanes of a vector against broadcast int8 activations and expanded
onto the rows (:func:`sparse_layout`); elsewhere as row streams: a bitmask of kept column
groups per row, then the kept groups' parameters and codes, walked once per row with no
scatter; either way split over threads by kept groups),
built once per weight on first use and cached (keyed by the tensors' storage pointer,
version counter and shape; dropped when the ``qweight`` tensor dies). ``lut`` on a 2-bit
dense weight with the avx2 ISA uses its own repack of the same size ("lut2": bit planes of 4
columns as 4-bit table indices), cached alongside. The disk format is untouched.

Modes and their error against :func:`bitpress.kernels.reference.dense_qmm_ref`:

* ``exact`` (default since 2026-12; one semantics for ``generate``, ``eval`` and the reference
  op): the weight-only product at fp32 accuracy. On the SIMD ISAs, dense weights take it as
  integer dot products of the codes with three int8 planes of x per segment,
  ``x = d q0 + (d/254) q1 + (d/254^2) q2`` with ``d = max|x_seg| / 127``: the planes hold x to
  within ``6.1e-8 max|x_seg|`` (plus x's own fp32 rounding), the int32 sums are exact and
  the three are combined in fp32, so for every output

      |y_exact - y_ref| <= sum_seg |scale_g| * 6.1e-8 * max|x_seg| * sum_{k in seg} |code_k|

  plus fp32 rounding (~1e-7 of ``sum |W||x|``; the int8 mode's bound with a step 2^16 times
  finer). It runs the int8 mode's kernels (bench/RESULTS.md, "CPU kernels at batch 1").
  Sparse weights in row tiles (``avx512``) take the same planes, with segment = group;
  sparse weights in row streams and the ``scalar`` ISA use fp32 FMA over the dequantised
  weight; all differ from the reference only at fp32 rounding (relative error ~1e-6 of
  ``sum |W||x|``).
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

# one purpose per module: config (modes, ISA, environment), support (what the kernels take),
# repack (cached kernel layouts), gemm (the exact GEMM path), calls (the ops' regular call
# path), plans (lean per-weight call paths), bounds (error bounds), register (the cpu_*
# implementations of the ops); this package re-exports their public names
from .config import (_C, _MODES, _PKIND, DEFAULT_ACT_MODE, DEFAULT_GEMM_ROWS,  # noqa: F401
                     DEFAULT_PREFETCH_BYTES, LUT_MAX, available_isas, describe_mode,
                     get_act_mode, get_gemm_rows, get_isa, get_prefetch, kernel_mode,
                     set_act_mode, set_gemm_rows, set_isa, set_prefetch)
from .support import dense_supports, sparse_supports  # noqa: F401
from .repack import _dense_packed, _sparse_packed, clear_cache, sparse_layout  # noqa: F401
from .gemm import GEMM_PANEL_BYTES  # noqa: F401
from .calls import dense_qmm_cpu, half_linear_cpu, sparse_qmm_cpu  # noqa: F401
from .plans import dense_plan, sparse_plan  # noqa: F401
from .bounds import int8_error_bound, lut_error_bound  # noqa: F401
from . import register  # noqa: F401,E402  (registers the cpu_* implementations)
