"""The one clipping search: per row (or per row and group), the shrink factor of a grid whose
rounding error is smallest in a given metric.

Used by GPTQ (H-weighted, per group), decoupleQ's initialisation (all groups at once), the
prune + quantize sweep (kept entries only) and the diffusion PTQ's per-channel weight
scales (:func:`bitpress.cache.quant.quantize_weight`, plain squared error).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

#: ``params(c) -> (scale, zero)`` of the grid shrunk by ``c``, each ``W.shape[:-1]``; or
#: ``None`` when ``c`` gives no valid grid (e.g. it overflows the parameter dtype)
ParamsFn = Callable[[float], Optional[tuple[torch.Tensor, torch.Tensor]]]
#: ``loss(E) -> [...]``: the error of rounding, ``E = Ŵ − W`` ``[..., k]``, reduced over ``k``
LossFn = Callable[[torch.Tensor], torch.Tensor]


def squared_error(E: torch.Tensor) -> torch.Tensor:
    """``‖e‖²`` of each row."""
    return E.pow(2).sum(-1)


def hessian_block_error(M: torch.Tensor) -> LossFn:
    """``e M eᵀ`` of each row (``M`` the group's diagonal block of ``H``)."""
    return lambda E: ((E @ M) * E).sum(-1)


def schur_error(Ug: torch.Tensor) -> LossFn:
    """``‖e Ug⁻¹‖²`` of each row with ``Ug`` the group's (upper) block of the inverse-Cholesky
    factor: the error left after the later columns compensate optimally, as GPTQ does."""
    return lambda E: torch.linalg.solve_triangular(Ug, E, upper=True, left=False).pow(2).sum(-1)


def clip_search(W: torch.Tensor, qmin: int, qmax: int, grid: Sequence[float],
                params: ParamsFn, loss: LossFn = squared_error,
                keep: Optional[torch.Tensor] = None
                ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Best grid per row of ``W`` ``[..., k]`` among the shrink factors ``grid``.

    For each ``c`` the grid ``(s, z) = params(c)`` (``W.shape[:-1]`` each) rounds ``W`` to
    ``q = clamp(round((W − z) / s), qmin, qmax)``; the error ``E = q·s + z − W`` (times
    ``keep`` where given: only kept entries count) is reduced by ``loss`` and each row keeps
    the grid of the first smallest loss. Returns ``(scale, zero)`` or ``None`` when no ``c``
    gave a grid."""
    best = None
    for c in grid:
        p = params(float(c))
        if p is None:
            continue
        s, z = p
        q = torch.clamp(torch.round((W - z[..., None]) / s[..., None]), qmin, qmax)
        E = q * s[..., None] + z[..., None] - W
        if keep is not None:
            E = E * keep
        err = loss(E)
        if best is None:
            best = (err, s, z)
        else:
            better = err < best[0]
            best = tuple(torch.where(better, a, b) for a, b in zip((err, s, z), best))
    return None if best is None else (best[1], best[2])
