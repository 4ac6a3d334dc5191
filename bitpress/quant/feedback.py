"""The one GPTQ error-feedback loop (optimal brain quantization over columns).

Used by GPTQ (:func:`bitpress.quant.gptq`, :func:`bitpress.quant.gptq_round_fixed_grid`),
decoupleQ's integer step and the joint prune + quantize sweep of GQSA and the 2:4 /
unstructured baselines (:func:`bitpress.sparse.prune_quantize_sweep`).

Columns are processed one at a time in the given order: a weight is rounded onto its group's
grid ``w ≈ s·q + z`` (or set to 0 where a keep mask prunes it) and its error
``e = w − ŵ`` is spread over the columns not yet processed with the row-scaled upper
inverse-Cholesky factor, ``W[later] −= e ⊗ U[i, later] / U[i, i]`` — rank-1 inside a lazy
block of columns, one GEMM per block for the rest of the matrix. The weight is worked
transposed (``[in, out]``) so each column read and each rank-1 update touches contiguous
memory.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..formats import qrange

# select(i1, i2, Wb [cnt, out] updated weights (transposed), Ub [cnt, cnt] or None) -> keep
SelectFn = Callable[[int, int, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
# group_hook(g, k0, k1, Wg [k1 - k0, out] updated (transposed), Ug or None, keep or None):
# fills scale_t[g], zero_t[g] when the group's first column is reached
GroupHook = Callable[[int, int, int, torch.Tensor, Optional[torch.Tensor],
                      Optional[torch.Tensor]], None]


def feedback_round(Wt: torch.Tensor, U: Optional[torch.Tensor], bits: int,
                   col_group: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor,
                   block_size: int, *, group_len: int = 0,
                   group_hook: Optional[GroupHook] = None,
                   select: Optional[SelectFn] = None
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Error-feedback rounding of ``Wt`` float32 ``[in, out]`` (processing order; a working
    copy, overwritten) with the upper factor ``U`` ``[in, in]`` of ``H⁻¹`` in the same order
    (``None``: no compensation, i.e. (masked) round-to-nearest).

    ``col_group[j]`` is the group of processed column ``j``; ``scale_t``/``zero_t``
    ``[n_groups, out]`` hold the grids. With ``group_hook`` (natural order, ``group_len``
    columns per group) the hook fills a group's grid when its first column is reached, on
    the error-updated weights; lazy blocks are then whole groups (``block_size`` rounded
    down to a multiple of ``group_len``). With ``select`` the keep mask of every lazy block
    is chosen when the block is reached; pruned weights become 0 and their whole value is
    fed back.

    Returns ``(codes int8 [out, in], keep bool [out, in] or None)`` in processing order.
    """
    qmin, qmax = qrange(bits)
    n, out = Wt.shape
    dev = Wt.device
    if group_hook is not None:
        block_size = max(group_len, (block_size // group_len) * group_len)
    # row-scaled factor U[i, :] / U[i, i], made one lazy block of rows at a time (the same
    # numbers as a whole n x n copy, which would be 0.76 GB more at n = 13824)
    Ud_b = None
    groups = col_group.tolist()
    codes = torch.zeros(n, out, dtype=torch.float32, device=dev)
    keep_t = None if select is None else torch.zeros(n, out, dtype=torch.bool, device=dev)
    kf = s = z = None
    g_prev = -1
    wrows, qrows = Wt.unbind(0), codes.unbind(0)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        Ub = None if U is None else U[i1:i2, i1:i2]
        if U is not None:
            Ud_b = U[i1:i2, i1:] / torch.diagonal(U)[i1:i2, None]  # [i2 - i1, n - i1]
        if select is not None:
            kb = select(i1, i2, Wt[i1:i2], Ub)
            keep_t[i1:i2] = kb
        E = torch.empty(i2 - i1, out, dtype=torch.float32, device=dev)
        erows = E.unbind(0)
        for i in range(i1, i2):
            g = groups[i]
            if group_hook is not None and i % group_len == 0:
                k1 = min(i + group_len, i2)
                group_hook(g, i, k1, Wt[i:k1], None if U is None else U[i:k1, i:k1],
                           None if select is None else kb[i - i1:k1 - i1])
            if g != g_prev:
                s, z, g_prev = scale_t[g], zero_t[g], g
            w, q, e = wrows[i], qrows[i], erows[i - i1]
            torch.sub(w, z, out=q).div_(s).round_().clamp_(qmin, qmax)
            if select is not None:
                kf = kb[i - i1].to(torch.float32)
                q.mul_(kf)
            torch.mul(q, s, out=e).add_(z)
            if kf is not None:
                e.mul_(kf)
            torch.sub(w, e, out=e)
            if Ud_b is not None and i + 1 < i2:
                Wt[i + 1:i2].addr_(Ud_b[i - i1, i + 1 - i1:i2 - i1], e, alpha=-1.0)
        if Ud_b is not None and i2 < n:
            Wt[i2:].addmm_(Ud_b[:, i2 - i1:].T, E, alpha=-1.0)
    return (codes.T.to(torch.int8).contiguous(),
            None if keep_t is None else keep_t.T.contiguous())
