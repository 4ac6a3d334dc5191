"""The fragment-ordered GPU layout (bitpress.kernels.gpu_layout) and the CPU emulator of the
tensor-core kernels (bitpress.kernels.gpu_emulate), checked without a GPU:

* repack ↔ inverse repack round trips, bit-exact, for bits 2/3/4, group sizes 16-256 and
  per-channel, ragged N / K / last groups, dense and group-sparse;
* every magic-number decode (lop3 + 0x6400 / 0x4300 + fma) for every code value of 2/3/4 bits
  at every slot of a word, in fp16 and bf16;
* the emulated kernel (lane → (row, k) fragments, mma, per-group s·D + z·X, stream-K split and
  ordered reduction) against the reference op on random inputs of many shapes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bitpress.errors import ConfigError
from bitpress.formats import quantize_rtn
from bitpress.kernels import gpu_emulate as E
from bitpress.kernels import gpu_layout as L
from bitpress.kernels import reference as R

DT = (torch.float16, torch.bfloat16)


def _dense(n, k, bits, gs, pdt=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = quantize_rtn(torch.randn(n, k, generator=g), bits, gs)
    return qw, qw.pack_dense(pdt)


def _sparse(n, k, bits, gs, frac=0.5, seed=0, skew=False):
    g = torch.Generator().manual_seed(seed)
    ng = -(-k // gs)
    keep = torch.rand(n, ng, generator=g) < frac
    if skew:
        keep[: n // 3] = True
        keep[n // 3: n // 2] = False
    qw = quantize_rtn(torch.randn(n, k, generator=g), bits, gs, keep=keep)
    return qw, qw.pack_bsr()


SHAPES = [(40, 100, 16), (16, 256, 256), (33, 300, -1), (17, 130, 32), (64, 512, 128),
          (5, 64, 48), (130, 200, 64), (16, 16, -1), (24, 1000, 112)]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dense_round_trip(bits):
    for i, (n, k, gs) in enumerate(SHAPES):
        for pdt in (torch.float16, torch.bfloat16, torch.float32):
            qw, p = _dense(n, k, bits, gs, pdt, seed=i)
            g = L.dense_to_gpu(p["qweight"], p["scales"], p["zeros"], bits, qw.gs, k)
            assert g.n_tiles == -(-n // 16) and g.n_chunks * L.CHUNK[bits] >= k
            assert g.qw.shape[2:] == (32, 4) and (g.q1 is not None) == (bits == 3)
            assert g.sz.dtype == (torch.float16 if pdt == torch.float16 else torch.float32)
            back = L.dense_from_gpu(g)
            for name in ("qweight", "scales", "zeros"):
                assert back[name].dtype == p[name].dtype
                assert torch.equal(back[name], p[name]), (bits, n, k, gs, pdt, name)
            # padding rows / columns hold code 0 (unsigned 2^(b-1)) and s = z = 0
            u = L.dense_codes(g)
            assert bool((u[n:] == 1 << (bits - 1)).all()) and bool((u[:, k:] == 1 << (bits - 1)).all())
            assert float(g.sz.reshape(-1, g.n_groups, 16, 2).permute(0, 2, 1, 3)
                         .reshape(-1, g.n_groups, 2)[n:].abs().sum()) == 0


def test_dense_bytes_are_exactly_b_bits_per_code():
    for bits in (2, 3, 4):
        qw, p = _dense(64, 1024, bits, 128)
        g = L.dense_to_gpu(p["qweight"], p["scales"], p["zeros"], bits, 128, 1024)
        code_bytes = g.qw.numel() * 4 + (g.q1.numel() * 4 if g.q1 is not None else 0)
        assert code_bytes * 8 == 64 * 1024 * bits


def test_layout_rejects_unaligned_groups():
    qw, p = _dense(16, 100, 4, 32)   # the format allows multiples of 16 only; the layout checks too
    with pytest.raises(ConfigError, match="multiple of 16"):
        L.dense_to_gpu(p["qweight"], p["scales"], p["zeros"], 4, 20, 100)
    with pytest.raises(ConfigError, match="bits"):
        L.dense_to_gpu(p["qweight"], p["scales"], p["zeros"], 8, 20, 100)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sparse_round_trip_and_tiles(bits):
    for i, (n, k, gs, skew) in enumerate([(40, 256, 32, False), (300, 512, 64, True),
                                          (17, 130, 16, False), (129, 1000, 128, True)]):
        qw, b = _sparse(n, k, bits, gs, seed=i, skew=skew)
        g = L.sparse_to_gpu(b["row_ptr"], b["col_idx"], b["qvalues"], b["scales"], b["zeros"],
                            bits, gs, k)
        back = L.sparse_from_gpu(g)
        for name in b:
            assert torch.equal(back[name], b[name]), (bits, n, k, gs, name)
        # each tile: <= 16 distinct rows of one row block sharing one column, blocks in order
        rows = g.rows.long()
        for t in range(g.n_tiles):
            r = rows[t][rows[t] >= 0]
            assert r.numel() and r.unique().numel() == r.numel()
            assert (r // L.SPARSE_ROW_BLOCK).unique().numel() == 1
        bp = g.block_ptr.long()
        assert int(bp[-1]) == g.n_tiles and bool((bp[1:] >= bp[:-1]).all())
        assert int((rows >= 0).sum()) == g.nnz


def test_sparse_nothing_kept():
    qw = quantize_rtn(torch.randn(20, 64), 4, 32, keep=torch.zeros(20, 2, dtype=torch.bool))
    b = qw.pack_bsr()
    g = L.sparse_to_gpu(*[b[k] for k in ("row_ptr", "col_idx", "qvalues", "scales", "zeros")],
                        4, 32, 64)
    assert g.n_tiles == 0
    back = L.sparse_from_gpu(g)
    assert all(torch.equal(back[k], b[k]) for k in b)
    x = torch.randn(2, 64).half()
    assert torch.equal(E.emulate_sparse(g, x), torch.zeros(2, 20, dtype=torch.float16))


# ---- magic-number decode, exhaustive -----------------------------------------------------------
@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_magic_decode_every_code_every_slot(bits, dtype):
    rng = np.random.default_rng(bits)
    off = 1 << (bits - 1)
    for u in range(1 << bits):
        # a word (or W3 plane pair) whose every slot holds u, then random words with slot j = u
        if bits == 4:
            full = np.array([sum(u << (4 * i) for i in range(8))], dtype=np.uint64)
            words = np.stack([full] * 4, -1)
            q1 = None
        else:
            lo = u & 3
            full = np.array([sum(lo << (2 * i) for i in range(16))], dtype=np.uint64)
            words = np.stack([full] * 4, -1)
            hi = u >> 2
            q1 = np.stack([np.array([sum(hi << i for i in range(32))], dtype=np.uint64)] * 2,
                          -1) if bits == 3 else None
        vals = E.decode_vector(words, q1, bits, dtype)
        assert vals.dtype == dtype
        assert bool((vals.float() == u - off).all()), (bits, u, dtype)
    # random vectors: the decoded fragments equal the codes the layout put in them
    codes = torch.from_numpy(rng.integers(0, 1 << bits, size=(64, 32, 8 if bits > 2 else 8, 8)))
    steps = 4 if bits == 4 else 8
    v = codes[:, :, :steps].reshape(64, 1, 32, steps, 8).long()
    qw, q1 = L._pack_fragments(v, bits)
    got = E.decode_vector(qw.numpy().astype(np.int64), None if q1 is None else
                          q1.numpy().astype(np.int64), bits, dtype)
    assert torch.equal(got.float(), (v - off).float())
    assert torch.equal(L._unpack_fragments(qw, q1, bits), v)


def test_magic_decode_by_hand():
    # 0x6400 | 5 is 1029.0 in fp16; minus 1032 is -3 = code 5 - 8 (W4)
    w = np.array([0x00050005], dtype=np.uint64)
    assert E.magic_pair(w, 0, 0x000F000F, torch.float16, bits=4).tolist() == [[-3.0, -3.0]]
    assert E.magic_pair(w, 0, 0x000F000F, torch.bfloat16, bits=4).tolist() == [[-3.0, -3.0]]
    # W3: low bits 01, plane bit set -> u = 5 -> 5 - 4 = 1
    p = np.array([0x00010001], dtype=np.uint64)
    w = np.array([0x00010001], dtype=np.uint64)
    assert E.magic_pair(w, 0, 0x00030003, torch.float16, p, 0, bits=3).tolist() == [[1.0, 1.0]]


# ---- the emulated kernels against the reference op -------------------------------------------
def _tol(x, w, ref):
    mag = x.float().abs() @ w.abs().t()
    return 2.0 ** -12 * mag + ref.float().abs() * 2.0 ** -7 + 1e-4


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_emulated_dense_matches_reference(bits):
    cases = [(40, 100, 16, 1), (16, 256, 256, 3), (33, 300, -1, 9), (17, 130, 32, 2),
             (64, 512, 128, 1), (48, 1024, 64, 16), (24, 200, 48, 64)]
    for i, (n, k, gs, m) in enumerate(cases):
        dtype = DT[i % 2]
        qw, p = _dense(n, k, bits, gs, seed=10 + i)
        g = L.dense_to_gpu(p["qweight"], p["scales"], p["zeros"], bits, qw.gs, k)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(i)).to(dtype)
        bias = torch.randn(n) if i % 3 else None
        ref = R.dense_qmm_ref(x, p["qweight"], p["scales"], p["zeros"], bias, bits, qw.gs, k)
        for n_sm in (1, 3):   # few CTAs (whole tiles) and more (tiles split across CTAs)
            y = E.emulate_dense(g, x, bias, n_sm=n_sm, ctas_per_sm=2)
            assert y.dtype == dtype and y.shape == ref.shape
            err = (y.float() - ref.float()).abs()
            assert bool((err <= _tol(x, qw.dequantize(), ref)).all()), (bits, n, k, gs, m)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_emulated_sparse_matches_reference(bits):
    for i, (n, k, gs, m, skew) in enumerate([(40, 256, 32, 1, False), (300, 512, 64, 3, True),
                                             (17, 130, 16, 9, False)]):
        dtype = DT[i % 2]
        qw, b = _sparse(n, k, bits, gs, seed=20 + i, skew=skew)
        args = [b[k_] for k_ in ("row_ptr", "col_idx", "qvalues", "scales", "zeros")]
        g = L.sparse_to_gpu(*args, bits, gs, k)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(i)).to(dtype)
        bias = torch.randn(n)
        ref = R.sparse_qmm_ref(x, *args, bias, bits, gs, k)
        y = E.emulate_sparse(g, x, bias)
        err = (y.float() - ref.float()).abs()
        assert bool((err <= _tol(x, qw.dequantize(), ref)).all())


def test_emulator_catches_a_wrong_lane_order():
    qw, p = _dense(32, 256, 4, 64)
    g = L.dense_to_gpu(p["qweight"], p["scales"], p["zeros"], 4, 64, 256)
    x = torch.randn(2, 256).half()
    ref = R.dense_qmm_ref(x, p["qweight"], p["scales"], p["zeros"], None, 4, 64, 256)
    g.qw = g.qw.roll(1, dims=2)
    assert float((E.emulate_dense(g, x).float() - ref.float()).abs().max()) > 1.0


def test_schedule_covers_every_unit_once():
    for units, ctas in [(17, 4), (256 * 64, 264), (5, 5), (100, 7), (1, 1)]:
        s = E.Schedule(units, ctas)
        seen = []
        for b in range(ctas):
            lo, hi = s.range(b)
            assert hi > lo
            seen += list(range(lo, hi))
            assert all(s.cta_of(u) == b for u in range(lo, hi))
        assert seen == list(range(units))
    sch = E.dense_schedule(256, 64, 132)
    assert sch.ctas == 264
    assert E.dense_schedule(1, 2, 132).ctas == 1
    # contributors of a split tile are consecutive CTAs; slot 0 iff it is the CTA's first tile
    s = E.Schedule(40, 7)
    for t in range(4):
        cs = E._tile_contributors(s, t, 10)
        assert [b for b, _ in cs] == list(range(s.cta_of(10 * t), s.cta_of(10 * t + 9) + 1))
        for b, slot in cs:
            assert slot == (0 if s.range(b)[0] // 10 == t else 1)
