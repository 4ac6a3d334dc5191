"""GPTQ pass and its reusable core (fixed-grid error-feedback rounding, H-weighted loss)."""
from __future__ import annotations

import logging

import pytest
import torch

from bitpress.errors import ConfigError
from bitpress.formats import expand_groups, minmax_params, num_groups, qrange, round_to_grid
from bitpress.quant import (PASSES, NumericalError, QuantSpec, gptq, gptq_round_fixed_grid,
                            hessian_loss, prepare_hessian, rtn)


def hessian_problem(out: int, n: int, seed: int, nsamp: int, dead: int,
                    inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out x n, std 0.02) and H = XᵀX/nsamp for the inputs X = ``inputs(Z, g)`` made from
    standard normal Z (nsamp x n), with ``dead`` random input columns zeroed; every draw
    comes from one generator ``g`` seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    X = inputs(torch.randn(nsamp, n, generator=g), g)
    if dead:
        X[:, torch.randperm(n, generator=g)[:dead]] = 0.0
    H = X.T @ X / nsamp
    W = torch.randn(out, n, generator=g) * 0.02
    return W, H


def make_problem(out: int, n: int, seed: int = 0, dead: int = 3, heterogeneous: bool = False,
                 nsamp: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Random W and H = XᵀX/n from correlated X = Z·A, with ``dead`` dead input columns."""
    def inputs(Z: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        X = Z @ (torch.randn(n, n, generator=g) / n ** 0.5 + torch.eye(n))
        if heterogeneous:  # very different input scales: a non-trivial act-order permutation
            X = X * (torch.rand(n, generator=g) * 3 + 0.1)
        return X

    return hessian_problem(out, n, seed, nsamp, dead, inputs)


def total_loss(W: torch.Tensor, q, H: torch.Tensor) -> float:
    return float(hessian_loss(W, q.dequantize(), H).sum())


def reference_gptq_fixed(W: torch.Tensor, H: torch.Tensor, scale: torch.Tensor,
                         zero: torch.Tensor, bits: int, group_size: int,
                         damp: float = 0.01) -> torch.Tensor:
    """Unblocked textbook loop in float64 (an independent oracle for the blocked code)."""
    qmin, qmax = qrange(bits)
    n = W.shape[1]
    H = H.double().clone()
    W = W.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diagonal(H).mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    s = expand_groups(scale.double(), group_size, n)
    z = expand_groups(zero.double(), group_size, n)
    codes = torch.empty_like(W)
    for i in range(n):
        q = torch.clamp(torch.round((W[:, i] - z[:, i]) / s[:, i]), qmin, qmax)
        codes[:, i] = q
        err = (W[:, i] - (q * s[:, i] + z[:, i])) / Hinv[i, i]
        W[:, i + 1:] -= err[:, None] * Hinv[i, i + 1:][None, :]
        # condition the remaining problem on column i (Schur complement of the inverse)
        Hinv[i + 1:, i + 1:] -= Hinv[i + 1:, i:i + 1] @ Hinv[i:i + 1, i + 1:] / Hinv[i, i]
    return codes.to(torch.int8)


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,gs", [(256, 64), (256, -1), (200, 64), (200, 48), (576, 128)])
def test_gptq_beats_rtn_and_is_well_formed(bits: int, n: int, gs: int) -> None:
    W, H = make_problem(96, n, seed=bits * 1000 + n)
    W0 = W.clone()
    spec = QuantSpec(bits=bits, group_size=gs)
    q = gptq(W, H, spec)
    assert torch.equal(W, W0), "the pass must not modify W"
    qmin, qmax = qrange(bits)
    assert q.codes.dtype == torch.int8 and q.codes.shape == W.shape
    assert int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax
    ng = num_groups(gs, n)
    assert q.scale.shape == (96, ng) and q.zero.shape == (96, ng)
    # parameters are exact in the on-disk dtype, so the stored model dequantises identically
    assert torch.equal(q.scale.half().float(), q.scale)
    assert torch.equal(q.zero.half().float(), q.zero)
    deq = q.dequantize()
    manual = (expand_groups(q.scale, gs, n) * q.codes.float() + expand_groups(q.zero, gs, n))
    assert torch.equal(deq, manual)
    packed = q.pack_dense()
    assert torch.equal(type(q).from_dense(packed["qweight"], packed["scales"], packed["zeros"],
                                          bits, gs, n).dequantize(), deq)
    l_gptq, l_rtn = total_loss(W, q, H), total_loss(W, rtn(W, H, spec), H)
    assert l_gptq < 0.9 * l_rtn, (l_gptq, l_rtn)


def test_matches_unblocked_reference_on_fixed_grid() -> None:
    W, H = make_problem(64, 200, seed=7)
    scale, zero = minmax_params(W, 3, 64)
    ref = reference_gptq_fixed(W, H, scale, zero, 3, 64)
    for bs in (1, 16, 128, 512):
        codes = gptq_round_fixed_grid(W, H, scale, zero, 3, 64, block_size=bs)
        mismatch = float((codes != ref).float().mean())
        assert mismatch < 0.005, (bs, mismatch)  # float32 vs float64 ties only


def test_block_size_does_not_change_the_result() -> None:
    W, H = make_problem(64, 200, seed=8)
    spec = lambda bs: QuantSpec(bits=3, group_size=48, options={"block_size": bs})  # noqa: E731
    a, b = gptq(W, H, spec(128)), gptq(W, H, spec(32))
    assert float((a.codes != b.codes).float().mean()) < 0.005
    assert total_loss(W, b, H) == pytest.approx(total_loss(W, a, H), rel=0.02)


def test_fixed_grid_with_identity_is_round_to_nearest() -> None:
    g = torch.Generator().manual_seed(3)
    W = torch.randn(40, 200, generator=g)
    for bits, gs in ((2, 64), (3, -1), (4, 48), (8, 16)):
        scale, zero = minmax_params(W, bits, gs, clip=0.8)  # clipped: some codes saturate
        expect = round_to_grid(W, scale, zero, bits, gs)
        I = torch.eye(200)
        assert torch.equal(gptq_round_fixed_grid(W, I, scale, zero, bits, gs), expect)
        assert torch.equal(gptq_round_fixed_grid(W, prepare_hessian(I, act_order=True), scale,
                                                 zero, bits, gs), expect)


def test_fixed_grid_feedback_beats_rtn_on_the_same_grid() -> None:
    W, H = make_problem(64, 256, seed=4)
    scale, zero = minmax_params(W, 2, 64)
    factor = prepare_hessian(H)
    codes = gptq_round_fixed_grid(W, factor, scale, zero, 2, 64)
    qmin, qmax = qrange(2)
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    s, z = expand_groups(scale, 64, 256), expand_groups(zero, 64, 256)
    l_fb = hessian_loss(W, s * codes.float() + z, H).sum()
    l_rtn = hessian_loss(W, s * round_to_grid(W, scale, zero, 2, 64).float() + z, H).sum()
    assert l_fb < 0.8 * l_rtn
    # act-order factor: codes come back in natural order and are at least as good
    codes_ao = gptq_round_fixed_grid(W, prepare_hessian(H, act_order=True), scale, zero, 2, 64)
    l_ao = hessian_loss(W, s * codes_ao.float() + z, H).sum()
    assert l_ao < 0.8 * l_rtn


def test_act_order_static_groups_natural_order() -> None:
    # diagonal H: rounding decouples, so GPTQ in any order is RTN on the static grid
    g = torch.Generator().manual_seed(5)
    W = torch.randn(32, 200, generator=g)
    H = torch.diag(torch.rand(200, generator=g) * 5 + 0.1)
    q = gptq(W, H, QuantSpec(bits=3, group_size=64, options={"act_order": True}))
    scale, zero = minmax_params(W, 3, 64)
    assert torch.equal(q.scale, scale) and torch.equal(q.zero, zero)
    assert torch.equal(q.codes, round_to_grid(W, scale, zero, 3, 64))


@pytest.mark.parametrize("bits,gs", [(2, 64), (3, 128), (4, -1)])
def test_act_order_beats_or_matches_plain_gptq(bits: int, gs: int) -> None:
    W, H = make_problem(96, 256, seed=11, heterogeneous=True)
    plain = gptq(W, H, QuantSpec(bits=bits, group_size=gs))
    ao = gptq(W, H, QuantSpec(bits=bits, group_size=gs, options={"act_order": True}))
    assert ao.codes.shape == W.shape and ao.group_size == gs
    assert total_loss(W, ao, H) <= 1.02 * total_loss(W, plain, H)
    assert total_loss(W, ao, H) < total_loss(W, rtn(W, H, QuantSpec(bits=bits, group_size=gs)), H)


@pytest.mark.parametrize("act_order", [False, True])
def test_clip_search_helps_at_two_bits(act_order: bool) -> None:
    W, H = make_problem(96, 256, seed=12, heterogeneous=True)
    base = gptq(W, H, QuantSpec(bits=2, group_size=64, options={"act_order": act_order}))
    clip = gptq(W, H, QuantSpec(bits=2, group_size=64,
                                options={"act_order": act_order, "clip_search": True}))
    assert torch.equal(clip.scale.half().float(), clip.scale)
    assert total_loss(W, clip, H) < total_loss(W, base, H)


def test_symmetric_and_8bit() -> None:
    W, H = make_problem(48, 160, seed=13)
    q = gptq(W, H, QuantSpec(bits=4, group_size=32, sym=True))
    assert bool((q.zero == 0).all())
    assert total_loss(W, q, H) < total_loss(W, rtn(W, H, QuantSpec(bits=4, group_size=32,
                                                                     sym=True)), H)
    q8 = gptq(W, H, QuantSpec(bits=8, group_size=-1))
    assert int(q8.codes.min()) >= -128 and int(q8.codes.max()) <= 127
    assert total_loss(W, q8, H) < 1e-3 * float(hessian_loss(W, torch.zeros_like(W), H).sum())


def test_dead_inputs_are_zero_weight() -> None:
    W, H = make_problem(32, 128, seed=14, dead=5)
    dead = torch.diagonal(H) == 0
    q = gptq(W, H, QuantSpec(bits=4, group_size=-1))
    deq = q.dequantize()
    # dead columns round the weight 0: within half a step of it (0 lies inside the row range)
    assert bool((deq[:, dead].abs() <= q.scale * 0.5 + 1e-7).all())


def test_deterministic() -> None:
    W, H = make_problem(64, 200, seed=15, heterogeneous=True)
    for opts in ({}, {"act_order": True, "clip_search": True}):
        spec = QuantSpec(bits=3, group_size=64, options=opts)
        a, b = gptq(W, H, spec), gptq(W, H, spec)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
        assert torch.equal(a.zero, b.zero)


def test_hessian_loss_per_row() -> None:
    g = torch.Generator().manual_seed(16)
    W, What = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    X = torch.randn(30, 7, generator=g)
    H = X.T @ X / 30
    expect = ((X @ (What - W).T) ** 2).mean(0)
    torch.testing.assert_close(hessian_loss(W, What, H), expect, rtol=1e-5, atol=1e-6)


def test_damping_fallback_logs_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    H = torch.tensor([[1.0, 1.5], [1.5, 1.0]])  # indefinite: needs damping > 0.5
    with caplog.at_level(logging.WARNING, logger="bitpress.quant.gptq"):
        f = prepare_hessian(H, damp=0.0)
    assert f.damp > 0.5 and "retrying" in caplog.text
    hopeless = torch.tensor([[1.0, 1e30], [1e30, 1.0]])
    with pytest.raises(NumericalError):
        prepare_hessian(hopeless)


def test_bad_arguments() -> None:
    W, H = make_problem(8, 64, seed=17)
    spec = QuantSpec(bits=4, group_size=32)
    with pytest.raises(ConfigError, match="Hessian"):
        gptq(W, None, spec)
    with pytest.raises(ConfigError):
        gptq(W, H[:32, :32], spec)
    with pytest.raises(ConfigError):
        gptq(W[0], H, spec)
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ConfigError):
        gptq(bad, H, spec)
    with pytest.raises(ConfigError, match="unknown GPTQ option"):
        gptq(W, H, QuantSpec(bits=4, group_size=32, options={"act-order": True}))
    for opts in ({"damp": -1}, {"block_size": 0}, {"act_order": "yes"}, {"clip_grid": [1.5]}):
        with pytest.raises(ConfigError):
            gptq(W, H, QuantSpec(bits=4, group_size=32, options=opts))
    scale, zero = minmax_params(W, 4, 32)
    with pytest.raises(ConfigError):
        gptq_round_fixed_grid(W, H, scale[:, :1], zero, 4, 32)
    with pytest.raises(ConfigError):
        gptq_round_fixed_grid(W, prepare_hessian(H[:32, :32]), scale, zero, 4, 32)


def test_registry() -> None:
    assert PASSES["gptq"] is gptq and PASSES["rtn"] is rtn
