"""decoupleQ layer solver: oracles (scipy least squares, cvxpy QP, brute force) and invariants."""
from __future__ import annotations

import itertools

import pytest
import torch

from bitpress.errors import ConfigError
from bitpress.formats import minmax_params, num_groups, qrange, round_to_grid
from bitpress.quant import (PASSES, QuantSpec, box_relaxed_codes, decoupleq, decoupleq_solve,
                            gptq, gptq_round_fixed_grid, hessian_loss, least_squares_params)

from test_gptq import make_problem

# Measured on 40 random instances (seeds 0..39) of the brute-force problem below
# (one row, n=8, 2 bits, per-channel, clip grid 1.0..0.5 step 0.05): ratio solver loss / global optimum
# median 1.19, mean 1.93, 8 worst 2.5 .. 3.5 and one outlier at 14.1 (an instance whose
# optimum is tiny: the 8 weights nearly sit on 4 levels that no min/max-started grid finds).
# With the coarser default per-channel grid: median 1.27, worst 14.1.
# The test asserts the median and the worst case over its 12 instances with some headroom.
BRUTE_FORCE_MEDIAN = 1.5
BRUTE_FORCE_WORST = 16.0


def row_loss(W: torch.Tensor, q, H: torch.Tensor) -> torch.Tensor:
    return hessian_loss(W, q.dequantize(), H).double()


def design_matrix(codes_row: torch.Tensor, gs: int, ng: int, sym: bool) -> torch.Tensor:
    """A with Ŵ_row = A θ, θ = (s_1..s_G, z_1..z_G) (or s only when sym)."""
    n = codes_row.numel()
    A = torch.zeros(n, ng if sym else 2 * ng, dtype=torch.float64)
    for k in range(n):
        g = k // gs
        A[k, g] = float(codes_row[k])
        if not sym:
            A[k, ng + g] = 1.0
    return A


# ---------------------------------------------------------------------------------------
# float step == least-squares optimum (scipy and cvxpy)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,gs,sym", [(64, 16, False), (72, 32, False), (40, -1, False),
                                      (48, 16, True)])
def test_float_step_matches_least_squares_oracle(n: int, gs: int, sym: bool) -> None:
    scipy_linalg = pytest.importorskip("scipy.linalg", reason="oracle needs scipy (dev extra)")
    cp = pytest.importorskip("cvxpy", reason="oracle needs cvxpy (dev extra)")
    import numpy as np
    bits = 2
    W, H = make_problem(6, n, seed=n + gs, dead=0)
    qmin, qmax = qrange(bits)
    g = torch.Generator().manual_seed(n)
    # (sym: codes avoid qmin so that a negative optimal scale stays representable by −Q)
    codes = torch.randint(qmin + int(sym), qmax + 1, (6, n), generator=g, dtype=torch.int8)
    q, s, z, loss = least_squares_params(W, H, codes, bits, gs, sym=sym, param_dtype=None)
    ng = num_groups(gs, n)
    eff = n if gs == -1 else gs
    Hd = H.double()
    # H = R Rᵀ: the weighted problem is ordinary least squares ‖Rᵀ(Aθ − w)‖²
    evals, evecs = torch.linalg.eigh(Hd)
    Rt = (evecs * evals.clamp(min=0).sqrt()).T
    for r in range(6):
        A = design_matrix(codes[r], eff, ng, sym)
        w = W[r].double()
        theta, *_ = scipy_linalg.lstsq((Rt @ A).numpy(), (Rt @ w).numpy())
        theta = torch.from_numpy(theta)
        opt = float((A @ theta - w) @ Hd @ (A @ theta - w))
        assert abs(float(loss[r]) - opt) <= 1e-9 + 1e-7 * opt
        # the parameters themselves (the problem is well posed: random codes, PD H); a
        # negative optimal scale comes back flipped, which dequantises identically
        deq = (s[r].repeat_interleave(eff)[:n] * q[r].double()
               + z[r].repeat_interleave(eff)[:n])
        torch.testing.assert_close(deq, A @ theta, rtol=1e-6, atol=1e-9)
        if r == 0:  # cvxpy on the same problem (one row is enough)
            th = cp.Variable(A.shape[1])
            Hn = Hd.numpy()
            obj = cp.Minimize(cp.quad_form(A.numpy() @ th - w.numpy(), cp.psd_wrap(Hn)))
            cp.Problem(obj).solve()
            assert abs(float(obj.value) - opt) <= 1e-6 + 1e-4 * opt
            assert np.allclose(A.numpy() @ th.value, (A @ theta).numpy(), rtol=1e-3, atol=1e-5)


def test_float_step_rounded_params_are_exact_and_near_optimal() -> None:
    W, H = make_problem(32, 200, seed=3)
    codes = round_to_grid(W, *minmax_params(W, 3, 64), 3, 64)
    q, s, z, loss = least_squares_params(W, H, codes, 3, 64)
    q0, s0, z0, loss0 = least_squares_params(W, H, codes, 3, 64, param_dtype=None)
    assert torch.equal(s.half().double(), s) and torch.equal(z.half().double(), z)
    # the reported loss is the loss of exactly the rounded parameters
    from bitpress.formats import QuantizedWeight
    qw = QuantizedWeight(q, s.float(), z.float(), 3, 64)
    torch.testing.assert_close(row_loss(W, qw, H), loss, rtol=1e-5, atol=1e-10)
    assert bool((loss >= loss0 * (1 - 1e-9)).all())
    assert float(loss.sum()) <= float(loss0.sum()) * 1.01


def test_float_step_degenerate_groups() -> None:
    """All-equal codes in a group make (s, z) collinear; a zero group, dead inputs: the solve
    must stay finite and keep the representable optimum."""
    W, H = make_problem(4, 64, seed=5, dead=4)
    codes = torch.zeros(4, 64, dtype=torch.int8)
    codes[1, :32] = 1        # group 0 of row 1 constant, group 1 all zero
    codes[2] = torch.randint(-2, 2, (64,), dtype=torch.int8)
    codes[2, 32:] = -2
    q, s, z, loss = least_squares_params(W, H, codes, 2, 32, param_dtype=None)
    assert bool(torch.isfinite(s).all() & torch.isfinite(z).all() & torch.isfinite(loss).all())
    from bitpress.formats import QuantizedWeight
    qw = QuantizedWeight(q, s.float(), z.float(), 2, 32)
    torch.testing.assert_close(row_loss(W, qw, H), loss, rtol=1e-5, atol=1e-10)
    # row 0: every code 0, so Ŵ = z per group: compare with the z-only least squares
    E = torch.zeros(64, 2, dtype=torch.float64)
    E[:32, 0] = 1
    E[32:, 1] = 1
    Hd = H.double()
    zopt = torch.linalg.lstsq(E.T @ Hd @ E, E.T @ Hd @ W[0].double()).solution
    opt = float((E @ zopt - W[0].double()) @ Hd @ (E @ zopt - W[0].double()))
    assert abs(float(loss[0]) - opt) <= 1e-9 + 1e-6 * opt


# ---------------------------------------------------------------------------------------
# box-relaxed integer step == cvxpy QP optimum
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("gs", [16, -1])
def test_pgd_box_qp_matches_cvxpy(gs: int) -> None:
    cp = pytest.importorskip("cvxpy", reason="oracle needs cvxpy (dev extra)")
    import numpy as np
    bits, n, out = 2, 32, 3
    W, H = make_problem(out, n, seed=11 + gs, dead=0)
    qmin, qmax = qrange(bits)
    # a grid a bit too narrow, so the box constraints are active for some weights
    s, z = minmax_params(W, bits, gs, clip=0.8)
    q = box_relaxed_codes(W, H, s, z, bits, gs, steps=6000, dtype=torch.float64)
    assert float(q.min()) >= qmin and float(q.max()) <= qmax
    eff = n if gs == -1 else gs
    Hn = H.double().numpy()
    for r in range(out):
        sx = s[r].double().repeat_interleave(eff)[:n].numpy()
        zx = z[r].double().repeat_interleave(eff)[:n].numpy()
        w = W[r].double().numpy()
        v = cp.Variable(n)
        obj = cp.Minimize(cp.quad_form(cp.multiply(sx, v) + zx - w, cp.psd_wrap(Hn)))
        cp.Problem(obj, [v >= qmin, v <= qmax]).solve(solver=cp.CLARABEL)
        mine = q[r].numpy()
        e = sx * mine + zx - w
        val = float(e @ Hn @ e)
        assert val <= float(obj.value) * (1 + 1e-6) + 1e-12
        assert np.abs(mine - v.value).max() < 1e-3
        assert ((mine <= qmin + 1e-9) | (mine >= qmax - 1e-9)).any(), "box never active"


# ---------------------------------------------------------------------------------------
# solver invariants
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,n,gs,sym", [(2, 200, 64, False), (2, 256, -1, False),
                                           (3, 200, 48, False), (4, 256, 128, False),
                                           (3, 128, 64, True)])
def test_well_formed_and_reported_loss(bits: int, n: int, gs: int, sym: bool) -> None:
    W, H = make_problem(48, n, seed=bits + n + gs)
    W0 = W.clone()
    spec = QuantSpec(bits=bits, group_size=gs, sym=sym)
    records = []
    q, rep = decoupleq_solve(W, H, spec, records.append)
    assert torch.equal(W, W0)
    qmin, qmax = qrange(bits)
    assert q.codes.dtype == torch.int8 and q.codes.shape == W.shape
    assert int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax
    assert q.scale.shape == (48, num_groups(gs, n))
    assert torch.equal(q.scale.half().float(), q.scale) and torch.equal(q.zero.half().float(), q.zero)
    assert bool((q.scale > 0).all())
    if sym:
        assert bool((q.zero == 0).all())
    exact = row_loss(W, q, H)
    torch.testing.assert_close(exact, rep.row_loss, rtol=1e-5, atol=1e-9)
    assert rep.ls_failures == 0
    assert [r["stage"] for r in records] == ["init"] + ["iter"] * 4
    assert len(rep.losses) == 5 and records[-1]["loss_after"] == rep.losses[-1]


@pytest.mark.parametrize("int_step", ["gptq", "pgd"])
@pytest.mark.parametrize("bits,gs", [(2, 64), (2, -1), (3, 128)])
def test_monotone_and_never_worse_than_init(int_step: str, bits: int, gs: int) -> None:
    n = 192
    W, H = make_problem(40, n, seed=7 * bits, heterogeneous=True)
    # clip_grid [1.0]: the init grid is plain min/max, so RTN and GPTQ can be recomputed here
    spec = QuantSpec(bits=bits, group_size=gs,
                     options={"clip_grid": [1.0], "int_step": int_step, "iters": 4,
                              "pgd_steps": 20})
    q, rep = decoupleq_solve(W, H, spec)
    losses = rep.losses
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:])), losses
    if int_step == "gptq":   # the relaxed step + plain rounding is weaker; it may stall
        assert losses[-1] < losses[0]
    s, z = minmax_params(W, bits, gs)
    rtn_rows = hessian_loss(W, (s.repeat_interleave(n if gs == -1 else gs, 1)[:, :n]
                                * round_to_grid(W, s, z, bits, gs).float()
                                + z.repeat_interleave(n if gs == -1 else gs, 1)[:, :n]), H)
    codes = gptq_round_fixed_grid(W, H, s, z, bits, gs)
    from bitpress.formats import QuantizedWeight
    gptq_rows = row_loss(W, QuantizedWeight(codes, s, z, bits, gs), H)
    final = row_loss(W, q, H)
    best_init = torch.minimum(rtn_rows.double(), gptq_rows)
    assert bool((final <= best_init * (1 + 1e-5) + 1e-12).all())
    assert float(final.sum()) < 0.95 * float(best_init.sum())


@pytest.mark.parametrize("bits,gs", [(2, 64), (2, -1), (3, 128), (4, 128)])
def test_beats_gptq_on_correlated_hessian(bits: int, gs: int) -> None:
    W, H = make_problem(64, 384, seed=100 + bits, heterogeneous=True)
    spec = QuantSpec(bits=bits, group_size=gs)
    ld = float(row_loss(W, decoupleq(W, H, spec), H).sum())
    lg = float(row_loss(W, gptq(W, H, spec), H).sum())
    assert ld < (0.8 if bits == 2 else 0.95) * lg, (ld, lg)


# ---------------------------------------------------------------------------------------
# brute force: one row of 8 weights, 2 bits, per-channel
# ---------------------------------------------------------------------------------------
def brute_force_optimum(w: torch.Tensor, H: torch.Tensor, bits: int) -> float:
    """min over all codes (4^8 at 2 bits) of the least-squares loss over (s, z)."""
    qmin, qmax = qrange(bits)
    n = w.numel()
    Q = torch.tensor(list(itertools.product(range(qmin, qmax + 1), repeat=n)), dtype=torch.float64)
    Hd, wd = H.double(), w.double()
    one = torch.ones(n, dtype=torch.float64)
    QH = Q @ Hd
    a = (QH * Q).sum(1)              # qHq
    b = QH @ one                     # qH1
    c = float(one @ Hd @ one)        # 1H1
    u = QH @ wd                      # qHw
    v = float(one @ Hd @ wd)         # 1Hw
    wHw = float(wd @ Hd @ wd)
    det = a * c - b * b
    ok = det > 1e-12 * (a * c).clamp(min=1e-300)
    # min_θ θᵀMθ − 2 rᵀθ + wHw  =  wHw − rᵀ M⁻¹ r
    quad = torch.where(ok, (c * u * u - 2 * b * u * v + a * v * v) / torch.where(ok, det, 1.0),
                       torch.full_like(a, v * v / c))
    return float((wHw - quad).min().clamp(min=0.0))


def test_brute_force_global_optimum() -> None:
    n, bits = 8, 2
    ratios = []
    for seed in range(12):
        W, H = make_problem(1, n, seed=seed, dead=0, nsamp=64)
        opt = brute_force_optimum(W[0], H, bits)
        spec = QuantSpec(bits=bits, group_size=-1, param_dtype="float32",
                         options={"clip_grid": [1.0 - 0.05 * i for i in range(11)]})
        q = decoupleq(W, H, spec)
        mine = float(row_loss(W, q, H)[0])
        assert mine >= opt * (1 - 1e-6) - 1e-12   # the oracle is a true lower bound
        ratios.append(mine / opt)
    ratios.sort()
    assert ratios[len(ratios) // 2] <= BRUTE_FORCE_MEDIAN, ratios
    assert ratios[-1] <= BRUTE_FORCE_WORST, ratios


# ---------------------------------------------------------------------------------------
# pieces and plumbing
# ---------------------------------------------------------------------------------------
def test_constant_and_zero_rows() -> None:
    W, H = make_problem(8, 128, seed=2)
    W[0] = 0.0
    W[1] = 0.01
    W[2, :64] = -0.02
    q, rep = decoupleq_solve(W, H, QuantSpec(bits=2, group_size=64))
    deq = q.dequantize()
    assert bool(torch.isfinite(deq).all())
    assert float(row_loss(W, q, H)[0]) <= 1e-12
    assert rep.ls_failures == 0


def test_registered_and_options() -> None:
    assert PASSES["decoupleq"] is decoupleq
    W, H = make_problem(8, 64, seed=1)
    with pytest.raises(ConfigError, match="Hessian"):
        decoupleq(W, None, QuantSpec(bits=2, group_size=32))
    with pytest.raises(ConfigError, match="unknown decoupleQ option"):
        decoupleq(W, H, QuantSpec(bits=2, group_size=32, options={"iter": 3}))
    with pytest.raises(ConfigError, match="int_step"):
        decoupleq(W, H, QuantSpec(bits=2, group_size=32, options={"int_step": "sgd"}))
    q, rep = decoupleq_solve(W, H, QuantSpec(bits=2, group_size=32, options={"iters": 0}))
    assert len(rep.losses) == 1
    # small row chunks give the same answer as one chunk
    a = decoupleq(W, H, QuantSpec(bits=3, group_size=32, options={"row_chunk": 3}))
    b = decoupleq(W, H, QuantSpec(bits=3, group_size=32))
    torch.testing.assert_close(row_loss(W, a, H), row_loss(W, b, H), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_pieces_symmetrise_in_place_and_leave_h_alone(dtype):
    """``Hp`` is (H + Hᵀ)/2 bit for bit (made tile by tile in place), and a float64 ``H`` the
    caller passes is not modified."""
    from types import SimpleNamespace

    from bitpress.quant.decoupleq import grouped_normal_pieces

    g = torch.Generator().manual_seed(3)
    n = 2100  # more than one 2048-wide tile
    H = torch.randn(n, n, generator=g, dtype=dtype)
    before = H.clone()
    obj = SimpleNamespace()
    grouped_normal_pieces(obj, torch.randn(8, n, generator=g), H, 64)
    Hd = before.double()
    want = (Hd + Hd.T) * 0.5
    assert torch.equal(obj.Hp[:n, :n], want)
    assert torch.equal(H, before)
