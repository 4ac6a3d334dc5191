"""GPTQ: error-feedback rounding against the layer Hessian, and its reusable core.

The pass minimises, row by row, the layer-output error ``tr((Ŵ−W) H (Ŵ−W)ᵀ)`` with
``H = XᵀX / n`` by quantizing one input column at a time and spreading that column's
rounding error over the columns not yet quantized (optimal brain quantization). The
classic ingredients, implemented here from the paper's description:

* damping ``H += damp · mean(diag H) · I`` (``spec.options["damp"]``, default 0.01), raised ×10
  with a logged warning while the Cholesky factorisation fails;
* dead inputs (``diag H == 0``): the diagonal is set to 1 and the weight column to 0;
* the upper Cholesky factor ``U`` of ``H⁻¹`` (computed in float64, used in float32): the
  error feedback of column ``i`` onto later columns is ``err_i · U[i, i:] / U[i, i]``;
* blocked lazy updates (``spec.options["block_size"]``, default 128): inside a block the
  updates are rank-1, the rest of the matrix is updated once per block with one GEMM;
* group parameters: without act-order they are computed (min/max through
  :func:`bitpress.formats.minmax_params`, i.e. rounded to the on-disk parameter dtype) when
  the group's first column is reached, on the error-updated weights. Blocks are aligned to
  groups so a group's columns are always fully updated when its parameters are chosen;
* act-order (``spec.options["act_order"]``) with **static groups**: parameters are computed
  up front from the original ``W`` in natural column order, columns are processed in order
  of decreasing ``diag H``, and codes are returned in natural order. No permutation index
  is stored: the result is an ordinary :class:`~bitpress.formats.QuantizedWeight`;
* optional H-weighted clipping search (``spec.options["clip_search"]``): each group tries the
  shrink factors in ``spec.options["clip_grid"]`` and keeps, per row, the one whose rounding
  error is smallest in the H-metric (see :func:`_clip_search`).

Reusable by other solvers (decoupleQ's integer step, GQSA):

* :func:`prepare_hessian` → :class:`HessianFactor` (damped inverse Cholesky, dead inputs, order);
* :func:`gptq_round_fixed_grid`: error-feedback rounding onto a *fixed* grid;
* :func:`hessian_loss`: per-row ``tr((Ŵ−W) H (Ŵ−W)ᵀ)``.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ..errors import BitpressError, ConfigError, NumericalError  # noqa: F401 - re-exported
from ..formats import (QuantizedWeight, check_bits, check_group_size, effective_group_size,
                       integer_zero_params, minmax_params, num_groups, qrange)
from .clip import clip_search, hessian_block_error, schur_error
from .feedback import feedback_round
from .spec import Options, QuantSpec

log = logging.getLogger(__name__)

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK_SIZE = 128
DEFAULT_CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0 .. 0.5
MAX_DAMP_RETRIES = 8

_KNOWN_OPTIONS = {"damp", "block_size", "act_order", "clip_search", "clip_grid"}


# ---------------------------------------------------------------------------------------
# Hessian preparation
# ---------------------------------------------------------------------------------------
@dataclass
class HessianFactor:
    """A Hessian prepared for error-feedback rounding.

    * ``U``: float32 ``[in, in]`` upper-triangular, ``UᵀU = (H_damped[perm][:, perm])⁻¹``;
    * ``perm``: processing order of the columns (``None``: natural order);
    * ``dead``: bool ``[in]``, inputs with ``diag H == 0`` (natural order); their weights
      are treated as 0 by the rounding functions;
    * ``damp``: the absolute damping finally added to the diagonal (after any retries).
    """
    U: torch.Tensor
    perm: Optional[torch.Tensor]
    dead: torch.Tensor
    damp: float

    @property
    def in_features(self) -> int:
        return self.U.shape[0]


def _check_hessian(H: torch.Tensor, in_features: Optional[int] = None) -> None:
    if not isinstance(H, torch.Tensor) or H.dim() != 2 or H.shape[0] != H.shape[1]:
        shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise ConfigError(f"H must be a square [in, in] tensor, got {shape}")
    if in_features is not None and H.shape[0] != in_features:
        raise ConfigError(f"H is {tuple(H.shape)} but W has {in_features} input columns; "
                          f"pass the Hessian of this layer's inputs")
    if not H.is_floating_point():
        raise ConfigError(f"H must be floating point, got {H.dtype}")
    if not _all_finite(H):
        raise ConfigError("H contains NaN or Inf: this layer's inputs are not finite (the "
                          "activations overflowed in an earlier layer, or a weight before it, "
                          "e.g. a norm, holds NaN/Inf)")


def checked_layer(W: torch.Tensor, H: Optional[torch.Tensor], solver: str) -> torch.Tensor:
    """The layer's Hessian on W's device, after checking W and H (the preamble of every
    Hessian-based layer solver; ``solver`` names it in the error)."""
    if H is None:
        raise ConfigError(f"{solver} needs the layer Hessian H = XᵀX/n (calibration data); use "
                          "method 'rtn' for data-free quantization")
    _check_weight(W)
    _check_hessian(H, W.shape[1])
    return H.to(W.device)


def _check_weight(W: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ConfigError(f"expected a 2-D weight [out, in], got {shape}")
    if not W.is_floating_point():
        raise ConfigError(f"weight must be floating point, got {W.dtype}")
    if not _all_finite(W):
        raise ConfigError("weight contains NaN or Inf")


def prepare_hessian(H: torch.Tensor, damp: float = DEFAULT_DAMP, act_order: bool = False,
                    perm: Optional[torch.Tensor] = None) -> HessianFactor:
    """Damp ``H``, fix dead inputs and return the upper Cholesky factor of its inverse.

    ``damp`` is relative to ``mean(diag H)``. If a Cholesky factorisation fails the damping
    is multiplied by 10 (logged as a warning) up to ``MAX_DAMP_RETRIES`` times, then
    :class:`NumericalError` is raised. ``act_order`` orders columns by decreasing
    ``diag H``; an explicit ``perm`` overrides it. The maths runs in float64.

    Memory: one ``n × n`` float64 work buffer (factorised, inverted and narrowed to the
    float32 ``U`` in place: ``U`` is a view of its first half, the other half's pages are
    given back to the OS) besides ``H``, plus ``n × 512`` slabs (for ``n = 13824``: 1.5 GB
    at the peak, 0.76 GB held after + ~0.1 GB). The numbers are those of the textbook sequence
    ``Hd = (H + Hᵀ)/2`` → dead inputs → permute → Cholesky of ``flip(Hd + λI)`` →
    triangular inverse → flip.
    """
    _check_hessian(H)
    if not (damp >= 0.0) or damp != damp:
        raise ConfigError(f"damp must be a non-negative number (relative to mean diag H), got {damp}")
    n = H.shape[0]
    H = H.detach()
    diag = torch.diagonal(H).to(torch.float64)  # symmetrising leaves the diagonal as is
    dead = diag <= 0
    diag[dead] = 1.0
    if perm is None and act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
    if perm is not None:
        perm = perm.to(device=H.device, dtype=torch.long)
        if perm.shape != (n,) or not bool((torch.sort(perm).values
                                          == torch.arange(n, device=perm.device)).all()):
            raise ConfigError(f"perm must be a permutation of range({n})")
    sym = bool(torch.equal(H, H.T))
    A = torch.empty(n, n, dtype=torch.float64, device=H.device)
    _fill_permuted_(A, H, perm, dead, sym)
    # the mean of the permuted diagonal as a strided view, as in the textbook sequence
    # (a strided and a contiguous float64 sum may differ in the last bit)
    mean_diag = float(torch.diagonal(A).mean()) if n else 1.0
    _reverse_(A.view(-1))  # A ← J·A·J (the damping below is flip-invariant)
    d0 = torch.diagonal(A).clone()
    rel = damp
    for attempt in range(MAX_DAMP_RETRIES + 1):
        absdamp = rel * mean_diag
        # With J the reversal, J·H·J = M·Mᵀ (M lower) gives H = R·Rᵀ with R = J·M·J upper,
        # so H⁻¹ = R⁻ᵀ·R⁻¹ and U = R⁻¹ = J·M⁻¹·J: one Cholesky and one triangular inverse,
        # no explicit inverse of H.
        if attempt:  # the failed attempt overwrote A: rebuild it from H
            _fill_permuted_(A, H, perm, dead, sym)
            _reverse_(A.view(-1))
        torch.diagonal(A).copy_(d0 + absdamp)
        # A is symmetric, so its row-major buffer read column-major (A.mT) is A too: LAPACK
        # factorises it in place (no copy into a column-major buffer); L is column-major
        L = A.mT
        info = torch.zeros((), dtype=torch.int32, device=A.device)
        torch.linalg.cholesky_ex(L, out=(L, info))
        if int(info) == 0:
            _invert_lower_(L)
            U = _flip_to_float(L)
            if _all_finite(U) and bool((torch.diagonal(U) > 0).all()):
                _release_tail(U)
                return HessianFactor(U, perm, dead.to(H.device), absdamp)
            del U
        new_rel = max(rel * 10.0, 1e-6)
        if attempt < MAX_DAMP_RETRIES:
            log.warning("GPTQ: Cholesky of the damped Hessian (%d x %d) failed at relative "
                        "damping %.3g; retrying with %.3g", n, n, rel, new_rel)
        rel = new_rel
    raise NumericalError(f"the Hessian ({n} x {n}) could not be factorised even with relative "
                         f"damping {rel / 10:.3g}; check the calibration activations for "
                         f"NaN/Inf or pass a larger 'damp'")


_CHUNK = 2048
_SLAB = 512  # columns per triangular solve / rows per flip (n x 512 float64 scratch)


def _fill_permuted_(A: torch.Tensor, H: torch.Tensor, perm: Optional[torch.Tensor],
                    dead: torch.Tensor, sym: bool) -> None:
    """``A ← P·Hd·Pᵀ`` in float64, written a slab of rows at a time, where ``Hd`` is
    ``(H + Hᵀ)/2`` (skipped when ``sym``) with dead inputs' rows and columns zeroed and
    their diagonal set to 1. Symmetrising after permuting gives the same numbers (each
    entry is the same pair's average)."""
    n = H.shape[0]
    for r in range(0, n, _SLAB):
        r1 = min(r + _SLAB, n)
        if perm is None:
            A[r:r1] = H[r:r1]
        else:
            A[r:r1] = H.index_select(0, perm[r:r1]).index_select(1, perm)
    if not sym:
        _symmetrize_(A)
    if bool(dead.any()):
        d = dead if perm is None else dead[perm]
        A[d, :] = 0.0
        A[:, d] = 0.0
        A[d, d] = 1.0


def _reverse_(v: torch.Tensor, chunk: int = 1 << 18) -> None:
    """Reverse a contiguous 1-D tensor in place (for a row-major matrix: flip both axes),
    swapping slabs from both ends."""
    N = v.numel()
    h = N // 2
    for i in range(0, h, chunk):
        k = min(chunk, h - i)
        a, b = v[i:i + k], v[N - i - k:N - i]
        t = a.flip(0)
        a.copy_(b.flip(0))
        b.copy_(t)


def _symmetrize_(Hd: torch.Tensor) -> None:
    """``Hd ← (Hd + Hdᵀ)/2`` in place, tile by tile (same numbers, no n² temporary)."""
    n = Hd.shape[0]
    for i in range(0, n, _CHUNK):
        for j in range(i, n, _CHUNK):
            a = Hd[i:i + _CHUNK, j:j + _CHUNK]
            b = Hd[j:j + _CHUNK, i:i + _CHUNK]
            avg = (a + b.T) * 0.5
            a.copy_(avg)
            b.copy_(avg.T)


def _invert_lower_(L: torch.Tensor) -> None:
    """``L ← L⁻¹`` in place for a column-major lower-triangular ``L``.

    Solved a slab of identity columns at a time against the whole ``L``, in place in the
    slab (each column's solve is independent: the numbers are those of one full solve, for
    any slab width). Slab ``c`` only multiplies ``L``'s columns left of ``c`` by the zeros
    of its right-hand sides, so the columns already solved can hold their part of the
    inverse: one ``n × _SLAB`` scratch, no second ``n × n`` buffer."""
    n = L.shape[0]
    x = torch.empty(min(_SLAB, n), n, dtype=L.dtype, device=L.device).mT  # column-major
    for c in range(0, n, _SLAB):
        k = min(_SLAB, n - c)
        xs = x[:, :k]
        xs.zero_()
        xs[c:c + k].fill_diagonal_(1.0)
        torch.linalg.solve_triangular(L, xs, upper=False, out=xs)
        L[:, c:c + k] = xs


def _all_finite(X: torch.Tensor) -> bool:
    """``isfinite(X).all()`` a slab of rows at a time (``isfinite`` of a whole n² float
    matrix makes n² temporaries: |X| and three bool masks, 1.3 GB at n = 13824)."""
    return all(bool(torch.isfinite(X[r:r + _SLAB]).all()) for r in range(0, X.shape[0], _SLAB))


def _flip_to_float(L: torch.Tensor) -> torch.Tensor:
    """``flip(L)`` (both axes) as a row-major float32 matrix, written **into L's own
    buffer**: ``L`` is the column-major view ``A.mT`` of a contiguous float64 ``A``, so
    ``flip(L) = (J·A·J)ᵀ``: ``A`` is reversed in place, transposed in place tile by tile,
    then narrowed to float32 in place, a slab of rows at a time, front to back (float32
    row ``r`` lands on float64 rows ``r/2 …``, already read). The result is a view of the
    first half of ``A``'s storage: no second ``n × n`` buffer (0.76 GB at n = 13824); the
    values are the plain ``.float()`` of ``flip(L)``."""
    A = L.mT
    n = A.shape[0]
    assert A.is_contiguous() and A.dtype == torch.float64
    _reverse_(A.view(-1))
    for i in range(0, n, _SLAB):  # A ← Aᵀ
        a = A[i:i + _SLAB, i:i + _SLAB]
        a.copy_(a.T.clone())
        for j in range(i + _SLAB, n, _SLAB):
            a, b = A[i:i + _SLAB, j:j + _SLAB], A[j:j + _SLAB, i:i + _SLAB]
            t = a.clone()
            a.copy_(b.T)
            b.copy_(t.T)
    f32 = A.view(-1).view(torch.float32)  # 2n² float32 slots over the same bytes
    for r in range(0, n, _SLAB):
        r1 = min(r + _SLAB, n)
        f32[r * n:r1 * n] = A[r:r1].float().view(-1)
    return f32[:n * n].view(n, n)


def _release_tail(t: torch.Tensor) -> None:
    """Hand the pages of ``t``'s storage past ``t`` itself back to the OS (Linux
    ``madvise(MADV_DONTNEED)``; the storage stays valid, those bytes are never read again):
    the float64 half that :func:`_flip_to_float` leaves behind ``U`` stops counting in the
    resident set. A no-op off Linux, off the CPU or when libc cannot be called."""
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        madvise = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return
    page = os.sysconf("SC_PAGE_SIZE")
    st = t.untyped_storage()
    end_used = t.data_ptr() + t.numel() * t.element_size()
    a = (end_used + page - 1) // page * page
    e = (st.data_ptr() + st.nbytes()) // page * page
    if e > a:
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        madvise(a, e - a, 4)  # MADV_DONTNEED


# ---------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------
def hessian_loss(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row H-weighted error ``tr((Ŵ−W) H (Ŵ−W)ᵀ)`` restricted to each row: a float32
    vector ``[out]`` with ``loss[r] = (Ŵ−W)[r] · H · (Ŵ−W)[r]ᵀ``.

    ``H = XᵀX/n`` makes ``loss[r]`` the mean squared error of output ``r`` over the
    calibration inputs. Accumulated in float64 for accuracy; ``H`` is used as given (no
    damping).
    """
    if W.shape != What.shape or W.dim() != 2:
        raise ConfigError(f"W {tuple(W.shape)} and Ŵ {tuple(What.shape)} must be equal 2-D shapes")
    _check_hessian(H, W.shape[1])
    E = (What.detach().double() - W.detach().double())
    return ((E @ H.detach().double()) * E).sum(dim=1).float()


def hessian_error_terms(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor,
                        chunk: int = _SLAB) -> tuple[torch.Tensor, torch.Tensor]:
    """``tr(E H Eᵀ)`` and ``tr(W H Wᵀ)`` with ``E = Ŵ − W``, float64 scalars, for the
    H-weighted relative error of a whole layer.

    Computed over tiles of ``chunk`` rows of ``W`` × ``chunk`` columns of ``H``, each
    converted to float64 when used: never more than two ``chunk``-wide float64 slabs, where
    the direct ``(E @ H.double()) * E`` holds ``H`` and four ``[out, in]`` matrices in
    float64 (for 5120 × 13824: 3.8 GB). The sums run in another order than the direct
    formula (a report, not a result: equal to ~1e-12 relative)."""
    out, n = W.shape
    num = torch.zeros((), dtype=torch.float64, device=W.device)
    den = torch.zeros((), dtype=torch.float64, device=W.device)
    H = H.detach()
    for r in range(0, out, chunk):
        r1 = min(r + chunk, out)
        Wr = W.detach()[r:r1].double()
        Er = What.detach()[r:r1].double() - Wr
        for c in range(0, n, chunk):
            c1 = min(c + chunk, n)
            Hc = H[:, c:c1].double()
            num += ((Er @ Hc) * Er[:, c:c1]).sum()
            den += ((Wr @ Hc) * Wr[:, c:c1]).sum()
    return num, den


# ---------------------------------------------------------------------------------------
# the error-feedback loop
# ---------------------------------------------------------------------------------------
def _as_factor(H: Union[torch.Tensor, HessianFactor], in_features: int,
               damp: float) -> HessianFactor:
    if isinstance(H, HessianFactor):
        if H.in_features != in_features:
            raise ConfigError(f"the Hessian factor is for {H.in_features} inputs, W has "
                              f"{in_features}")
        return H
    _check_hessian(H, in_features)
    return prepare_hessian(H, damp=damp)


def gptq_round_fixed_grid(W: torch.Tensor, H: Union[torch.Tensor, HessianFactor],
                          scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                          *, damp: float = DEFAULT_DAMP,
                          block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """GPTQ error-feedback rounding onto a **fixed** grid: codes int8 ``[out, in]``.

    ``scale``/``zero`` float ``[out, n_groups]`` define the grid ``W ≈ s·q + z`` per group
    (``g(k) = k // group_size``; ``-1`` is per-channel) and are not changed. ``H`` is either
    the raw Hessian ``[in, in]`` (damped by ``damp`` × mean diag and factorised here) or a
    :class:`HessianFactor` from :func:`prepare_hessian` — pass the factor when rounding the
    same layer repeatedly (decoupleQ's integer step) to factorise once; a factor built with
    act-order processes columns in its ``perm`` order. Codes are always returned in natural
    column order. Dead inputs (``diag H == 0``) are rounded as weight 0. ``W`` is not
    modified. With ``H = I`` this is plain round-to-nearest on the grid.
    """
    _check_weight(W)
    check_bits(bits)
    check_group_size(group_size)
    out, n = W.shape
    ng = num_groups(group_size, n)
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != (out, ng):
            raise ConfigError(f"{name} has shape {tuple(t.shape)}, expected {(out, ng)} for "
                              f"W {tuple(W.shape)} at group size {group_size}")
    if not bool((scale > 0).all()):
        raise ConfigError("scale must be positive everywhere")
    if block_size < 1:
        raise ConfigError(f"block_size must be positive, got {block_size}")
    factor = _as_factor(H, n, damp)
    gs = effective_group_size(group_size, n)
    Wt = W.detach().to(torch.float32).T.contiguous()
    Wt[factor.dead] = 0.0
    col_group = torch.arange(n, device=W.device) // gs
    if factor.perm is not None:
        Wt = Wt[factor.perm.to(W.device)]
        col_group = col_group[factor.perm.to(W.device)]
    codes, _ = feedback_round(Wt, factor.U.to(W.device), bits, col_group,
                              scale.detach().float().T.contiguous(),
                              zero.detach().float().T.contiguous(), block_size)
    if factor.perm is not None:
        codes = codes[:, torch.argsort(factor.perm.to(W.device))]
    return codes


# ---------------------------------------------------------------------------------------
# clipping search
# ---------------------------------------------------------------------------------------
def _clip_search(Wg: torch.Tensor, M: torch.Tensor, bits: int, sym: bool,
                 param_dtype: torch.dtype, grid: tuple[float, ...], metric: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row shrink factor for one group: ``Wg`` ``[out, glen]``; returns ``scale, zero``
    ``[out]``. ``metric == "block"``: error ``e M eᵀ`` with ``M = H_GG``; ``"schur"``:
    ``‖e M⁻¹‖²`` with ``M`` the group's block of ``U`` (the error left after later columns
    compensate optimally, as GPTQ does)."""
    qmin, qmax = qrange(bits)

    def params(c: float) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = minmax_params(Wg, bits, -1, sym=sym, clip=c, param_dtype=param_dtype)
        return s[:, 0], z[:, 0]

    best = clip_search(Wg, qmin, qmax, grid, params,
                       schur_error(M) if metric == "schur" else hessian_block_error(M))
    assert best is not None
    return best


def _static_params(W: torch.Tensor, H: torch.Tensor, dead: torch.Tensor, spec: QuantSpec,
                   clip_grid: Optional[tuple[float, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Group parameters from ``W`` up front (natural order), optionally H-weighted clipping
    with each group's diagonal block of ``H`` (float32, dead inputs' diagonal set to 1; made
    per block, never as a whole n x n copy). Returns ``[out, n_groups]`` each."""
    if clip_grid is None:
        return minmax_params(W, spec.bits, spec.group_size, sym=spec.sym,
                             param_dtype=spec.torch_param_dtype)
    n = W.shape[1]
    gs = effective_group_size(spec.group_size, n)
    ss, zz = [], []
    for k0 in range(0, n, gs):
        k1 = min(k0 + gs, n)
        Hb = H[k0:k1, k0:k1].detach().float().clone()
        d = dead[k0:k1].to(Hb.device)
        Hb[d, d] = 1.0
        s, z = _clip_search(W[:, k0:k1], Hb, spec.bits, spec.sym,
                            spec.torch_param_dtype, clip_grid, "block")
        ss.append(s)
        zz.append(z)
    return torch.stack(ss, 1), torch.stack(zz, 1)


# ---------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------
def _options(spec: QuantSpec) -> dict[str, Any]:
    o = Options(spec, "GPTQ", _KNOWN_OPTIONS)
    return {"damp": o.number("damp", DEFAULT_DAMP),
            "block_size": o.integer("block_size", DEFAULT_BLOCK_SIZE),
            "act_order": o.flag("act_order", False), "clip_search": o.flag("clip_search", False),
            "clip_grid": o.factors("clip_grid", DEFAULT_CLIP_GRID)}


def gptq(W: torch.Tensor, H: Optional[torch.Tensor], spec: QuantSpec) -> QuantizedWeight:
    """The GPTQ pass: ``W`` float ``[out, in]`` (not modified), ``H = XᵀX/n`` ``[in, in]``.

    ``spec.options``: ``damp`` (0.01, relative to mean diag H), ``block_size`` (128),
    ``act_order`` (False; static groups, natural-order output), ``clip_search`` (False),
    ``clip_grid`` (1.0, 0.95, …, 0.5). Unknown options raise :class:`ConfigError`.
    Returns a :class:`QuantizedWeight` in natural column order whose parameters are exact
    in ``spec.param_dtype``.
    """
    H = checked_layer(W, H, "GPTQ")
    out, n = W.shape
    opts = _options(spec)
    bits, group_size = spec.bits, spec.group_size
    gs = effective_group_size(group_size, n)
    ng = num_groups(group_size, n)
    dev = W.device

    factor = prepare_hessian(H, damp=opts["damp"], act_order=opts["act_order"])
    Wf = W.detach().to(torch.float32).clone()
    Wf[:, factor.dead] = 0.0
    clip_grid = opts["clip_grid"] if opts["clip_search"] else None
    U = factor.U.to(dev)
    col_group = torch.arange(n, device=dev) // gs
    # dynamic groups: natural order with more than one group per row
    dynamic = factor.perm is None and ng > 1

    if not dynamic:
        scale, zero = _static_params(Wf, H, factor.dead, spec, clip_grid)
        if spec.integer_zeros and not spec.sym:
            scale, zero = integer_zero_params(scale, zero, bits, spec.torch_param_dtype)
        Wt = Wf.T.contiguous()
        if factor.perm is not None:
            Wt = Wt[factor.perm]
            col_group = col_group[factor.perm]
        codes, _ = feedback_round(Wt, U, bits, col_group, scale.T.contiguous(),
                                  zero.T.contiguous(), opts["block_size"])
        if factor.perm is not None:
            codes = codes[:, torch.argsort(factor.perm)]
        return QuantizedWeight(codes, scale, zero, bits, group_size)

    scale_t = torch.empty(ng, out, dtype=torch.float32, device=dev)
    zero_t = torch.empty(ng, out, dtype=torch.float32, device=dev)

    def hook(g: int, k0: int, k1: int, Wg: torch.Tensor, Ug: Optional[torch.Tensor],
             _keep: Optional[torch.Tensor]) -> None:
        Wg = Wg.T
        if clip_grid is None:
            s, z = minmax_params(Wg, bits, -1, sym=spec.sym, param_dtype=spec.torch_param_dtype)
            s, z = s[:, 0], z[:, 0]
        else:
            s, z = _clip_search(Wg, Ug, bits, spec.sym, spec.torch_param_dtype, clip_grid,
                                "schur")
        if spec.integer_zeros and not spec.sym:
            s, z = integer_zero_params(s, z, bits, spec.torch_param_dtype)
        scale_t[g] = s
        zero_t[g] = z

    codes, _ = feedback_round(Wf.T.contiguous(), U, bits, col_group, scale_t, zero_t,
                              opts["block_size"], group_len=gs, group_hook=hook)
    return QuantizedWeight(codes, scale_t.T.contiguous(), zero_t.T.contiguous(), bits,
                           group_size)
