"""Cache schedules: which denoising steps refresh the deep feature (run the full U-Net).

A schedule is a boolean mask over the T U-Net evaluations of a trajectory (``True`` =
refresh); step 0 always refreshes. With an interval N the budget is K = ceil(T / N)
refresh steps. Three ways to place them:

* :func:`uniform` -- every N-th step (DeepCache's uniform 1:N).
* :func:`deepcache_nonuniform` -- DeepCache's non-uniform 1:N: refresh steps packed densely
  around a *center* step and spaced out polynomially away from it (where adjacent deep
  features are least similar, refresh more often).
* :func:`dps` -- CacheQuant's dynamic-programming schedule: given ``D[i, j]``, the error of
  reusing step i's feature at step j (from calibration trajectories,
  :func:`bitpress.cache.features.feature_distance_matrix`), place the K refresh steps to
  minimise the summed error over all steps, optionally bounding each group's length (a
  group = a refresh step and the cached steps that reuse it). Solved exactly by dynamic
  programming over segments: O(K T^2) with vectorised rows, milliseconds for T = 100.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError


def n_refresh(T: int, N: int) -> int:
    """The refresh budget K = ceil(T / N) of interval ``N`` over ``T`` steps."""
    if T < 1 or N < 1:
        raise ConfigError(f"need T >= 1 steps and interval N >= 1, got T={T}, N={N}")
    return math.ceil(T / N)


def mask_from_steps(steps: Sequence[int], T: int) -> list[bool]:
    """Boolean refresh mask of length ``T`` with ``True`` at ``steps``."""
    mask = [False] * T
    for s in steps:
        if not 0 <= s < T:
            raise ConfigError(f"refresh step {s} outside 0..{T - 1}")
        mask[s] = True
    return mask


def refresh_steps(mask: Sequence[bool]) -> list[int]:
    """Indices of the refresh steps of a mask."""
    return [i for i, m in enumerate(mask) if m]


def uniform(T: int, N: int) -> list[bool]:
    """Refresh every ``N``-th step: 0, N, 2N, ... (K = ceil(T/N) refreshes)."""
    n_refresh(T, N)
    return [i % N == 0 for i in range(T)]


def deepcache_nonuniform(T: int, N: int, center: int | None = None, power: float = 1.4) -> list[bool]:
    """DeepCache's non-uniform 1:N schedule with K = ceil(T/N) refresh steps.

    Refresh steps are ``center + sign(u) |u|^power`` for ``u`` evenly spaced between
    ``-center^(1/power)`` and ``(T - center)^(1/power)`` (plus step 0), i.e. dense around
    ``center`` and sparser towards both ends; ``power = 1`` is uniform spacing. When
    rounding merges steps, ``power`` is lowered in steps of 0.02 until K distinct steps
    remain (as DeepCache does), falling back to the uniform schedule. ``center`` defaults
    to 30 % of the trajectory (DeepCache places it early-to-middle, where deep features
    change fastest); this is our own implementation of the idea, not DeepCache's code.
    """
    K = n_refresh(T, N)
    if K >= T:
        return [True] * T
    if K == 1:
        return mask_from_steps([0], T)
    c = int(round(0.3 * T)) if center is None else int(center)
    if not 0 <= c < T:
        raise ConfigError(f"center must lie in 0..{T - 1}, got {c}")
    p = float(power)
    if p < 1:
        raise ConfigError(f"power must be >= 1, got {power}")
    while p >= 1.0 - 1e-9:
        lo, hi = -(c ** (1 / p)), (T - c) ** (1 / p)
        u = np.linspace(lo, hi, K + 1)
        pts = c + np.sign(u) * np.abs(u) ** p
        steps = sorted({0} | {int(s) for s in np.floor(pts[1:-1] + 1e-9) if 0 < s < T})
        if len(steps) == K:
            return mask_from_steps(steps, T)
        p -= 0.02
    return uniform(T, N)


def segment_costs(D: torch.Tensor | np.ndarray) -> np.ndarray:
    """``C[a, b]`` = sum_{s=a+1}^{b-1} D[a, s]: the error of a group refreshing at ``a`` and
    reusing that feature up to step ``b - 1`` (shape ``[T + 1, T + 1]``, inf where b <= a)."""
    D = np.asarray(D.double().numpy() if isinstance(D, torch.Tensor) else D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ConfigError(f"D must be a square [T, T] matrix, got {D.shape}")
    T = D.shape[0]
    C = np.full((T + 1, T + 1), np.inf)
    for a in range(T):
        # cumulative error of steps a+1 .. b-1
        cs = np.concatenate([[0.0], np.cumsum(D[a, a + 1:])])  # cs[m] = sum of first m cached steps
        C[a, a + 1:] = cs[: T - a]
    return C


def schedule_cost(D: torch.Tensor | np.ndarray, mask: Sequence[bool]) -> float:
    """Summed error of a schedule: each cached step pays D[last refresh, step]."""
    D = np.asarray(D.double().numpy() if isinstance(D, torch.Tensor) else D, dtype=np.float64)
    if len(mask) != D.shape[0] or not mask[0]:
        raise ConfigError("mask must have one entry per step and refresh at step 0")
    cost, r = 0.0, 0
    for s, m in enumerate(mask):
        if m:
            r = s
        else:
            cost += D[r, s]
    return float(cost)


@dataclass
class DPSResult:
    """A DPS schedule: the refresh mask, its refresh steps and its summed feature error."""

    mask: list[bool]
    steps: list[int]
    cost: float


def dps(D: torch.Tensor | np.ndarray, K: int | None = None, N: int | None = None,
        min_len: int = 1, max_len: int | None = None) -> DPSResult:
    """Exact minimum-error placement of ``K`` refresh steps (step 0 always refreshes).

    ``D[i, j]`` is the error of reusing step i's deep feature at step j (only ``i < j`` is
    read). Give the budget as ``K`` or as an interval ``N`` (K = ceil(T/N)). Every group
    (a refresh step and the cached steps that follow it) has a length in
    ``[min_len, max_len]``. Dynamic programme over segments: ``best[k][e]`` = least error
    covering steps ``0..e-1`` with ``k`` groups, ``best[k][e] = min_a best[k-1][a] + C[a, e]``
    with the segment costs ``C`` of :func:`segment_costs`.
    """
    C = segment_costs(D)
    T = C.shape[0] - 1
    if K is None:
        if N is None:
            raise ConfigError("give the refresh budget K or the interval N")
        K = n_refresh(T, N)
    max_len = T if max_len is None else int(max_len)
    if not 1 <= K <= T:
        raise ConfigError(f"K must be in 1..{T}, got {K}")
    if min_len < 1 or max_len < min_len:
        raise ConfigError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if K * min_len > T or K * max_len < T:
        raise ConfigError(f"{K} groups with lengths in [{min_len}, {max_len}] cannot cover {T} steps")
    lengths = np.arange(T + 1)[None, :] - np.arange(T + 1)[:, None]  # e - a
    Cb = np.where((lengths >= min_len) & (lengths <= max_len), C, np.inf)
    best = np.full((K + 1, T + 1), np.inf)
    arg = np.zeros((K + 1, T + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, K + 1):
        tot = best[k - 1][:, None] + Cb  # [a, e]
        arg[k] = np.argmin(tot, axis=0)
        best[k] = tot[arg[k], np.arange(T + 1)]
    if not np.isfinite(best[K, T]):
        raise ConfigError(f"no schedule with {K} refreshes and group lengths in [{min_len}, {max_len}]")
    steps, e = [], T
    for k in range(K, 0, -1):
        a = int(arg[k, e])
        steps.append(a)
        e = a
    steps.reverse()
    return DPSResult(mask=mask_from_steps(steps, T), steps=steps, cost=float(best[K, T]))


def brute_force_schedule(D: torch.Tensor | np.ndarray, K: int, min_len: int = 1,
                         max_len: int | None = None) -> DPSResult:
    """Exhaustive search over all placements (for tests on small T)."""
    D = np.asarray(D.double().numpy() if isinstance(D, torch.Tensor) else D, dtype=np.float64)
    T = D.shape[0]
    max_len = T if max_len is None else max_len
    best: DPSResult | None = None
    for rest in itertools.combinations(range(1, T), K - 1):
        steps = [0, *rest]
        lens = np.diff(steps + [T])
        if lens.min() < min_len or lens.max() > max_len:
            continue
        mask = mask_from_steps(steps, T)
        c = schedule_cost(D, mask)
        if best is None or c < best.cost:
            best = DPSResult(mask=mask, steps=steps, cost=c)
    if best is None:
        raise ConfigError("no feasible schedule")
    return best


__all__ = ["n_refresh", "mask_from_steps", "refresh_steps", "uniform", "deepcache_nonuniform",
           "segment_costs", "schedule_cost", "DPSResult", "dps", "brute_force_schedule"]
