"""Decoupled error correction (DEC, CacheQuant): per-step, per-channel linear fixes.

A cached step reuses the deep feature of its last refresh step; the feature it *should*
use differs, mostly by a per-channel drift in scale and offset. DEC fits, for every
cached step ``s`` with last refresh ``r``, a scale ``a[s, c]`` and bias ``b[s, c]`` per
channel that minimise ``sum (a[s,c] * F_r[:, c] + b[s,c] - F_s[:, c])^2`` over the
calibration batch and all spatial positions -- ordinary least squares with a closed form
(``a = cov(x, y) / var(x)``, ``b = mean(y) - a mean(x)``), so fitting costs one pass over
the calibration features. At run time the correction is a per-step scale and bias on the
cached feature (:meth:`CacheCorrection.install` sets the cache's ``feature_transform``).

:func:`fit_channel_affine` is the generic per-channel fit; the quantization-error half of
DEC (on the output channels of the layer that consumes the cached feature) reuses it with
that layer's quantized and full-precision outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ConfigError, FormatError
from .runtime import UNetCache, as_schedule


def fit_channel_affine(x: torch.Tensor, y: torch.Tensor, channel_dim: int = 1,
                       ridge: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares per-channel ``scale``, ``bias`` (each ``[C]``) with ``y ~ scale * x + bias``.

    Statistics are accumulated in float64 over every dimension except ``channel_dim``.
    ``ridge`` (relative to the channel variance) keeps near-constant channels stable:
    their scale shrinks towards 0 and the bias takes the mean difference.
    """
    if x.shape != y.shape:
        raise ConfigError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    C = x.shape[channel_dim]
    xs = x.movedim(channel_dim, 0).reshape(C, -1).double()
    ys = y.movedim(channel_dim, 0).reshape(C, -1).double()
    mx, my = xs.mean(1), ys.mean(1)
    xc = xs - mx[:, None]
    var = (xc * xc).mean(1)
    cov = (xc * (ys - my[:, None])).mean(1)
    scale = cov / (var + ridge * (var.mean() + 1e-30))
    bias = my - scale * mx
    return scale.float(), bias.float()


@dataclass
class CacheCorrection:
    """Per-step, per-channel correction of the cached deep feature.

    ``scale`` and ``bias`` are ``[T, C]``; rows of refresh steps are the identity (1, 0).
    ``channel_dim`` is the channel axis of the feature (1 for ``[B, C, H, W]``).
    """

    scale: torch.Tensor
    bias: torch.Tensor
    channel_dim: int = 1

    def __call__(self, step: int, last_refresh: int, feature: torch.Tensor) -> torch.Tensor:
        """The corrected feature for ``step`` (the signature of ``UNetCache.feature_transform``)."""
        if step >= self.scale.shape[0]:
            return feature
        shape = [1] * feature.ndim
        shape[self.channel_dim] = -1
        a = self.scale[step].to(feature.device, feature.dtype).view(shape)
        b = self.bias[step].to(feature.device, feature.dtype).view(shape)
        return torch.addcmul(b, feature, a)

    def install(self, cache: UNetCache) -> UNetCache:
        """Apply this correction at every cached step of ``cache``."""
        if cache.schedule is not None and len(cache.schedule) != self.scale.shape[0]:
            raise ConfigError(f"correction has {self.scale.shape[0]} steps, the cache schedule "
                              f"{len(cache.schedule)}")
        cache.feature_transform = self
        return cache

    def tensors(self, prefix: str = "dec.cache.") -> dict[str, torch.Tensor]:
        """Tensors to store in a safetensors file."""
        return {prefix + "scale": self.scale.contiguous(), prefix + "bias": self.bias.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "dec.cache.") -> "CacheCorrection":
        try:
            scale, bias = tensors[prefix + "scale"], tensors[prefix + "bias"]
        except KeyError as e:
            raise FormatError(f"missing DEC tensor {e.args[0]!r}") from None
        if scale.ndim != 2 or scale.shape != bias.shape:
            raise FormatError(f"DEC scale/bias must both be [T, C], got {tuple(scale.shape)}, {tuple(bias.shape)}")
        return cls(scale.float(), bias.float())


def fit_cache_correction(features: torch.Tensor, schedule: Sequence[bool], channel_dim: int = 1,
                         ridge: float = 1e-8) -> CacheCorrection:
    """Fit DEC's cache-error correction from full-precision features ``[T, B, C, ...]``.

    ``features`` come from :func:`bitpress.cache.features.collect_features` on a
    calibration batch; for every cached step ``s`` of ``schedule`` the correction maps the
    feature of its last refresh step onto the feature of step ``s``.
    """
    T = features.shape[0]
    mask = as_schedule(schedule, T)
    C = features.shape[1 + channel_dim]
    scale = torch.ones(T, C)
    bias = torch.zeros(T, C)
    r = 0
    for s in range(T):
        if mask[s]:
            r = s
            continue
        scale[s], bias[s] = fit_channel_affine(features[r], features[s], channel_dim, ridge)
    return CacheCorrection(scale, bias, channel_dim)


__all__ = ["fit_channel_affine", "CacheCorrection", "fit_cache_correction"]
