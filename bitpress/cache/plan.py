"""A cache plan: the schedule and (optionally) the DEC correction, calibrated in one call.

:func:`calibrate_cache` is the glue a benchmark or the ``compress`` driver needs: run the
full-precision U-Net along trajectories of a calibration batch, collect the deep features,
choose the refresh steps (uniform, DeepCache non-uniform or DPS) and fit the per-step,
per-channel correction of the cached feature. The plan is stored as plain tensors and
JSON (:meth:`CachePlan.tensors`, :meth:`CachePlan.meta`) -- never pickle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, FormatError
from .dec import CacheCorrection, fit_cache_correction
from .features import collect_features, feature_distance_matrix
from .runtime import UNetCache, as_schedule, enable_cache
from .schedule import deepcache_nonuniform, dps, schedule_cost, uniform

SCHEDULES = ("uniform", "deepcache", "dps")


@dataclass
class CachePlan:
    """Refresh mask, branch depth, optional DEC correction and calibration diagnostics."""

    mask: list[bool]
    depth: int = 1
    correction: CacheCorrection | None = None
    kind: str = "uniform"
    interval: int = 1
    feature_error: float | None = None  # summed mean-|.| feature error on the calibration batch
    info: dict[str, Any] = field(default_factory=dict)

    def install(self, unet: nn.Module) -> UNetCache:
        """Enable the cache on ``unet`` with this plan's schedule and correction."""
        cache = enable_cache(unet, self.mask, self.depth)
        if self.correction is not None:
            self.correction.install(cache)
        return cache

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable description (everything but the correction tensors)."""
        return {"mask": [int(m) for m in self.mask], "depth": self.depth, "kind": self.kind,
                "interval": self.interval, "feature_error": self.feature_error,
                "dec": self.correction is not None, "info": self.info}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.correction is None else self.correction.tensors()

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | str, tensors: dict[str, torch.Tensor] | None = None) -> "CachePlan":
        if isinstance(meta, str):
            meta = json.loads(meta)
        try:
            mask = as_schedule([bool(m) for m in meta["mask"]])
            corr = CacheCorrection.from_tensors(tensors or {}) if meta.get("dec") else None
            return cls(mask=mask, depth=int(meta["depth"]), correction=corr, kind=meta.get("kind", "uniform"),
                       interval=int(meta.get("interval", 1)), feature_error=meta.get("feature_error"),
                       info=dict(meta.get("info", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"bad cache plan metadata: {e}") from None


def calibrate_cache(unet: nn.Module, scheduler: Any, noise: torch.Tensor, num_inference_steps: int,
                    interval: int, kind: str = "dps", depth: int = 1, dec: bool = True, *,
                    min_len: int = 1, max_len: int | None = None, guidance_scale: float | None = None,
                    unet_kwargs: dict[str, Any] | None = None, features: torch.Tensor | None = None,
                    progress: bool = False) -> CachePlan:
    """Calibrate a cache plan on the calibration batch ``noise``.

    ``kind`` is ``"uniform"``, ``"deepcache"`` (non-uniform) or ``"dps"``; the budget is
    K = ceil(T / interval) refresh steps over the T U-Net evaluations. ``features`` may be
    passed to reuse a :func:`collect_features` result (several plans from one trajectory).
    """
    if kind not in SCHEDULES:
        raise ConfigError(f"schedule kind must be one of {SCHEDULES}, got {kind!r}")
    if features is None:
        features = collect_features(unet, scheduler, noise, num_inference_steps, depth,
                                    guidance_scale=guidance_scale, unet_kwargs=unet_kwargs, progress=progress)
    T = features.shape[0]
    D = feature_distance_matrix(features)
    if kind == "uniform":
        mask = uniform(T, interval)
    elif kind == "deepcache":
        mask = deepcache_nonuniform(T, interval)
    else:
        mask = dps(D, N=interval, min_len=min_len, max_len=max_len).mask
    corr = fit_cache_correction(features, mask) if dec else None
    return CachePlan(mask=mask, depth=depth, correction=corr, kind=kind, interval=interval,
                     feature_error=schedule_cost(D, mask),
                     info={"calib_batch": int(noise.shape[0]), "T": T, "min_len": min_len, "max_len": max_len})


__all__ = ["CachePlan", "calibrate_cache", "SCHEDULES"]
