"""bitpress.cache.schedule: uniform, DeepCache non-uniform and the DPS dynamic programme."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch

from bitpress.cache.schedule import (brute_force_schedule, deepcache_nonuniform, dps, n_refresh,
                                     refresh_steps, schedule_cost, segment_costs, uniform)
from bitpress.errors import ConfigError
from conftest import tiny_cond_unet, tiny_plain_unet


pytestmark = pytest.mark.usefixtures("one_thread")


def random_cost(T: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    D = rng.random((T, T)) * rng.random((T, 1)) * 3
    # also give it the typical structure: error grows with the distance |i - j|
    D += np.abs(np.arange(T)[:, None] - np.arange(T)[None, :]) * rng.random() * 0.5
    np.fill_diagonal(D, 0.0)
    return D


def test_uniform_and_budget() -> None:
    m = uniform(10, 3)
    assert refresh_steps(m) == [0, 3, 6, 9] and sum(m) == n_refresh(10, 3) == 4
    assert sum(uniform(100, 5)) == 20
    with pytest.raises(ConfigError):
        uniform(10, 0)


@pytest.mark.parametrize("T,N", [(100, 5), (100, 3), (50, 5), (50, 10), (20, 2), (7, 7), (10, 1)])
def test_deepcache_nonuniform(T: int, N: int) -> None:
    m = deepcache_nonuniform(T, N)
    s = refresh_steps(m)
    assert len(m) == T and m[0] and len(s) == n_refresh(T, N)
    if T == 100 and N == 5:
        gaps = np.diff(s)
        centre = int(np.argmin(np.abs(np.array(s) - 30)))
        assert gaps[max(0, centre - 1)] < gaps[-1]  # denser near the centre than at the end
        assert m != uniform(T, N)


def test_segment_costs() -> None:
    D = random_cost(6, 0)
    C = segment_costs(D)
    assert C[2, 3] == 0.0 and C[2, 5] == pytest.approx(D[2, 3] + D[2, 4])
    assert np.isinf(C[3, 2])


@pytest.mark.parametrize("seed", range(4))
def test_dps_matches_brute_force(seed: int) -> None:
    for T in range(1, 11):
        D = random_cost(T, seed * 100 + T)
        for K in range(1, T + 1):
            got = dps(D, K=K)
            ref = brute_force_schedule(D, K)
            assert got.cost == pytest.approx(ref.cost, rel=1e-12, abs=1e-12)
            assert got.cost == pytest.approx(schedule_cost(D, got.mask), rel=1e-12, abs=1e-12)
            assert sum(got.mask) == K and got.mask[0]


@pytest.mark.parametrize("seed", range(3))
def test_dps_length_bounds_match_brute_force(seed: int) -> None:
    T = 10
    D = random_cost(T, 1000 + seed)
    for K, lo, hi in itertools.product(range(1, T + 1), (1, 2, 3), (2, 3, 5, 10)):
        if lo > hi:
            continue
        if K * lo > T or K * hi < T:
            with pytest.raises(ConfigError):
                dps(D, K=K, min_len=lo, max_len=hi)
            continue
        got = dps(D, K=K, min_len=lo, max_len=hi)
        ref = brute_force_schedule(D, K, lo, hi)
        assert got.cost == pytest.approx(ref.cost, rel=1e-12, abs=1e-12)
        lens = np.diff(got.steps + [T])
        assert lens.min() >= lo and lens.max() <= hi


def test_dps_fast_for_100_steps() -> None:
    D = random_cost(100, 7)
    dps(D, N=5)
    t0 = time.perf_counter()
    res = dps(D, N=5, min_len=2, max_len=10)
    dt = time.perf_counter() - t0
    assert sum(res.mask) == 20 and dt < 0.5  # milliseconds in practice; generous for loaded CI
    assert res.cost <= schedule_cost(D, uniform(100, 5)) + 1e-12


def test_dps_on_real_features_from_tiny_unet() -> None:
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler

    from bitpress.cache.features import collect_features, feature_distance_matrix

    unet = tiny_plain_unet()
    T = 10
    feats = collect_features(unet, DDIMScheduler(num_train_timesteps=1000), torch.randn(2, 1, 8, 8), T)
    assert feats.shape == (T, 2, 16, 8, 8)  # output of up block 0 (upsampled), input of the last
    D = feature_distance_matrix(feats, chunk=3)
    assert torch.allclose(D, D.T) and (D.diagonal() == 0).all() and (D[~torch.eye(T, dtype=bool)] > 0).all()
    assert D[0, 1].item() == pytest.approx((feats[0] - feats[1]).abs().mean().item(), rel=1e-6)
    for K in range(1, T + 1):
        assert dps(D, K=K).cost == pytest.approx(brute_force_schedule(D, K).cost, rel=1e-12, abs=1e-12)
    assert dps(D, N=3).cost <= schedule_cost(D, uniform(T, 3)) + 1e-12


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError):
        dps(np.zeros((3, 4)), K=1)
    with pytest.raises(ConfigError):
        dps(np.zeros((4, 4)))
    with pytest.raises(ConfigError):
        dps(np.zeros((4, 4)), K=5)


def test_collect_features_cfg_batch() -> None:
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler

    from bitpress.cache.features import collect_features

    unet = tiny_cond_unet()
    emb = torch.randn(4, 5, 12)
    F = collect_features(unet, DDIMScheduler(num_train_timesteps=1000), torch.randn(2, 4, 8, 8), 3,
                         guidance_scale=5.0, unet_kwargs={"encoder_hidden_states": emb}, dtype=torch.float16)
    assert F.shape[:2] == (3, 4) and F.dtype == torch.float16 and torch.isfinite(F.float()).all()
    assert not torch.equal(F[:, :2], F[:, 2:])  # the two CFG halves have their own features
