"""Error bounds of the approximate activation modes (``int8``, ``lut``, ``lut63``) against
the exact result, as the tests check them."""
from __future__ import annotations

import torch

from .config import LUT_MAX


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
