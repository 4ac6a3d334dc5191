"""The shared error-feedback loop, clipping search and dequantizer against independent
oracles (issue 30, "one of each")."""
from __future__ import annotations

import torch

from bitpress.formats import QuantizedWeight, minmax_params, qrange
from bitpress.quant import gptq_round_fixed_grid
from bitpress.quant.clip import clip_search, hessian_block_error
from bitpress.quant.feedback import feedback_round
from one_of_each_cases import problem


def _obs_reference(W: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bits: int, gs: int, damp: float = 0.01) -> torch.Tensor:
    """Textbook optimal brain quantization in float64: one column at a time with an explicit
    inverse Hessian, updated by eliminating the quantized column (no blocks, no Cholesky)."""
    qmin, qmax = qrange(bits)
    W = W.double().clone()
    Hd = H.double() + damp * float(torch.diagonal(H).mean()) * torch.eye(H.shape[0],
                                                                         dtype=torch.float64)
    Hinv = torch.linalg.inv(Hd)
    codes = torch.empty_like(W, dtype=torch.int8)
    for j in range(W.shape[1]):
        s, z = scale[:, j // gs].double(), zero[:, j // gs].double()
        q = torch.clamp(torch.round((W[:, j] - z) / s), qmin, qmax)
        codes[:, j] = q.to(torch.int8)
        err = (W[:, j] - (q * s + z)) / Hinv[j, j]
        W[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return codes


def test_feedback_loop_matches_textbook_obs() -> None:
    for seed, (out, n, gs, bs) in enumerate([(24, 96, 32, 128), (16, 80, 16, 40), (8, 50, -1, 7)]):
        W, H = problem(seed, out, n)
        H[3, 3] = 1.0                      # no dead input here: the reference has no such rule
        s, z = minmax_params(W, 3, gs, param_dtype=None)
        ref = _obs_reference(W, H, s, z, 3, n if gs == -1 else gs)
        got = gptq_round_fixed_grid(W, H, s, z, 3, gs, block_size=bs)
        assert float((got == ref).float().mean()) > 0.99, (seed, float((got == ref).float().mean()))


def test_feedback_loop_without_compensation_is_rtn_and_mask_prunes() -> None:
    W, _ = problem(3, 12, 40)
    s, z = minmax_params(W, 4, 8)
    qmin, qmax = qrange(4)
    sx, zx = s.repeat_interleave(8, 1), z.repeat_interleave(8, 1)
    rtn = torch.clamp(torch.round((W - zx) / sx), qmin, qmax).to(torch.int8)
    col_group = torch.arange(40) // 8
    codes, keep = feedback_round(W.T.contiguous(), None, 4, col_group, s.T.contiguous(),
                                 z.T.contiguous(), 16)
    assert keep is None and torch.equal(codes, rtn)
    mask = torch.rand(40, 12, generator=torch.Generator().manual_seed(0)) > 0.5
    codes, keep = feedback_round(W.T.contiguous(), None, 4, col_group, s.T.contiguous(),
                                 z.T.contiguous(), 16, select=lambda i1, i2, Wb, Ub: mask[i1:i2])
    assert torch.equal(keep, mask.T) and torch.equal(codes, torch.where(mask.T, rtn, 0))


def test_clip_search_matches_brute_force() -> None:
    W, H = problem(4, 10, 32)
    bits, grid = 3, (1.0, 0.9, 0.75, 0.6)
    qmin, qmax = qrange(bits)

    def params(c: float) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = minmax_params(W, bits, -1, clip=c)
        return s[:, 0], z[:, 0]

    s, z = clip_search(W, qmin, qmax, grid, params, hessian_block_error(H))
    for r in range(W.shape[0]):
        losses = []
        for c in grid:
            sc, zc = params(c)
            e = torch.clamp(torch.round((W[r] - zc[r]) / sc[r]), qmin, qmax) * sc[r] + zc[r] - W[r]
            losses.append(float(e @ H @ e))
        best = min(range(len(grid)), key=lambda i: (losses[i], i))
        assert float(s[r]) == float(params(grid[best])[0][r])
        assert float(z[r]) == float(params(grid[best])[1][r])


def test_one_dequantizer_for_logical_and_packed_forms() -> None:
    from bitpress.kernels import reference as ref
    g = torch.Generator().manual_seed(7)
    for bits, gs, n, sparse in [(4, 32, 100, False), (3, 16, 64, True), (2, -1, 40, False),
                                (8, 48, 70, True)]:
        qmin, qmax = qrange(bits)
        codes = torch.randint(qmin, qmax + 1, (9, n), generator=g, dtype=torch.int8)
        ng = 1 if gs == -1 else -(-n // gs)
        scale = (torch.rand(9, ng, generator=g) + 0.1).half().float()
        zero = torch.randn(9, ng, generator=g).half().float()
        keep = torch.rand(9, ng, generator=g) > 0.4 if sparse else None
        qw = QuantizedWeight(codes, scale, zero, bits, gs, keep)
        w = qw.dequantize()
        if sparse:
            p = qw.pack_bsr()
            got = ref.sparse_weight(p["row_ptr"], p["col_idx"], p["qvalues"], p["scales"],
                                    p["zeros"], bits, qw.gs, n)
        else:
            p = qw.pack_dense()
            got = ref.dense_weight(p["qweight"], p["scales"], p["zeros"], bits, qw.gs, n)
        assert torch.equal(got, w)
        # and the definition, element by element
        gi = torch.arange(n) // qw.gs
        expect = scale[:, gi] * codes.float() + zero[:, gi]
        if keep is not None:
            expect = expect * keep[:, gi]
        assert torch.equal(w, expect)
