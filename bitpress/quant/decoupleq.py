"""decoupleQ layer solver: alternate an integer step and an exact float step.

The weight of a linear is ``Ŵ[r, k] = s[r, g(k)] · Q[r, k] + z[r, g(k)]`` with signed codes
``Q`` in ``[-2^(b-1), 2^(b-1)-1]``. Rows are independent given ``H = XᵀX/n``; the solver
minimises, per row, ``L_r = (Ŵ_r − W_r) H (Ŵ_r − W_r)ᵀ`` by alternating:

* **integer step** (``s, z`` fixed): GPTQ error-feedback rounding onto the fixed grid
  (:func:`bitpress.quant.gptq_round_fixed_grid`, the damped Hessian factorised once per
  layer), or — ``options["int_step"] = "pgd"`` — accelerated projected gradient on the
  box-relaxed QP ``min_{q ∈ [qmin, qmax]^n} L(q)`` followed by rounding
  (:func:`box_relaxed_codes`);
* **float step** (``Q`` fixed): the exact least-squares optimum of all ``(s, z)`` of a row
  jointly. With ``θ = (s_1..s_G, z_1..z_G)`` the row is ``Ŵ_r = A_r θ`` and the normal
  equations ``(A_rᵀ H A_r) θ = A_rᵀ H w_r`` have size ``2G``. Their blocks come from the
  group-block structure of ``H`` (columns padded to ``G·gs`` with zeros so the short last
  group needs no special case), never from ``[rows, groups, in]`` buffers:

  - ``s–s``: ``M_ss[r, g, h] = Q_{r,g} H_{gh} Q_{r,h}ᵀ``. For each group ``h``:
    ``P = Q[:, h] @ H[h, h0:]`` (one ``[rows, gs] × [gs, in − h0]`` GEMM), then the group
    sums of ``Q[:, h0:] ⊙ P`` give column ``h`` (and by symmetry row ``h``) for groups
    ``≥ h``. In total one ``Q @ H``-sized GEMM (half of it, by symmetry);
  - ``s–z``: ``M_sz[r, g, h] = Σ_{k∈g} Q[r, k] B[k, h]`` with ``B = H E`` (``E`` the
    ``[in, G]`` group indicator): one batched ``[G, rows, gs] × [G, gs, G]`` product;
  - ``z–z``: ``EᵀHE``, shared by all rows;
  - right-hand side: group sums of ``Q ⊙ (W H)`` and of ``W H`` (``W H`` computed once).

  The systems are solved batched over rows in float64 by Cholesky for the update from the
  current ``θ`` with a tiny relative ridge (``1e-10 · diag``), which keeps unidentifiable
  directions — a group whose codes are all equal makes ``s`` and ``z`` collinear — at their
  current values. Rows whose factorisation still fails are retried with ×1000 more ridge
  (counted in :attr:`DecoupleQReport.ls_fallbacks` and logged); rows that fail every retry
  keep their current parameters (counted in ``ls_failures``, logged as a warning).
  A negative least-squares scale is represented exactly by flipping the group's codes
  (``s' = −s``, ``Q' = −Q − 1``, ``z' = z − s``). Scales are then rounded to the on-disk
  parameter dtype, the offsets re-solved exactly for the rounded scales (a ``G × G``
  system shared by all rows) and rounded too, and the loss of exactly the stored
  ``(Q, s, z)`` is evaluated (from the same normal equations, in float64).

* **per-row acceptance**: a row takes the new ``(Q, s, z)`` only if its loss decreased, so
  the loss never increases. A row that rejects a candidate has converged (the next integer
  step would see the same grid and return the same codes), so later alternations only
  visit the rows still improving.

Integer zero points (``spec.integer_zeros``): every offset is ``z = -zp·s`` with an integer
``zp`` in the code range and ``s``, ``zp·s`` exact in the parameter dtype, so the checkpoint
exports to compressed-tensors without rounding. The initial grid's zero points are rounded
into the code range, and the float step solves for the scales only, for the rounded zero
point of the unconstrained optimum and for the current one (see ``_Problem._integer_params``);
the integer step is unchanged (it rounds onto whatever grid it is given).

Initialisation: per group and row an H-weighted clipping search over min/max grids
(shrink factors ``options["clip_grid"]``, error ``e H_gg eᵀ`` on the group's diagonal
block), then both round-to-nearest and GPTQ rounding on that grid; the float step is run
for both and each row keeps the best of the four ``(codes, params)`` candidates.

Diagnostics: :func:`decoupleq_solve` returns a :class:`DecoupleQReport` (total loss after the
initialisation and after each alternation, accepted/active rows, fallbacks, seconds);
:func:`decoupleq` (the registered pass) accepts ``log=callable`` which is called with one
dict per stage: ``{"stage": "init" | "iter", "iter": k, "loss_before", "loss_after",
"active", "accepted", "seconds"}`` (``loss_*`` summed over rows, ``H``-metric).

``spec.options``: ``iters`` (4), ``int_step`` (``"gptq"`` | ``"pgd"``), ``pgd_steps`` (50),
``damp`` (0.01, the GPTQ factor's relative damping; the objective itself uses ``H`` as
given), ``block_size`` (64, the feedback loop's lazy-update block), ``clip_grid`` (1.0, 0.95, …,
0.5 for group-wise, 1.0, 0.9, …, 0.6 for per-channel; ``[1.0]`` disables the search), ``row_chunk`` (rows per float-step chunk; default: chosen
to keep each chunk's buffers near 64 MiB), ``init_ls_rtn`` (False: the RTN codes get their
float step only on rows where RTN beats GPTQ; True: on every row).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..errors import ConfigError
from ..formats import (QuantizedWeight, check_bits, check_group_size, effective_group_size,
                       integer_zero_params, integer_zero_scale, minmax_params, num_groups,
                       qrange, zero_points)
from .gptq import (DEFAULT_CLIP_GRID, DEFAULT_DAMP, HessianFactor, _check_hessian,
                   _check_weight, _symmetrize_, checked_layer, gptq_round_fixed_grid,
                   prepare_hessian)
from .clip import clip_search
from .spec import QuantSpec

log = logging.getLogger(__name__)

DEFAULT_ITERS = 4
DEFAULT_PGD_STEPS = 50
RIDGE = 1e-10            # relative ridge of the float step (× diag of the normal matrix)
RIDGE_RETRIES = 3        # each ×1000
CHUNK_BYTES = 64 << 20
COARSE_CLIP_GRID = (1.0, 0.9, 0.8, 0.7, 0.6)
FEEDBACK_BLOCK = 64      # lazy-update block of the transposed feedback loop

_KNOWN_OPTIONS = {"iters", "int_step", "pgd_steps", "damp", "block_size", "clip_grid",
                  "row_chunk", "init_ls_rtn"}

LogFn = Callable[[dict[str, Any]], None]


@dataclass
class DecoupleQReport:
    """What the solver did. Losses are ``Σ_r L_r`` in the ``H`` metric (``H`` as given)."""
    init_losses: dict[str, float] = field(default_factory=dict)  # "rtn", "gptq", "init"
    losses: list[float] = field(default_factory=list)   # [after init, after iter 1, ...]
    active: list[int] = field(default_factory=list)     # rows visited per alternation
    accepted: list[int] = field(default_factory=list)   # rows improved per alternation
    ls_fallbacks: int = 0     # row systems that needed a larger ridge
    ls_failures: int = 0      # row systems that failed every retry (kept their params)
    seconds: dict[str, float] = field(default_factory=dict)
    row_loss: Optional[torch.Tensor] = None   # float64 [out], final per-row loss


# ---------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------
def _options(spec: QuantSpec) -> dict[str, Any]:
    opts = dict(spec.options or {})
    unknown = set(opts) - _KNOWN_OPTIONS
    if unknown:
        raise ConfigError(f"unknown decoupleQ option(s) {sorted(unknown)}; known: "
                          f"{sorted(_KNOWN_OPTIONS)}")

    def _int(key: str, default: int, lo: int) -> int:
        v = opts.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"decoupleQ option {key!r} must be an integer >= {lo}, got {v!r}")
        return v

    iters = _int("iters", DEFAULT_ITERS, 0)
    pgd_steps = _int("pgd_steps", DEFAULT_PGD_STEPS, 1)
    block_size = _int("block_size", FEEDBACK_BLOCK, 1)
    row_chunk = opts.get("row_chunk")
    if row_chunk is not None:
        row_chunk = _int("row_chunk", 0, 1)
    int_step = opts.get("int_step", "gptq")
    if int_step not in ("gptq", "pgd"):
        raise ConfigError(f"decoupleQ option 'int_step' must be 'gptq' or 'pgd', got {int_step!r}")
    damp = opts.get("damp", DEFAULT_DAMP)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
        raise ConfigError(f"decoupleQ option 'damp' must be a non-negative number, got {damp!r}")
    init_ls_rtn = opts.get("init_ls_rtn", False)
    if not isinstance(init_ls_rtn, bool):
        raise ConfigError(f"decoupleQ option 'init_ls_rtn' must be true or false, got "
                          f"{init_ls_rtn!r}")
    grid = opts.get("clip_grid", None)
    if grid is None:      # resolved per layer (finer for group-wise, coarser per-channel)
        return {"iters": iters, "int_step": int_step, "pgd_steps": pgd_steps,
                "damp": float(damp), "block_size": block_size, "clip_grid": None,
                "row_chunk": row_chunk, "init_ls_rtn": init_ls_rtn}
    try:
        grid = tuple(float(c) for c in grid)
    except (TypeError, ValueError):
        raise ConfigError(f"decoupleQ option 'clip_grid' must be a list of numbers, got "
                          f"{grid!r}") from None
    if not grid or not all(0.0 < c <= 1.0 for c in grid):
        raise ConfigError(f"decoupleQ option 'clip_grid' must be non-empty with factors in "
                          f"(0, 1], got {grid!r}")
    return {"iters": iters, "int_step": int_step, "pgd_steps": pgd_steps, "damp": float(damp),
            "block_size": block_size, "clip_grid": grid, "row_chunk": row_chunk,
            "init_ls_rtn": init_ls_rtn}


# ---------------------------------------------------------------------------------------
# the layer problem (padded, float64) and the float step
# ---------------------------------------------------------------------------------------
def _param_round(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return t if dtype is None else t.to(dtype).to(torch.float64)


def _tiny(dtype: Optional[torch.dtype]) -> float:
    return float(torch.finfo(torch.float16).tiny) if dtype == torch.float16 else 1e-12


def grouped_normal_pieces(obj: Any, W: torch.Tensor, H: torch.Tensor, group_size: int) -> None:
    """Set on ``obj`` the layer-wide pieces of the per-row least-squares problems over the
    group parameters (used by decoupleQ's float step and GQSA's masked refit): the
    symmetrised ``H`` padded to ``N = G·gs`` columns in float64 (``Hp``), the group sums
    ``B = H E`` [N, G] and ``Zz = Eᵀ H E`` [G, G], ``WH = W H`` [out, N], ``c = wᵀHw`` [out]
    and ``bz = W H E`` [out, G] (``W`` padded to float64 only while these are made); plus
    ``out, n, gs, G, N``."""
    out, n = W.shape
    obj.out, obj.n = out, n
    obj.gs = gs = effective_group_size(group_size, n)
    obj.G = G = num_groups(group_size, n)
    obj.N = N = G * gs
    pad = N - n
    Hd = H.detach().to(torch.float64)
    if Hd is H or Hd.data_ptr() == H.data_ptr():
        Hd = Hd.clone()  # a float64 H: symmetrised on a copy, the caller's is left as given
    _symmetrize_(Hd)  # (Hd + Hdᵀ)/2 in place, tile by tile: the same numbers, no n² temporaries
    obj.Hp = torch.nn.functional.pad(Hd, (0, pad, 0, pad)) if pad else Hd
    obj.B = obj.Hp.view(N, G, gs).sum(-1)
    obj.Zz = obj.B.view(G, gs, G).sum(1)
    Wp = W.detach().to(torch.float64)  # [out, N] float64: made for WH and c, then dropped
    Wp = torch.nn.functional.pad(Wp, (0, pad)) if pad else Wp
    obj.WH = Wp @ obj.Hp
    obj.c = (Wp * obj.WH).sum(1)
    obj.bz = obj.WH.view(out, G, gs).sum(-1)


class _Problem:
    """``W``, ``H`` padded to ``N = G·gs`` columns (zeros) in float64, with the shared pieces
    of the normal equations."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool,
                 param_dtype: Optional[torch.dtype], row_chunk: Optional[int],
                 integer_zeros: bool = False) -> None:
        grouped_normal_pieces(self, W, H, group_size)
        out, G, N = self.out, self.G, self.N
        self.bits = bits
        self.sym = sym
        self.integer_zeros = integer_zeros and not sym
        self.param_dtype = param_dtype
        self.tiny = _tiny(param_dtype)
        # offsets given scales: (Zz + ridge) z = bz − M_szᵀ s, one factorisation for all rows
        dz = torch.diagonal(self.Zz).clamp(min=0)
        dz = dz + 1e-300 + 1e-12 * float(dz.mean()) if G else dz
        self.Lz = None
        if not sym:
            for k in range(RIDGE_RETRIES + 1):
                L, info = torch.linalg.cholesky_ex(self.Zz + (RIDGE * 1000 ** k) * torch.diag(dz))
                if int(info) == 0:
                    self.Lz = L
                    break
            if self.Lz is None:  # pragma: no cover - H PSD makes this unreachable
                raise ConfigError("decoupleQ: the group-sum block of H is not positive "
                                  "semidefinite; check the calibration Hessian")
        per_row = 8 * (3 * N + 6 * (2 * G) ** 2 + 4 * G * G)
        self.row_chunk = row_chunk or max(1, min(out, CHUNK_BYTES // per_row))
        self.ls_fallbacks = 0
        self.ls_failures = 0

    def pad_codes(self, Q: torch.Tensor) -> torch.Tensor:
        Qd = Q.to(torch.float64)
        pad = self.N - self.n
        return torch.nn.functional.pad(Qd, (0, pad)) if pad else Qd

    # ---- normal equations ------------------------------------------------------------
    def normal_equations(self, Qp: torch.Tensor, rows: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``M_ss [R, G, G]``, ``M_sz [R, G, G]``, ``b_s [R, G]`` for padded codes ``Qp``."""
        R = Qp.shape[0]
        G, gs, N = self.G, self.gs, self.N
        ss = torch.empty(R, G, G, dtype=torch.float64, device=Qp.device)
        for h in range(G):
            h0, h1 = h * gs, (h + 1) * gs
            P = Qp[:, h0:h1] @ self.Hp[h0:h1, h0:]                     # [R, N − h0]
            col = (Qp[:, h0:] * P).view(R, G - h, gs).sum(-1)          # groups h..G-1
            ss[:, h:, h] = col
            ss[:, h, h:] = col
        Qg = Qp.view(R, G, gs)
        sz = torch.bmm(Qg.transpose(0, 1), self.B.view(G, gs, G)).transpose(0, 1)  # [R, G, G]
        bs = (Qg * self.WH[rows].view(R, G, gs)).sum(-1)
        return ss, sz, bs

    def loss(self, ss: torch.Tensor, sz: torch.Tensor, bs: torch.Tensor, rows: torch.Tensor,
             s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per-row ``θᵀMθ − 2bᵀθ + wᵀHw`` (float64)."""
        quad = (s * torch.einsum("rgh,rh->rg", ss, s)).sum(1)
        quad = quad + 2 * (s * torch.einsum("rgh,rh->rg", sz, z)).sum(1)
        quad = quad + (z * (z @ self.Zz)).sum(1)
        lin = (bs * s).sum(1) + (self.bz[rows] * z).sum(1)
        return (quad - 2 * lin + self.c[rows]).clamp(min=0.0)

    def _solve(self, M: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ridge-regularised batched solve; returns (solution, ok mask)."""
        R, m, _ = M.shape
        d = torch.diagonal(M, dim1=1, dim2=2).clamp(min=0)
        d = d + 1e-300 + 1e-12 * d.mean(1, keepdim=True)
        x = torch.zeros_like(rhs)
        todo = torch.arange(R, device=M.device)
        for k in range(RIDGE_RETRIES + 1):
            A = M[todo] + torch.diag_embed((RIDGE * 1000 ** k) * d[todo])
            L, info = torch.linalg.cholesky_ex(A)
            good = info == 0
            if bool(good.any()):
                idx = todo[good]
                sol = torch.cholesky_solve(rhs[idx].unsqueeze(-1), L[good]).squeeze(-1)
                fin = torch.isfinite(sol).all(1)
                x[idx[fin]] = sol[fin]
                good_idx = good.nonzero().squeeze(1)
                good[good_idx[~fin]] = False
            todo = todo[~good]
            if todo.numel() == 0:
                break
            if k < RIDGE_RETRIES:
                self.ls_fallbacks += int(todo.numel())
                log.info("decoupleQ: %d normal-equation systems needed a larger ridge (%.0e)",
                         todo.numel(), RIDGE * 1000 ** (k + 1))
        ok = torch.ones(R, dtype=torch.bool, device=M.device)
        if todo.numel():
            ok[todo] = False
            self.ls_failures += int(todo.numel())
            log.warning("decoupleQ: %d rows' normal equations could not be solved even with "
                        "ridge %.0e; those rows keep their current parameters", todo.numel(),
                        RIDGE * 1000 ** RIDGE_RETRIES)
        return x, ok

    def float_step(self, Q: torch.Tensor, rows: torch.Tensor, s0: torch.Tensor,
                   z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor, torch.Tensor]:
        """Least-squares ``(s, z)`` for codes ``Q [R, n]`` (rows ``rows`` of the layer), rounded to
        the parameter dtype. Returns ``(codes, s, z, loss_new, loss_at(s0, z0))`` with
        ``s, z`` float64 ``[R, G]`` exact in the parameter dtype and codes possibly flipped per
        group (negative scales)."""
        R = Q.shape[0]
        G = self.G
        outs = []
        for a in range(0, R, self.row_chunk):
            b = min(a + self.row_chunk, R)
            outs.append(self._float_chunk(Q[a:b], rows[a:b], s0[a:b], z0[a:b]))
        return tuple(torch.cat([o[i] for o in outs], 0) for i in range(5))  # type: ignore

    def _float_chunk(self, Q, rows, s0, z0):
        G = self.G
        Qp = self.pad_codes(Q)
        ss, sz, bs = self.normal_equations(Qp, rows)
        bz = self.bz[rows]
        loss0 = self.loss(ss, sz, bs, rows, s0, z0)
        R = Q.shape[0]
        if self.sym:
            M, rhs = ss, bs - torch.einsum("rgh,rh->rg", ss, s0)
            theta0 = s0
        else:
            Zz = self.Zz.expand(R, G, G)
            M = torch.cat([torch.cat([ss, sz], 2), torch.cat([sz.transpose(1, 2), Zz], 2)], 1)
            theta0 = torch.cat([s0, z0], 1)
            rhs = torch.cat([bs, bz], 1) - torch.einsum("rij,rj->ri", M, theta0)
        delta, ok = self._solve(M, rhs)
        theta = theta0 + delta
        s = theta[:, :G]
        if self.integer_zeros:
            return self._integer_params(Q, rows, ss, sz, bs, bz, s, theta[:, G:], s0, z0, ok,
                                        loss0)
        tiny = self.tiny
        if self.sym:
            # a negative scale is representable exactly only by Q → −Q, i.e. when the group
            # has no code at qmin (the signed range is asymmetric); otherwise it is clamped
            # to the smallest positive scale and the (exact) loss decides acceptance
            hm = Q == qrange(self.bits)[0]
            if self.N > self.n:
                hm = torch.nn.functional.pad(hm, (0, self.N - self.n))
            has_min = hm.view(R, G, self.gs).any(-1)
            flip = (s < 0) & ~has_min
            sigma = torch.where(flip, -1.0, 1.0).to(torch.float64)
            s_st = _param_round((s * sigma).clamp(min=tiny), self.param_dtype)
            z_st = torch.zeros_like(s_st)
            loss = self.loss(ss, sz, bs, rows, sigma * s_st, z_st)
            codes = Q
            if bool(flip.any()):
                fx = flip.repeat_interleave(self.gs, dim=1)[:, :self.n]
                codes = torch.where(fx, -Q.to(torch.int16), Q.to(torch.int16)).to(torch.int8)
        else:
            flip = s < 0
            sigma = torch.where(flip, -1.0, 1.0).to(torch.float64)
            s_st = _param_round(s.abs().clamp(min=tiny), self.param_dtype)   # stored scale
            s_or = sigma * s_st                                              # scale for Q
            # exact offsets for the rounded scales: Zz z = bz − M_szᵀ s
            rz = bz - torch.einsum("rgh,rg->rh", sz, s_or)
            z_or = torch.cholesky_solve(rz.T.contiguous(), self.Lz).T
            z_st = _param_round(torch.where(flip, z_or - s_or, z_or), self.param_dtype)
            z_or = torch.where(flip, z_st + s_or, z_st)
            loss = self.loss(ss, sz, bs, rows, s_or, z_or)
            codes = Q
            if bool(flip.any()):
                fx = flip.repeat_interleave(self.gs, dim=1)[:, :self.n]
                codes = torch.where(fx, -Q.to(torch.int16) - 1, Q.to(torch.int16)).to(torch.int8)
        bad = ~ok | ~torch.isfinite(loss) | ~torch.isfinite(s_st).all(1) | ~torch.isfinite(z_st).all(1)
        loss = torch.where(bad, torch.full_like(loss, math.inf), loss)
        return codes, s_st, z_st, loss, loss0

    def _integer_params(self, Q, rows, ss, sz, bs, bz, s_ls, z_ls, s0, z0, ok, loss0):
        """The float step with integer zero points (``spec.integer_zeros``): ``z = -zp·s``,
        ``zp`` an integer in the code range. Two candidates per group: the rounded zero
        point of the unconstrained least squares ``(s_ls, z_ls)`` and the current one
        (from ``s0, z0``); for each, the scales are the exact least-squares optimum of
        ``Ŵ_r = Σ_g s_g (Q_g − zp_g)`` (a ``G × G`` system per row, from the same normal
        pieces), then snapped so that ``s`` and ``zp·s`` are exact in the parameter dtype
        (:func:`~bitpress.formats.integer_zero_scale`); each row keeps the candidate with
        the smaller exact loss. A negative scale is stored by flipping the group's codes
        (``Q' = −Q − 1``, ``zp' = −zp − 1``, still in the code range)."""
        G, R = self.G, Q.shape[0]
        best = None
        for zp in (zero_points(s_ls, z_ls, self.bits), zero_points(s0, z0, self.bits)):
            M = (ss - sz * zp[:, None, :] - sz.transpose(1, 2) * zp[:, :, None]
                 + zp[:, :, None] * zp[:, None, :] * self.Zz)
            rhs = bs - zp * bz - torch.einsum("rgh,rh->rg", M, s0)
            d, okc = self._solve(M, rhs)
            s = s0 + d
            flip = s < 0
            sigma = torch.where(flip, -1.0, 1.0).to(torch.float64)
            zp_st = torch.where(flip, -zp - 1, zp)
            s_st = integer_zero_scale(s.abs(), zp_st, self.param_dtype)
            z_st = -zp_st * s_st
            z_st = torch.where(z_st == 0, torch.zeros_like(z_st), z_st)
            s_or = sigma * s_st
            loss = self.loss(ss, sz, bs, rows, s_or, -s_or * zp)
            bad = ~ok | ~okc | ~torch.isfinite(loss)
            loss = torch.where(bad, torch.full_like(loss, math.inf), loss)
            if best is None:
                best = [flip, s_st, z_st, loss]
            else:
                b = loss < best[3]
                for i, t in enumerate((flip, s_st, z_st, loss)):
                    best[i] = torch.where(b[:, None] if t.dim() == 2 else b, t, best[i])
        flip, s_st, z_st, loss = best
        codes = Q
        if bool(flip.any()):
            fx = flip.repeat_interleave(self.gs, dim=1)[:, :self.n]
            codes = torch.where(fx, -Q.to(torch.int16) - 1, Q.to(torch.int16)).to(torch.int8)
        return codes, s_st, z_st, loss, loss0


def least_squares_params(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, bits: int,
                         group_size: int, sym: bool = False, param_dtype: Optional[torch.dtype] = torch.float16,
                         scale0: Optional[torch.Tensor] = None,
                         zero0: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """decoupleQ's float step on its own: the least-squares ``(s, z)`` of every row for fixed
    ``codes`` int8 ``[out, in]`` under ``tr((Ŵ−W) H (Ŵ−W)ᵀ)``.

    Returns ``(codes, scale, zero, row_loss)``: codes (groups with a negative optimal scale
    flipped, ``Q → −Q−1``), ``scale``/``zero`` float64 ``[out, n_groups]`` rounded to
    ``param_dtype`` (``None``: not rounded, the exact optimum), and the per-row loss of
    exactly that result (float64). With ``sym`` the offsets are 0 and a negative optimal
    scale is flipped (``Q → −Q``) only where the group has no code at ``qmin``.
    ``scale0``/``zero0`` (default 1 and 0) only pick the
    solution in directions the data leave undetermined (e.g. a group whose codes are equal).
    """
    _check_weight(W)
    out, n = W.shape
    _check_hessian(H, n)
    if codes.shape != W.shape:
        raise ConfigError(f"codes {tuple(codes.shape)} must match W {tuple(W.shape)}")
    check_bits(bits)
    check_group_size(group_size)
    P = _Problem(W.detach().float(), H, bits, group_size, sym, param_dtype, None)
    ng = P.G
    dev = W.device
    s0 = torch.ones(out, ng, dtype=torch.float64, device=dev) if scale0 is None \
        else scale0.double()
    z0 = torch.zeros(out, ng, dtype=torch.float64, device=dev) if zero0 is None \
        else zero0.double()
    q, s, z, loss, _ = P.float_step(codes.to(torch.int8), torch.arange(out, device=dev), s0, z0)
    return q, s, z, loss


# ---------------------------------------------------------------------------------------
# integer steps
# ---------------------------------------------------------------------------------------
def _expand(t: torch.Tensor, gs: int, n: int) -> torch.Tensor:
    return t.repeat_interleave(gs, dim=1)[:, :n]


def feedback_round_t(W: torch.Tensor, factor: HessianFactor, scale: torch.Tensor,
                     zero: torch.Tensor, bits: int, group_size: int,
                     block_size: int = FEEDBACK_BLOCK) -> torch.Tensor:
    """The integer step: GPTQ error-feedback rounding onto the fixed grid ``scale``/``zero``
    (:func:`bitpress.quant.gptq_round_fixed_grid`, the shared loop of
    :mod:`bitpress.quant.feedback`) with decoupleQ's lazy-update block. Returns codes int8
    ``[out, in]``."""
    return gptq_round_fixed_grid(W, factor, scale, zero, bits, group_size,
                                 block_size=block_size)


def box_relaxed_codes(W: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      bits: int, group_size: int, steps: int = DEFAULT_PGD_STEPS,
                      q0: Optional[torch.Tensor] = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Continuous codes ``q ∈ [qmin, qmax]^{out×in}`` minimising the box-relaxed QP
    ``Σ_r (s_r⊙q_r + z_r − w_r) H (…)ᵀ`` for fixed ``scale``/``zero`` ``[out, n_groups]``, by
    accelerated projected gradient (FISTA with gradient restart, step ``1 / L_r`` with
    ``L_r = 2 max_k s_rk² λmax(H)``). Starts from ``q0`` (default: the unclamped nearest
    codes ``(w − z)/s`` projected on the box). Rounding is left to the caller."""
    qmin, qmax = qrange(bits)
    out, n = W.shape
    gs = effective_group_size(group_size, n)
    Hd = H.detach().to(dtype)
    Hd = (Hd + Hd.T) * 0.5
    lam = float(torch.linalg.eigvalsh(H.detach().double()).max().clamp(min=0.0))
    sx = _expand(scale.detach().to(dtype), gs, n)
    zx = _expand(zero.detach().to(dtype), gs, n)
    w = W.detach().to(dtype)
    Lr = 2.0 * (sx * sx).amax(1, keepdim=True) * lam
    step = torch.where(Lr > 0, 1.0 / Lr.clamp(min=1e-300), torch.zeros_like(Lr))
    q = ((w - zx) / sx).clamp(qmin, qmax) if q0 is None else q0.detach().to(dtype).clamp(qmin, qmax)
    y, t = q.clone(), 1.0
    for _ in range(steps):
        grad = 2.0 * sx * ((sx * y + zx - w) @ Hd)
        q_new = (y - step * grad).clamp(qmin, qmax)
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        # gradient restart (O'Donoghue & Candès) per row: momentum only while it helps
        restart = ((y - q_new) * (q_new - q)).sum(1, keepdim=True) > 0
        mom = (t - 1.0) / t_new
        y = torch.where(restart, q_new, q_new + mom * (q_new - q))
        q, t = q_new, t_new
    return q


# ---------------------------------------------------------------------------------------
# initialisation
# ---------------------------------------------------------------------------------------
def _clip_search_grid(Wz: torch.Tensor, P: _Problem, bits: int, sym: bool,
                      param_dtype: torch.dtype, grid: tuple[float, ...]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) shrink factor ``c`` of the min/max grid (as
    :func:`bitpress.formats.minmax_params` with ``clip=c``, parameters rounded to the on-disk
    dtype) minimising ``e H_gg eᵀ`` of round-to-nearest on the group's diagonal block of
    ``H``; returns ``scale, zero`` float32 ``[out, G]``. Works in the grouped view (the
    padded tail has ``H`` rows of zero, so it never counts)."""
    qmin, qmax = qrange(bits)
    out, n = Wz.shape
    G, gs = P.G, P.gs
    group_arg = gs if G > 1 else -1
    if len(grid) == 1:
        return minmax_params(Wz, bits, group_arg, sym=sym, clip=grid[0], param_dtype=param_dtype)
    s1, z1 = minmax_params(Wz, bits, group_arg, sym=sym, clip=1.0, param_dtype=None)
    if sym:
        amax = s1 * (-qmin)
    else:
        lo = z1 + s1 * qmin
        hi = lo + s1 * (qmax - qmin)
    tiny = torch.finfo(torch.float16).tiny if param_dtype == torch.float16 else 1e-12
    floor = max(tiny, 1e-8)
    Wg = (torch.nn.functional.pad(Wz.float(), (0, P.N - n)) if P.N > n else Wz.float()
          ).view(out, G, gs)
    ar = torch.arange(G, device=P.Hp.device)
    Hb = P.Hp.view(G, gs, G, gs)[ar, :, ar, :].to(torch.float32)        # [G, gs, gs]

    def params(c: float) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if sym:
            s = amax * c / (-qmin)
            z = torch.zeros_like(s)
        else:
            s = (hi - lo) * c / (qmax - qmin)
            z = lo * c - s * qmin
        s = torch.where(s > tiny, s, torch.full_like(s, floor))
        s, z = s.to(param_dtype).float(), z.to(param_dtype).float()
        if not bool(torch.isfinite(s).all() & torch.isfinite(z).all()):
            return None   # overflow in the parameter dtype: not a candidate
        return s, z

    def loss(E: torch.Tensor) -> torch.Tensor:                           # E [out, G, gs]
        Eg = E.transpose(0, 1)                                              # [G, out, gs]
        return (torch.bmm(Eg, Hb) * Eg).sum(-1).T                            # [out, G]

    best = clip_search(Wg, qmin, qmax, grid, params, loss)
    if best is None:
        return minmax_params(Wz, bits, group_arg, sym=sym, param_dtype=param_dtype)
    return best


# ---------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------
def decoupleq_solve(W: torch.Tensor, H: Optional[torch.Tensor], spec: QuantSpec,
                    log_fn: Optional[LogFn] = None
                    ) -> tuple[QuantizedWeight, DecoupleQReport]:
    """The decoupleQ layer solver with its :class:`DecoupleQReport` (see the module doc)."""
    H = checked_layer(W, H, "decoupleQ")
    out, n = W.shape
    opts = _options(spec)
    bits, group_size, sym = spec.bits, spec.group_size, spec.sym
    pdt = spec.torch_param_dtype
    qmin, qmax = qrange(bits)
    dev = W.device
    rep = DecoupleQReport()
    t_all = time.perf_counter()

    def emit(rec: dict[str, Any]) -> None:
        log.debug("decoupleQ %s", rec)
        if log_fn is not None:
            log_fn(rec)

    t0 = time.perf_counter()
    factor = prepare_hessian(H, damp=opts["damp"])
    dead = factor.dead.to(dev)
    Wz = W.detach().to(torch.float32).clone()
    Wz[:, dead] = 0.0          # dead inputs: any weight is lossless; 0 keeps grids tight
    P = _Problem(Wz, H, bits, group_size, sym, pdt, opts["row_chunk"], spec.integer_zeros)
    gs, G = P.gs, P.G
    group_arg = gs if G > 1 else -1
    rep.seconds["setup"] = time.perf_counter() - t0

    # ---- initialisation -----------------------------------------------------------------
    t0 = time.perf_counter()
    grid = opts["clip_grid"]
    if grid is None:
        # per-channel rows: every candidate costs a full [out, in] × [in, in] product, so
        # the default grid is coarser there (the float step refits s, z anyway)
        grid = DEFAULT_CLIP_GRID if G > 1 else COARSE_CLIP_GRID
    s0, z0 = _clip_search_grid(Wz, P, bits, sym, pdt, grid)
    if P.integer_zeros:  # the initial grid with its zero point rounded into the code range
        s0, z0 = integer_zero_params(s0, z0, bits, pdt)
    sx, zx = _expand(s0, gs, n), _expand(z0, gs, n)
    q_rtn = torch.clamp(torch.round((Wz - zx) / sx), qmin, qmax).to(torch.int8)
    q_gptq = feedback_round_t(Wz, factor, s0, z0, bits, group_arg,
                                   block_size=opts["block_size"])
    rows = torch.arange(out, device=dev)
    s0d, z0d = s0.double(), z0.double()
    # exact loss + least-squares candidate for the GPTQ codes; the RTN codes' loss in
    # float32 (a choice only), and their exact float step for the rows where RTN is better
    qg, sg, zg, lg_ls, l_gptq = P.float_step(q_gptq, rows, s0d, z0d)
    E = (q_rtn.float() * sx + zx - Wz)
    l_rtn = ((E @ H.float()) * E).double().sum(1)
    rep.init_losses = {"rtn": float(l_rtn.sum()), "gptq": float(l_gptq.sum())}
    Q, S, Z, L = q_gptq.clone(), s0d.clone(), z0d.clone(), l_gptq.clone()
    better = lg_ls < L
    Q[better], S[better], Z[better], L[better] = qg[better], sg[better], zg[better], lg_ls[better]
    ridx = rows if opts["init_ls_rtn"] else (l_rtn < l_gptq).nonzero().squeeze(1)
    init_exact = l_gptq.clone()
    if ridx.numel():
        qr, sr, zr, lr_ls, lr = P.float_step(q_rtn[ridx], ridx, s0d[ridx], z0d[ridx])
        init_exact[ridx] = torch.minimum(lr, l_gptq[ridx])
        for qc, sc, zc, lc in ((q_rtn[ridx], s0d[ridx], z0d[ridx], lr), (qr, sr, zr, lr_ls)):
            b = lc < L[ridx]
            i = ridx[b]
            Q[i], S[i], Z[i], L[i] = qc[b], sc[b], zc[b], lc[b]
    rep.init_losses["init"] = float(init_exact.sum())
    rep.init_losses["rtn_rows"] = int(ridx.numel())
    rep.losses.append(float(L.sum()))
    rep.seconds["init"] = time.perf_counter() - t0
    emit({"stage": "init", "iter": 0, "loss_before": rep.init_losses["init"],
          "loss_after": rep.losses[-1], "loss_rtn": rep.init_losses["rtn"],
          "loss_gptq": rep.init_losses["gptq"], "active": out, "accepted": out,
          "seconds": rep.seconds["init"]})

    # ---- alternations --------------------------------------------------------------------
    active = torch.ones(out, dtype=torch.bool, device=dev)
    t_int = t_flt = 0.0
    for it in range(1, opts["iters"] + 1):
        t0 = time.perf_counter()
        idx = active.nonzero().squeeze(1)
        loss_before = float(L.sum())
        if idx.numel() == 0:
            rep.losses.append(loss_before)
            rep.active.append(0)
            rep.accepted.append(0)
            emit({"stage": "iter", "iter": it, "loss_before": loss_before,
                  "loss_after": loss_before, "active": 0, "accepted": 0, "seconds": 0.0})
            continue
        Sa, Za = S[idx].float(), Z[idx].float()
        ta = time.perf_counter()
        if opts["int_step"] == "gptq":
            qa = feedback_round_t(Wz[idx], factor, Sa, Za, bits, group_arg,
                                       block_size=opts["block_size"])
        else:
            qc = box_relaxed_codes(Wz[idx], H, Sa, Za, bits, group_arg, steps=opts["pgd_steps"],
                                   q0=Q[idx].float())
            qa = torch.round(qc).clamp(qmin, qmax).to(torch.int8)
        tb = time.perf_counter()
        qn, sn, zn, ln, _ = P.float_step(qa, idx, S[idx], Z[idx])
        t_int += tb - ta
        t_flt += time.perf_counter() - tb
        better = ln < L[idx]
        acc = idx[better]
        Q[acc] = qn[better]
        S[acc] = sn[better]
        Z[acc] = zn[better]
        L[acc] = ln[better]
        active = torch.zeros_like(active)
        active[acc] = True
        rep.losses.append(float(L.sum()))
        rep.active.append(int(idx.numel()))
        rep.accepted.append(int(acc.numel()))
        emit({"stage": "iter", "iter": it, "loss_before": loss_before,
              "loss_after": rep.losses[-1], "active": int(idx.numel()),
              "accepted": int(acc.numel()), "seconds": time.perf_counter() - t0})
    rep.seconds["int_step"] = t_int
    rep.seconds["float_step"] = t_flt
    rep.ls_fallbacks, rep.ls_failures = P.ls_fallbacks, P.ls_failures
    rep.row_loss = L
    rep.seconds["total"] = time.perf_counter() - t_all
    qw = QuantizedWeight(Q.contiguous(), S.float().contiguous(), Z.float().contiguous(), bits,
                         group_size)
    return qw, rep


def decoupleq(W: torch.Tensor, H: Optional[torch.Tensor], spec: QuantSpec, *,
              log: Optional[LogFn] = None) -> QuantizedWeight:
    """The decoupleQ pass ``(W, H, spec) -> QuantizedWeight`` (``W`` is not modified).

    ``log``: optional callable receiving one dict per stage (``"init"``, then one
    ``"iter"`` per alternation) with ``loss_before``/``loss_after`` (summed over rows),
    ``active``/``accepted`` rows and ``seconds``. For the full report use
    :func:`decoupleq_solve`.
    """
    return decoupleq_solve(W, H, spec, log)[0]
