"""A cache plan: the schedule and (optionally) the DEC correction, calibrated in one call.

:func:`calibrate_cache` is the glue a benchmark or the ``compress`` driver needs: run the
full-precision U-Net along trajectories of a calibration batch, collect the deep features,
choose the refresh steps (uniform, DeepCache non-uniform or DPS) and fit the per-step,
per-channel correction of the cached feature. The plan is stored as plain tensors and
JSON (:meth:`CachePlan.tensors`, :meth:`CachePlan.meta`) -- never pickle.

:func:`cachequant` is the whole method in one call (plan + W8A8/W4A8 U-Net + both DEC
halves), returning a :class:`CacheQuantModel` that samples, plugs into a diffusers pipeline
(:meth:`CacheQuantModel.enable_on`) and saves to / loads from one directory
(:func:`load_cachequant`) -- what ``bitpress compress --method cachequant`` and
``bitpress sample`` need.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

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


# --------------------------------------------------------------------------------------------
# CacheQuant as one model: plan + (optionally quantized) U-Net, one call, one directory
# --------------------------------------------------------------------------------------------

_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler")


@dataclass
class CacheQuantModel:
    """A cache plan together with the U-Net it runs on (an int8 :class:`~bitpress.cache.quant.QuantizedUNet`
    or the float model) and the sampler it was calibrated for.

    :meth:`sample` runs the denoising loop with the plan installed; :meth:`enable_on` puts
    it into a diffusers pipeline; :meth:`save` / :func:`load_cachequant` store it as one
    directory (JSON + safetensors, written atomically).
    """

    unet: nn.Module
    plan: CachePlan
    scheduler_class: str
    scheduler_config: dict[str, Any]
    num_inference_steps: int
    quant: Any = None  # QuantizedUNet | None

    def scheduler(self) -> Any:
        from ..deps import require

        diffusers = require("diffusers", what="the CacheQuant scheduler")

        if self.scheduler_class not in _SCHEDULERS:
            raise FormatError(f"unsupported scheduler {self.scheduler_class!r} (one of {_SCHEDULERS})")
        return getattr(diffusers, self.scheduler_class).from_config(self.scheduler_config)

    def sample(self, noise: torch.Tensor, progress: bool = False, **kwargs: Any) -> torch.Tensor:
        """Denoise ``noise`` with the plan (cache schedule, DEC) on this model's U-Net."""
        from .runtime import sample_loop

        cache = self.plan.install(self.unet)
        try:
            return sample_loop(self.unet, self.scheduler(), noise, self.num_inference_steps, cache=cache,
                               progress=progress, **kwargs)
        finally:
            cache.disable()

    def enable_on(self, pipe: Any) -> Any:
        """Replace ``pipe.unet`` by this model's U-Net and enable the plan on the pipeline; returns
        the :class:`~bitpress.cache.runtime.PipelineCache` (call it like the pipeline)."""
        from .runtime import PipelineCache

        pipe.unet = self.unet
        pc = PipelineCache(pipe, self.plan.mask, self.plan.depth)
        if self.plan.correction is not None:
            self.plan.correction.install(pc.cache)
        return pc

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        from ..formats.checkpoint import atomic_output_dir
        from ..formats.diffusion import write_cachequant_files

        with atomic_output_dir(path, overwrite=overwrite) as tmp:
            if self.quant is not None:
                self.quant.save(tmp / "unet")
            else:
                self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            write_cachequant_files(tmp, self.plan.tensors(), {
                "plan": self.plan.meta(), "quantized": self.quant is not None,
                "scheduler_class": self.scheduler_class,
                "scheduler_config": json.loads(json.dumps(dict(self.scheduler_config))),
                "num_inference_steps": self.num_inference_steps})
        return Path(path)


def load_cachequant(path: str | os.PathLike) -> CacheQuantModel:
    """Load a directory written by :meth:`CacheQuantModel.save` (no pickle)."""
    from ..deps import need
    from ..formats.diffusion import read_cachequant_files

    need("diffusers", what="loading a CacheQuant directory")
    path = Path(path)
    meta, plan_tensors = read_cachequant_files(path)
    plan = CachePlan.from_meta(meta["plan"], plan_tensors)
    quant = None
    if meta.get("quantized"):
        from .quant import QuantizedUNet

        quant = QuantizedUNet.load(path / "unet")
        unet = quant.unet
    else:
        import diffusers

        cfg = json.loads((path / "unet" / "config.json").read_text())
        cls = cfg.get("_class_name")
        if cls not in ("UNet2DModel", "UNet2DConditionModel"):
            raise FormatError(f"unsupported U-Net class {cls!r}")
        unet = getattr(diffusers, cls).from_pretrained(path / "unet").eval()
    return CacheQuantModel(unet, plan, meta["scheduler_class"], meta["scheduler_config"],
                           int(meta["num_inference_steps"]), quant)


def cachequant(unet: nn.Module, scheduler: Any, calib_noise: torch.Tensor, num_inference_steps: int,
               interval: int, wbits: int | None = 8, abits: int = 8, *, kind: str = "dps", depth: int = 1,
               dec: bool = True, guidance_scale: float | None = None, unet_kwargs: dict[str, Any] | None = None,
               float_layers: Sequence[str] | None = None, progress: bool = False) -> CacheQuantModel:
    """CacheQuant in one call: cache plan (schedule ``kind`` with K = ceil(T / interval) refreshes,
    DEC of the cache error) calibrated on full-precision trajectories of ``calib_noise``, then
    (unless ``wbits`` is None) PTQ of a copy of ``unet`` to W``wbits``A``abits`` with per-step
    activation grids and, with ``dec``, DEC of the quantization error under that plan.
    ``float_layers``: convs/linears left in float (``quantize_unet``'s ``exclude``; ``None``:
    :data:`~bitpress.cache.quant.DEFAULT_FLOAT_LAYERS`). ``unet`` itself is not modified.
    """
    from .quant import DEFAULT_FLOAT_LAYERS, collect_calibration, fit_quant_correction, quantize_unet

    if scheduler.__class__.__name__ not in _SCHEDULERS:
        raise ConfigError(f"scheduler must be one of {_SCHEDULERS}, got {type(scheduler).__name__}")
    plan = calibrate_cache(unet, scheduler, calib_noise, num_inference_steps, interval, kind, depth, dec,
                           guidance_scale=guidance_scale, unet_kwargs=unet_kwargs, progress=progress)
    quant = None
    model = unet
    if wbits is not None:
        calib = collect_calibration(unet, scheduler, calib_noise, num_inference_steps,
                                    guidance_scale=guidance_scale, unet_kwargs=unet_kwargs, progress=progress)
        quant = quantize_unet(unet, calib, wbits, abits, progress=progress,
                              exclude=DEFAULT_FLOAT_LAYERS if float_layers is None else float_layers)
        if dec:
            fit_quant_correction(quant, unet, calib, plan.mask, depth)
        model = quant.unet
    return CacheQuantModel(model, plan, type(scheduler).__name__, dict(scheduler.config), num_inference_steps, quant)


__all__ = ["CachePlan", "calibrate_cache", "SCHEDULES", "CacheQuantModel", "cachequant", "load_cachequant"]
