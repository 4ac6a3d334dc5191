"""Deep features along full-precision trajectories: the calibration data of DPS and DEC.

:func:`collect_features` runs the full U-Net at every step of a sampling trajectory on a
calibration batch and records the *deep feature* (the tensor a cached step would reuse,
see :mod:`bitpress.cache.runtime`) at every step. :func:`feature_distance_matrix` turns
them into ``D[i, j]`` = mean absolute difference between the features of steps ``i`` and
``j`` -- the error a cached step ``j`` makes when it reuses the feature of refresh step
``i`` (to first order: the trajectory itself is the full-precision one).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .runtime import enable_cache, sample_loop


@torch.no_grad()
def collect_features(unet: nn.Module, scheduler: Any, noise: torch.Tensor, num_inference_steps: int,
                     depth: int = 1, *, guidance_scale: float | None = None,
                     unet_kwargs: dict[str, Any] | None = None, eta: float = 0.0,
                     generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                     progress: bool = False) -> torch.Tensor:
    """Deep features ``[T, B, C, H, W]`` of a full-precision trajectory (T = U-Net evaluations).

    The U-Net runs in full at every step (so the trajectory is the FP one); the feature of
    step ``t`` is the output of the up path just before the last ``depth`` up blocks. With
    ``guidance_scale`` the batch is the doubled CFG batch (``B = 2 * noise.shape[0]``).
    Features are stored on the CPU in ``dtype`` (``torch.float16`` halves the memory of
    long trajectories).
    """
    feats: list[torch.Tensor] = []
    cache = enable_cache(unet, None, depth)
    cache.feature_hook = lambda step, f: feats.append(f.detach().to("cpu", dtype, copy=True))
    try:
        sample_loop(unet, scheduler, noise, num_inference_steps, guidance_scale=guidance_scale,
                    unet_kwargs=unet_kwargs, eta=eta, generator=generator, progress=progress, cache=cache)
    finally:
        cache.disable()
    return torch.stack(feats)


def feature_distance_matrix(features: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """``D[i, j]`` = mean |F_i - F_j| over all elements (float64 ``[T, T]``, symmetric, 0 diagonal).

    Computed in chunks of ``chunk`` steps so memory stays at a few feature tensors.
    """
    if features.ndim < 2:
        raise ConfigError(f"features must be [T, ...], got shape {tuple(features.shape)}")
    T = features.shape[0]
    flat = features.reshape(T, -1)
    D = torch.zeros(T, T, dtype=torch.float64)
    for i in range(T):
        for j0 in range(i + 1, T, chunk):
            j1 = min(T, j0 + chunk)
            d = (flat[j0:j1].float() - flat[i].float()).abs().mean(dim=1).double()
            D[i, j0:j1] = d
            D[j0:j1, i] = d
    return D


__all__ = ["collect_features", "feature_distance_matrix"]
