"""GQSA pass (group pruning + group quantization) and the 2:4 / unstructured baselines."""
from __future__ import annotations

import pytest
import torch

from bitpress.errors import ConfigError
from bitpress.formats import QuantizedWeight, expand_groups, num_groups, qrange
from bitpress.kernels import use_impl
from bitpress.nn import GroupSparseLinear
from bitpress.quant import QuantSpec, hessian_loss
from bitpress.sparse import (SPARSE_PASSES, MaskedLeastSquares, MaskedQuantizedWeight,
                             bits_per_weight_24, bits_per_weight_gqsa,
                             bits_per_weight_unstructured, gqsa, gqsa_keep_mask, gqsa_spec,
                             gqsa_with_mask, group_scores, obs_group_scores,
                             semi_structured_24, unstructured)
from test_gptq import hessian_problem, total_loss


def make_problem(out: int, n: int, seed: int = 0, corr: float = 0.0, dead: int = 0,
                 nsamp: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """W and H = XᵀX/n; ``corr`` mixes in a shared low-rank component (correlated inputs)
    and per-input scales vary, so H is far from diagonal."""
    def inputs(Z: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if corr:
            F = torch.randn(nsamp, 8, generator=g) @ torch.randn(8, n, generator=g)
            Z = (1 - corr) * Z + corr * F
        return Z * (torch.rand(n, generator=g) * 2 + 0.2)

    return hessian_problem(out, n, seed, nsamp, dead, inputs)


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("score", ["obs_seq", "obs", "wanda", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_keep_mask_has_requested_sparsity(balanced: bool, score: str, sparsity: float) -> None:
    W, H = make_problem(48, 128, seed=1)
    q = gqsa(W, H, gqsa_spec(sparsity=sparsity, score=score, balanced_rows=balanced,
                             refine=False))
    G = num_groups(16, 128)
    assert q.keep is not None and q.keep.shape == (48, G)
    pruned = (~q.keep).sum(1)
    if balanced:
        assert bool((pruned == round(sparsity * G)).all())
    else:
        assert int(pruned.sum()) == round(sparsity * 48 * G)
        assert int(pruned.max()) != int(pruned.min()), "uniform per layer: rows differ"


def test_adaptive_mask_keeps_counts() -> None:
    W, H = make_problem(40, 160, seed=2, corr=0.7)
    base = gqsa_keep_mask(W, H, 16, 0.5)
    q = gqsa(W, H, gqsa_spec(mask="adaptive"))
    assert q.keep is not None and torch.equal(q.keep.sum(1), base.sum(1))
    qb = gqsa(W, H, gqsa_spec(mask="adaptive", balanced_rows=True))
    assert bool((qb.keep.sum(1) == 5).all())


@pytest.mark.parametrize("n", [128, 200])
def test_pruned_groups_are_zero_and_bsr_round_trip(n: int) -> None:
    W, H = make_problem(32, n, seed=3, corr=0.5, dead=2)
    W0 = W.clone()
    q = gqsa(W, H, gqsa_spec())
    assert torch.equal(W, W0), "the pass must not modify W"
    assert q.n_groups == num_groups(16, n)
    if n == 200:
        assert q.n_groups == 13 and n - 12 * 16 == 8     # ragged last group of 8
    keep_el = expand_groups(q.keep.float(), 16, n).bool()
    deq = q.dequantize()
    assert bool((deq[~keep_el] == 0).all())
    assert bool((q.codes[~keep_el] == 0).all())
    assert bool((q.zero[~q.keep] == 0).all())
    qmin, qmax = qrange(4)
    assert int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax
    # parameters exact in the on-disk dtype: the packed form dequantises identically
    assert torch.equal(q.scale.half().float(), q.scale)
    assert torch.equal(q.zero.half().float(), q.zero)
    p = q.pack_bsr()
    assert p["col_idx"].numel() == int(q.keep.sum())
    r = QuantizedWeight.from_bsr(p["row_ptr"], p["col_idx"], p["qvalues"], p["scales"],
                                 p["zeros"], 4, 16, n)
    assert torch.equal(r.keep, q.keep)
    assert torch.equal(r.dequantize(), deq)
    # the module runs it and matches x @ Ŵᵀ
    m = GroupSparseLinear.from_quantized(q)
    x = torch.randn(5, n)
    with use_impl("reference"):
        torch.testing.assert_close(m(x), x @ deq.T, rtol=1e-4, atol=1e-5)
    # the default (fast, possibly activation-quantising) path stays close
    assert (m(x) - x @ deq.T).abs().max() <= 0.02 * (x @ deq.T).abs().max()


@pytest.mark.parametrize("sequential", [False, True])
def test_obs_score_matches_brute_force(sequential: bool) -> None:
    torch.manual_seed(0)
    W, H = make_problem(3, 40, seed=4, corr=0.6)     # groups 16, 16, 8 (ragged)
    H = H.double() + 0.05 * torch.eye(40, dtype=torch.float64)
    s = obs_group_scores(W, H, 16, damp=0.0, sequential=sequential)
    n = 40
    for r in range(3):
        w = W[r].double()
        for g, (k0, k1) in enumerate([(0, 16), (16, 32), (32, 40)]):
            G = torch.arange(k0, k1)
            # free weights: all others (full OBS) or only the later ones (sequential)
            free = [k for k in range(n) if not k0 <= k < k1 and (k >= k1 or not sequential)]
            if not free:
                brute = float(w[G] @ H[G][:, G] @ w[G])
                assert abs(float(s[r, g]) - brute) <= 1e-4 * brute + 1e-9
                continue
            F = torch.tensor(free)
            # remove the group, re-fit the rest optimally: min over d_F of
            # [−w_G, d_F] H [−w_G, d_F]ᵀ  →  d_F = H_FF⁻¹ H_FG w_G
            dF = torch.linalg.solve(H[F][:, F], H[F][:, G] @ w[G])
            d = torch.zeros(n, dtype=torch.float64)
            d[G] = -w[G]
            d[F] = dF      # columns neither in G nor free keep their value (d = 0)
            brute = float(d @ H @ d)
            assert abs(float(s[r, g]) - brute) <= 1e-4 * brute + 1e-9, (r, g, float(s[r, g]), brute)


def test_scores_shapes_and_wanda_magnitude() -> None:
    W, H = make_problem(8, 200, seed=5)
    for score in ("obs_seq", "obs", "wanda", "magnitude"):
        s = group_scores(W, H, 16, score)
        assert s.shape == (8, 13) and bool((s >= 0).all())
    xn = torch.diagonal(H).sqrt()
    wa = group_scores(W, H, 16, "wanda")
    assert torch.allclose(wa[:, 0], (W[:, :16].abs() * xn[:16]).sum(1))
    assert torch.allclose(wa[:, 12], (W[:, 192:].abs() * xn[192:]).sum(1) * 2)   # 16 / 8
    mg = group_scores(W, H, 16, "magnitude")
    assert torch.allclose(mg[:, 1], W[:, 16:32].norm(dim=1))


def test_obs_with_compensation_beats_magnitude_and_wanda() -> None:
    W, H = make_problem(64, 192, seed=6, corr=0.8)
    obs = total_loss(W, gqsa(W, H, gqsa_spec()), H)          # default: sequential OBS
    assert obs < total_loss(W, gqsa(W, H, gqsa_spec(score="obs")), H) * 1.05
    mag_rtn = total_loss(W, gqsa(W, H, gqsa_spec(score="magnitude", compensate=False,
                                                  refine=False)), H)
    wanda = total_loss(W, gqsa(W, H, gqsa_spec(score="wanda")), H)
    mag = total_loss(W, gqsa(W, H, gqsa_spec(score="magnitude")), H)
    assert obs < 0.7 * mag_rtn
    assert obs < wanda and obs < mag


@pytest.mark.parametrize("refine", [False, True])
def test_compensation_lowers_loss_for_the_same_mask(refine: bool) -> None:
    W, H = make_problem(48, 160, seed=7, corr=0.7)
    keep = gqsa_keep_mask(W, H, 16, 0.5)
    spec = gqsa_spec(refine=refine, mask="global")
    with_c = gqsa_with_mask(W, H, keep, spec)
    without = gqsa_with_mask(W, H, keep, gqsa_spec(refine=refine, compensate=False))
    assert torch.equal(with_c.keep, without.keep)
    assert total_loss(W, with_c, H) < 0.8 * total_loss(W, without, H)


def test_refit_never_hurts_and_is_the_exact_masked_optimum() -> None:
    W, H = make_problem(24, 96, seed=8, corr=0.5)
    keep = gqsa_keep_mask(W, H, 16, 0.5)
    a = gqsa_with_mask(W, H, keep, gqsa_spec(refine=False, mask="global"))
    b = gqsa_with_mask(W, H, keep, gqsa_spec(refine=True, mask="global"))
    la, lb = hessian_loss(W, a.dequantize(), H), hessian_loss(W, b.dequantize(), H)
    assert bool((lb <= la * (1 + 1e-5) + 1e-9).all()) and float(lb.sum()) < float(la.sum())
    # unrounded refit of row 0 against an explicit constrained least-squares solve
    ls = MaskedLeastSquares(W, H, 16)
    codes, s, z, l1, _ = ls.refine(a.codes, keep, a.scale, a.zero, 4, param_dtype=None)
    r = 0
    cols = []
    for g in range(6):
        if keep[r, g]:
            e = torch.zeros(96, dtype=torch.float64)
            e[g * 16:(g + 1) * 16] = 1.0
            qs = torch.zeros(96, dtype=torch.float64)
            qs[g * 16:(g + 1) * 16] = a.codes[r, g * 16:(g + 1) * 16].double()
            cols += [qs, e]
    A = torch.stack(cols, 1)
    Hd = H.double()
    theta = torch.linalg.solve(A.T @ Hd @ A, A.T @ Hd @ W[r].double())
    best = W[r].double() - A @ theta
    assert abs(float(l1[r]) - float(best @ Hd @ best)) <= 1e-6 * float(best @ Hd @ best) + 1e-12
    what = (expand_groups(s.double(), 16, 96) * codes.double() + expand_groups(z.double(), 16, 96))
    what = what * expand_groups(keep.double(), 16, 96)
    assert torch.allclose(what[r], A @ theta, atol=1e-8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bits(bits: int) -> None:
    W, H = make_problem(32, 128, seed=9, corr=0.5)
    q = gqsa(W, H, gqsa_spec(bits=bits))
    qmin, qmax = qrange(bits)
    assert q.bits == bits and int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax
    # at 8 bits the quantization error vanishes next to the pruning error
    if bits == 8:
        ref = gqsa(W, H, gqsa_spec(bits=8, refine=False))
        assert total_loss(W, q, H) <= total_loss(W, ref, H) * 1.001
    lo = total_loss(W, gqsa(W, H, gqsa_spec(bits=2)), H)
    assert total_loss(W, q, H) <= lo * 1.0001


def test_semi_structured_24() -> None:
    W, H = make_problem(32, 200, seed=10, corr=0.6)
    res = semi_structured_24(W, H, QuantSpec(bits=4, group_size=64))
    qw, mask = res
    assert isinstance(res, MaskedQuantizedWeight) and mask.shape == W.shape
    assert bool((mask.view(32, 50, 4).sum(-1) == 2).all())
    deq = res.dequantize()
    assert bool((deq[~mask] == 0).all()) and res.sparsity == 0.5
    assert torch.equal(deq[mask], qw.dequantize()[mask])
    # compensation: better than 2:4 by magnitude with plain RTN of the kept weights
    Wm = W.clone().view(32, 50, 4)
    idx = Wm.abs().argsort(-1)[..., :2]
    Wm.scatter_(-1, idx, 0.0)
    naive = unstructured(Wm.view(32, 200), torch.eye(200), QuantSpec(bits=4, group_size=64))
    naive_loss = float(hessian_loss(W, naive.dequantize() * (Wm.view(32, 200) != 0), H).sum())
    assert total_loss(W, res, H) < naive_loss


def test_unstructured_and_honest_bits() -> None:
    W, H = make_problem(32, 128, seed=11, corr=0.6)
    res = unstructured(W, H, QuantSpec(bits=4, group_size=32, sparsity=0.5))
    assert abs(res.sparsity - 0.5) < 1e-9
    assert bool((res.dequantize()[~res.mask] == 0).all())
    assert bits_per_weight_24(4, 128) == pytest.approx(2 + 1 + 32 / 128)
    assert bits_per_weight_unstructured(4, 128) == pytest.approx(2 + 1 + 32 / 128)
    # GQSA W4 S50 g16: per kept group 64 code bits + 32 param bits, per group 1 mask bit
    assert bits_per_weight_gqsa(4, 16, 0.5) == pytest.approx(0.5 * 96 / 16 + 1 / 16)
    # 576 inputs = 36 groups: 5 bytes of mask per row
    assert bits_per_weight_gqsa(4, 16, 0.5, out_features=3, in_features=576) == \
        pytest.approx(0.5 * 96 / 16 + 40 / 576)
    assert set(SPARSE_PASSES) == {"gqsa", "sparsegpt24", "unstructured"}


def test_errors() -> None:
    W, H = make_problem(8, 64, seed=12)
    with pytest.raises(ConfigError):
        gqsa(W, None, gqsa_spec())
    with pytest.raises(ConfigError):
        gqsa(W, H, gqsa_spec(score="nope"))
    with pytest.raises(ConfigError):
        gqsa(W, H, gqsa_spec(bogus=1))
    with pytest.raises(ConfigError):
        gqsa(W, H, QuantSpec(bits=4, group_size=-1, sparsity=0.5))
    with pytest.raises(ConfigError):
        semi_structured_24(W, None, QuantSpec())
