"""Exact least-squares group parameters with pruned groups fixed to 0.

:func:`bitpress.quant.least_squares_params` (decoupleQ's float step) fits every group of a
row; GQSA's pruned groups must stay exactly 0, so this is a masked variant written the same
way. For row ``r`` with codes ``Q`` and ``θ = (s_1..s_G, z_1..z_G)``, ``Ŵ_r = A_r θ`` and the
loss ``(Ŵ_r − w_r) H (Ŵ_r − w_r)ᵀ`` has normal equations ``M θ = b`` of size ``2G``
(``G`` for symmetric grids). The entries of a pruned group are removed by the projection
``M ← D M D + (I − D)``, ``b ← D b`` (``D`` the diagonal 0/1 keep indicator), so they come out
as 0 while the kept ones are the exact constrained optimum. Blocks of ``M`` come from the
group-block structure of ``H`` (columns padded to ``G·gs``): one ``Q @ H``-sized product per
row chunk, no ``[rows, groups, in]`` buffers.

Solved in float64 for the step from the current ``(s0, z0)`` with a tiny relative ridge, so
directions the data leave undetermined (a kept group whose codes are all equal) stay where
they were. A negative scale is represented by flipping the group's codes (``Q → −Q − 1``,
``z → z − s``; symmetric: ``Q → −Q`` where the group has no code at ``qmin``, else the scale is
clamped). Scales are rounded to the parameter dtype, offsets re-solved for the rounded
scales and rounded, and a row takes the result only if its exact loss beats ``(s0, z0)``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formats import qrange
from ..quant.decoupleq import grouped_normal_pieces

RIDGE = 1e-10
CHUNK_BYTES = 64 << 20


def _pround(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return t if dtype is None else t.to(dtype).to(torch.float64)


def _masked_solve(M: torch.Tensor, rhs: torch.Tensor, d: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``(D M D + I − D) x = D rhs`` batched; returns ``(x, ok)``."""
    dd = d.to(M.dtype)
    A = M * dd[:, :, None] * dd[:, None, :] + torch.diag_embed(1.0 - dd)
    diag = torch.diagonal(A, dim1=1, dim2=2).clamp(min=0)
    ridge = RIDGE * diag + 1e-300 + 1e-12 * diag.mean(1, keepdim=True)
    x = torch.zeros_like(rhs)
    ok = torch.zeros(M.shape[0], dtype=torch.bool, device=M.device)
    for k in range(3):
        todo = (~ok).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        L, info = torch.linalg.cholesky_ex(A[todo] + torch.diag_embed(ridge[todo] * 1000 ** k))
        good = info == 0
        if bool(good.any()):
            sol = torch.cholesky_solve((rhs[todo] * dd[todo]).unsqueeze(-1)[good], L[good])
            sol = sol.squeeze(-1)
            fin = torch.isfinite(sol).all(1)
            idx = todo[good][fin]
            x[idx] = sol[fin]
            ok[idx] = True
    return x * dd, ok


class MaskedLeastSquares:
    """Shared pieces of the normal equations for one layer (``W``, ``H`` in float64)."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor, group_size: int,
                 row_chunk: Optional[int] = None) -> None:
        grouped_normal_pieces(self, W, H, group_size)
        out, G, N = self.out, self.G, self.N
        per_row = 8 * (3 * N + 8 * (2 * G) ** 2)
        self.row_chunk = row_chunk or max(1, min(out, CHUNK_BYTES // per_row))

    def _pad(self, Q: torch.Tensor) -> torch.Tensor:
        Qd = Q.to(torch.float64)
        return torch.nn.functional.pad(Qd, (0, self.N - self.n)) if self.N > self.n else Qd

    def _normal(self, Qp: torch.Tensor, rows: slice):
        R = Qp.shape[0]
        G, gs = self.G, self.gs
        ss = torch.empty(R, G, G, dtype=torch.float64, device=Qp.device)
        for h in range(G):
            h0, h1 = h * gs, (h + 1) * gs
            P = Qp[:, h0:h1] @ self.Hp[h0:h1, h0:]
            col = (Qp[:, h0:] * P).view(R, G - h, gs).sum(-1)
            ss[:, h:, h] = col
            ss[:, h, h:] = col
        Qg = Qp.view(R, G, gs)
        sz = torch.bmm(Qg.transpose(0, 1), self.B.view(G, gs, G)).transpose(0, 1)
        bs = (Qg * self.WH[rows].view(R, G, gs)).sum(-1)
        return ss, sz, bs

    def _loss(self, ss, sz, bs, rows, s, z):
        quad = (s * torch.einsum("rgh,rh->rg", ss, s)).sum(1)
        quad = quad + 2 * (s * torch.einsum("rgh,rh->rg", sz, z)).sum(1)
        quad = quad + (z * (z @ self.Zz)).sum(1)
        lin = (bs * s).sum(1) + (self.bz[rows] * z).sum(1)
        return (quad - 2 * lin + self.c[rows]).clamp(min=0.0)

    def refine(self, codes: torch.Tensor, keep: torch.Tensor, scale0: torch.Tensor,
               zero0: torch.Tensor, bits: int, sym: bool = False,
               param_dtype: Optional[torch.dtype] = torch.float16
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Refit kept groups' ``(s, z)`` for fixed codes. Returns ``(codes, scale, zero,
        loss, loss0)`` (float32 params, float64 per-row losses after/before); rows keep
        their input where the refit does not lower the loss, so ``loss <= loss0``."""
        outs = []
        for a in range(0, self.out, self.row_chunk):
            b = min(a + self.row_chunk, self.out)
            outs.append(self._chunk(codes[a:b], keep[a:b], scale0[a:b], zero0[a:b],
                                    slice(a, b), bits, sym, param_dtype))
        return tuple(torch.cat([o[i] for o in outs], 0) for i in range(5))  # type: ignore

    def _chunk(self, Q, keep, s0, z0, rows, bits, sym, pdt):
        G, gs, n = self.G, self.gs, self.n
        R = Q.shape[0]
        kd = keep.to(torch.float64)
        s_in, z_in = s0.double(), z0.double()
        Qp = self._pad(Q)
        ss, sz, bs = self._normal(Qp, rows)
        bz = self.bz[rows]
        s0 = s0.double() * kd
        z0 = z0.double() * kd
        loss0 = self._loss(ss, sz, bs, rows, s0, z0)
        if sym:
            M, theta0, b, d = ss, s0, bs, keep
        else:
            M = torch.cat([torch.cat([ss, sz], 2),
                           torch.cat([sz.transpose(1, 2), self.Zz.expand(R, G, G)], 2)], 1)
            theta0, b, d = torch.cat([s0, z0], 1), torch.cat([bs, bz], 1), torch.cat([keep, keep], 1)
        rhs = b - torch.einsum("rij,rj->ri", M, theta0)
        delta, ok = _masked_solve(M, rhs, d)
        theta = theta0 + delta
        s = theta[:, :G]
        tiny = float(torch.finfo(torch.float16).tiny) if pdt == torch.float16 else 1e-12
        codes = Q.to(torch.int16)
        qmin = qrange(bits)[0]
        if sym:
            hm = torch.nn.functional.pad(Q == qmin, (0, self.N - n)).view(R, G, gs).any(-1)
            flip = (s < 0) & ~hm & keep
            sig = torch.where(flip, -1.0, 1.0).to(torch.float64)
            s_st = _pround((s * sig).clamp(min=tiny), pdt)
            s_or, z_st, z_or = sig * s_st * kd, torch.zeros_like(s_st), torch.zeros_like(s_st)
            fx = flip.repeat_interleave(gs, 1)[:, :n]
            codes = torch.where(fx, -codes, codes)
        else:
            flip = (s < 0) & keep
            sig = torch.where(flip, -1.0, 1.0).to(torch.float64)
            s_st = _pround(s.abs().clamp(min=tiny), pdt)
            s_or = sig * s_st * kd
            # offsets for the rounded scales: (D Zz D + I − D) z = D (bz − M_szᵀ s)
            rz = bz - torch.einsum("rgh,rg->rh", sz, s_or)
            Zb = self.Zz.expand(R, G, G)
            z_or, okz = _masked_solve(Zb, rz - torch.einsum("rij,rj->ri", Zb, z0), keep)
            z_or = z0 + z_or
            ok = ok & okz
            z_st = _pround(torch.where(flip, z_or - s_or, z_or), pdt) * kd
            z_or = torch.where(flip, z_st + s_or, z_st)
            fx = flip.repeat_interleave(gs, 1)[:, :n]
            codes = torch.where(fx, -codes - 1, codes)
        loss = self._loss(ss, sz, bs, rows, s_or, z_or)
        better = ok & torch.isfinite(loss) & (loss < loss0)
        better &= torch.isfinite(s_st).all(1) & torch.isfinite(z_st).all(1)
        take = better[:, None] & keep          # pruned groups keep their incoming parameters
        s_out = torch.where(take, s_st, s_in)
        z_out = torch.where(take, z_st, z_in)
        codes = torch.where(better[:, None], codes, Q.to(torch.int16)).to(torch.int8)
        loss = torch.where(better, loss, loss0)
        return codes, s_out.float(), z_out.float(), loss, loss0
