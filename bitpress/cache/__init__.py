"""CacheQuant for diffusion U-Nets (issue 8).

* :mod:`~bitpress.cache.runtime` -- DeepCache-style cached U-Net for diffusers
  ``UNet2DModel`` / ``UNet2DConditionModel`` (:func:`enable_cache`, :func:`sample_loop`,
  :func:`enable_pipeline_cache`) and MAC counting (:func:`count_macs`).
* :mod:`~bitpress.cache.schedule` -- refresh schedules: :func:`uniform`,
  :func:`deepcache_nonuniform`, :func:`dps` (CacheQuant's exact dynamic programme).
* :mod:`~bitpress.cache.features` -- deep features along full-precision trajectories
  (:func:`collect_features`) and their pairwise errors (:func:`feature_distance_matrix`).
* :mod:`~bitpress.cache.dec` -- decoupled error correction: per-step, per-channel affine
  fixes fitted in closed form (:func:`fit_cache_correction`, :func:`fit_channel_affine`).
* :mod:`~bitpress.cache.plan` -- :func:`calibrate_cache`: schedule + DEC from a calibration
  batch in one call, stored as tensors + JSON (:class:`CachePlan`).
* :mod:`~bitpress.cache.quant` -- W8A8 / W4A8 post-training quantization of the U-Net with
  per-step activation grids, split skip quantizers and real int8 (fbgemm) kernels
  (:func:`quantize_unet`, :func:`collect_calibration`, :class:`QuantizedUNet`) and DEC's
  quantization-error half (:func:`fit_quant_correction`).
* :mod:`~bitpress.cache.fid` -- the benchmark's FID protocol (imported on demand).

diffusers is needed for the runtime (``pip install 'bitpress[diffusion]'``); the schedule
and DEC maths import without it.
"""
from .dec import CacheCorrection, fit_cache_correction, fit_channel_affine
from .plan import CachePlan, CacheQuantModel, cachequant, calibrate_cache, load_cachequant
from .features import collect_features, feature_distance_matrix
from .runtime import (PipelineCache, UNetCache, as_schedule, count_macs, enable_cache,
                      enable_pipeline_cache, get_cache, max_depth, n_evaluations, sample_loop,
                      schedule_macs)
from .quant import (Int8Conv2d, Int8Linear, QuantCorrection, QuantizedUNet, collect_calibration,
                    consumer_layers, fit_quant_correction, get_quant, quantize_unet)
from .schedule import (DPSResult, brute_force_schedule, deepcache_nonuniform, dps, n_refresh,
                       refresh_steps, schedule_cost, segment_costs, uniform)

__all__ = ["CachePlan", "calibrate_cache", "CacheCorrection", "fit_cache_correction", "fit_channel_affine", "collect_features",
           "feature_distance_matrix", "PipelineCache", "UNetCache", "as_schedule", "count_macs",
           "enable_cache", "enable_pipeline_cache", "get_cache", "max_depth", "n_evaluations",
           "sample_loop", "schedule_macs", "DPSResult", "brute_force_schedule",
           "deepcache_nonuniform", "dps", "n_refresh", "refresh_steps", "schedule_cost",
           "segment_costs", "uniform", "Int8Conv2d", "Int8Linear", "QuantizedUNet",
           "collect_calibration", "get_quant", "quantize_unet", "QuantCorrection", "consumer_layers",
           "fit_quant_correction", "CacheQuantModel", "cachequant", "load_cachequant"]
