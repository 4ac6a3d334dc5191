"""Joint prune + quantize error-feedback sweep (the SparseGPT/GPTQ loop with a mask).

One loop serves GQSA (group masks), the 2:4 baseline and the unstructured baseline: the
caller supplies ``select(i1, i2, Wb, Ub)`` which decides, when column block ``[i1, i2)`` is
reached, which of its weights are kept (bool ``[i2 - i1, out]``, transposed layout). Then,
group by group (``gs`` columns), the grid ``s, z`` of every row is fitted to the row's *kept*,
error-updated weights (min/max through :func:`bitpress.formats.minmax_params`, optionally an
H-aware clip search) and the columns are processed one at a time: a kept weight is rounded
onto the grid, a pruned one is set to 0, and the error is spread over the columns not yet
processed with the inverse-Cholesky factor (``W[:, later] -= err · U[i, later] / U[i, i]``),
lazily per block as GPTQ does.

The weight is worked transposed (``[in, out]``) so per-column reads and rank-1 updates touch
contiguous memory. ``factor=None`` switches compensation off (the same mask and grids, plain
masked round-to-nearest): the ablation of the error feedback.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..formats import effective_group_size, minmax_params, num_groups, qrange
from ..quant import HessianFactor
from ..quant.clip import clip_search, schur_error, squared_error
from ..quant.feedback import SelectFn, feedback_round



def _masked_params(Wg: torch.Tensor, keep: torch.Tensor, bits: int, sym: bool,
                   param_dtype: Optional[torch.dtype], clip: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max grid of each row's kept entries: ``Wg``, ``keep`` ``[out, glen]`` → ``[out]``."""
    any_kept = keep.any(1, keepdim=True)
    Wm = torch.where(keep, Wg, torch.full_like(Wg, float("nan")))
    Wm = torch.where(any_kept, Wm, torch.zeros_like(Wg))  # fully pruned rows: a dummy grid
    s, z = minmax_params(Wm, bits, -1, sym=sym, clip=clip, param_dtype=param_dtype)
    return s[:, 0], z[:, 0]


def _group_params(Wg: torch.Tensor, keep: torch.Tensor, Ug: Optional[torch.Tensor], bits: int,
                  sym: bool, param_dtype: Optional[torch.dtype],
                  clip_grid: Optional[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid of one group for every row; with ``clip_grid`` each row keeps the shrink factor
    whose rounding error of the kept entries is smallest in the metric ``‖e U_GG⁻¹‖²`` (the
    error left after the later columns compensate optimally), or plain squared error when
    there is no compensation."""
    if not clip_grid:
        return _masked_params(Wg, keep, bits, sym, param_dtype, 1.0)
    qmin, qmax = qrange(bits)
    best = clip_search(Wg, qmin, qmax, clip_grid,
                       lambda c: _masked_params(Wg, keep, bits, sym, param_dtype, c),
                       squared_error if Ug is None else schur_error(Ug), keep.to(Wg.dtype))
    assert best is not None
    return best


def prune_quantize_sweep(W: torch.Tensor, factor: Optional[HessianFactor], select: SelectFn,
                         bits: int, group_size: int, *, sym: bool = False,
                         param_dtype: Optional[torch.dtype] = torch.float16,
                         clip_grid: Optional[Sequence[float]] = None, block_size: int = 128
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the joint sweep. ``W`` float ``[out, in]`` (not modified); ``factor`` from
    :func:`bitpress.quant.prepare_hessian` without a permutation (natural order), or ``None``
    for no compensation. Blocks are rounded to whole groups.

    Returns ``(codes int8 [out, in], scale [out, G], zero [out, G], keep bool [out, in])``:
    codes are 0 at pruned positions; ``scale``/``zero`` are exact in ``param_dtype``.
    """
    out, n = W.shape
    gs = effective_group_size(group_size, n)
    G = num_groups(group_size, n)
    dev = W.device
    Wt = W.detach().to(torch.float32).T.contiguous()            # [in, out]
    U = None
    if factor is not None:
        if factor.perm is not None:
            raise ValueError("prune_quantize_sweep needs a natural-order Hessian factor")
        U = factor.U.to(dev)
        Wt[factor.dead.to(dev)] = 0.0
    scale = torch.empty(G, out, dtype=torch.float32, device=dev)
    zero = torch.empty(G, out, dtype=torch.float32, device=dev)

    def hook(g: int, k0: int, k1: int, Wg: torch.Tensor, Ug: Optional[torch.Tensor],
             kg: Optional[torch.Tensor]) -> None:
        scale[g], zero[g] = _group_params(Wg.T, kg.T, Ug, bits, sym, param_dtype, clip_grid)

    col_group = torch.arange(n, device="cpu") // gs  # host-side indices (also under a meta default device)
    codes, keep = feedback_round(Wt, U, bits, col_group, scale, zero, block_size,
                                 group_len=gs, group_hook=hook, select=select)
    return codes, scale.T.contiguous(), zero.T.contiguous(), keep
