"""bitpress.cache.dec: closed-form per-step, per-channel corrections of the cached feature."""
from __future__ import annotations

import json

import pytest
import torch

from bitpress.cache.dec import CacheCorrection, fit_cache_correction, fit_channel_affine
from bitpress.errors import ConfigError, FormatError
from conftest import tiny_plain_unet


pytestmark = pytest.mark.usefixtures("one_thread")


def test_fit_recovers_known_affine_map() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, 5, generator=g) * torch.rand(1, 6, 1, 1, generator=g) * 3
    a = torch.randn(6, generator=g)
    b = torch.randn(6, generator=g)
    y = a.view(1, 6, 1, 1) * x + b.view(1, 6, 1, 1)
    s, o = fit_channel_affine(x, y)
    torch.testing.assert_close(s, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o, b, rtol=1e-5, atol=1e-5)
    # with noise: still close, and the fit beats the identity in squared error
    yn = y + 0.05 * torch.randn(y.shape, generator=g)
    s, o = fit_channel_affine(x, yn)
    torch.testing.assert_close(s, a, rtol=0, atol=0.05)
    # another channel axis
    s2, o2 = fit_channel_affine(x.movedim(1, -1), y.movedim(1, -1), channel_dim=-1)
    torch.testing.assert_close(s2, a, rtol=1e-5, atol=1e-5)


def test_constant_channel_is_stable() -> None:
    x = torch.zeros(2, 3, 4, 4)
    y = torch.full_like(x, 2.0)
    s, o = fit_channel_affine(x, y)
    assert torch.isfinite(s).all() and torch.allclose(o, torch.full((3,), 2.0))
    with pytest.raises(ConfigError):
        fit_channel_affine(x, y[:, :2])


def test_fit_cache_correction_identity_on_refresh_steps_and_roundtrip() -> None:
    g = torch.Generator().manual_seed(1)
    F = torch.randn(5, 2, 3, 4, 4, generator=g)
    corr = fit_cache_correction(F, [True, False, False, True, False])
    assert torch.equal(corr.scale[0], torch.ones(3)) and torch.equal(corr.bias[3], torch.zeros(3))
    # steps 1, 2 map F[0] onto F[1], F[2]; step 4 maps F[3] onto F[4]
    s, o = fit_channel_affine(F[3], F[4])
    torch.testing.assert_close(corr.scale[4], s)
    out = corr(4, 3, F[3])
    torch.testing.assert_close(out, s.view(1, 3, 1, 1) * F[3] + o.view(1, 3, 1, 1))
    back = CacheCorrection.from_tensors(corr.tensors())
    assert torch.equal(back.scale, corr.scale) and torch.equal(back.bias, corr.bias)
    with pytest.raises(FormatError):
        CacheCorrection.from_tensors({})


def test_dec_on_tiny_unet_brings_cached_feature_closer() -> None:
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler

    from bitpress.cache.features import collect_features
    from bitpress.cache.runtime import enable_cache, sample_loop
    from bitpress.cache.schedule import uniform

    unet = tiny_plain_unet()
    T = 12
    sched = DDIMScheduler(num_train_timesteps=1000)
    mask = uniform(T, 4)
    calib = collect_features(unet, sched, torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)), T)
    corr = fit_cache_correction(calib, mask)
    held = collect_features(unet, sched, torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2)), T)

    def err(F: torch.Tensor, use: bool) -> float:
        tot, r = 0.0, 0
        for s in range(T):
            if mask[s]:
                r = s
                continue
            cached = corr(s, r, F[r]) if use else F[r]
            tot += (cached - F[s]).pow(2).mean().item()
        return tot

    assert err(calib, True) < err(calib, False)  # least squares can only do better on its own data
    assert err(held, True) < 0.9 * err(held, False)  # and it generalises to fresh noise

    # installed on the runtime: the transform is applied at cached steps only
    seen: list[tuple[int, int]] = []
    cache = enable_cache(unet, mask)
    corr.install(cache)
    inner = cache.feature_transform
    cache.feature_transform = lambda s, r, f: (seen.append((s, r)), inner(s, r, f))[1]
    noise = torch.randn(2, 1, 8, 8)
    with_dec = sample_loop(unet, sched, noise, T, cache=cache)
    cache.disable()
    assert seen == [(s, max(i for i in range(s + 1) if mask[i])) for s in range(T) if not mask[s]]
    without = sample_loop(unet, sched, noise, T, mask)
    assert not torch.equal(with_dec, without)
    with pytest.raises(ConfigError):
        corr.install(enable_cache(unet, uniform(T + 1, 4)))


def test_calibrate_cache_plans() -> None:
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler

    from bitpress.cache.features import collect_features
    from bitpress.cache.plan import CachePlan, calibrate_cache

    unet = tiny_plain_unet()
    sched = DDIMScheduler(num_train_timesteps=1000)
    noise = torch.randn(4, 1, 8, 8)
    feats = collect_features(unet, sched, noise, 10)
    plans = {k: calibrate_cache(unet, sched, noise, 10, 3, kind=k, features=feats)
             for k in ("uniform", "deepcache", "dps")}
    assert all(sum(p.mask) == 4 and p.mask[0] for p in plans.values())
    assert plans["dps"].feature_error <= min(p.feature_error for p in plans.values()) + 1e-12
    p = plans["dps"]
    back = CachePlan.from_meta(json.dumps(p.meta()), p.tensors())
    assert back.mask == p.mask and torch.equal(back.correction.scale, p.correction.scale)
    cache = back.install(unet)
    assert cache.feature_transform is back.correction
    cache.disable()
    with pytest.raises(ConfigError):
        calibrate_cache(unet, sched, noise, 10, 3, kind="nope", features=feats)
    with pytest.raises(FormatError):
        CachePlan.from_meta({"mask": [1, 0]})
