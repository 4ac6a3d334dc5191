"""Property-based tests of the canonical format: packing, dequantisation, block-sparse rows."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitpress.errors import ConfigError, FormatError
from bitpress.formats import (QuantizedWeight, magnitude_keep_mask, pack_codes, pack_factor,
                              packed_words, quantize_rtn, unpack_codes)
from bitpress.kernels import native

BITS = st.sampled_from([2, 3, 4, 8])
GROUPS = st.sampled_from([-1, 16, 32, 48, 64, 128, 256])
SETTINGS = settings(max_examples=60, deadline=None)


def random_codes(g: torch.Generator, shape, bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(torch.int8)


@SETTINGS
@given(bits=BITS, rows=st.integers(1, 9), n=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_pack_unpack_identity(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = random_codes(g, (rows, n), bits)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows, packed_words(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)
    assert torch.equal(native.unpack_codes(packed, bits, n), codes)


@SETTINGS
@given(bits=BITS, n=st.integers(1, 64), seed=st.integers(0, 2**31))
def test_pack_bit_layout(bits, n, seed):
    """Element i of word j sits at bits i*b as the unsigned code c + 2^(b-1)."""
    g = torch.Generator().manual_seed(seed)
    codes = random_codes(g, (1, n), bits)
    words = pack_codes(codes, bits)[0].tolist()
    pf = pack_factor(bits)
    for k in range(n):
        word = words[k // pf] & 0xFFFFFFFF
        u = (word >> ((k % pf) * bits)) & ((1 << bits) - 1)
        assert u - (1 << (bits - 1)) == int(codes[0, k])
    # padding slots hold the signed code 0
    for k in range(n, len(words) * pf):
        word = words[k // pf] & 0xFFFFFFFF
        assert (word >> ((k % pf) * bits)) & ((1 << bits) - 1) == 1 << (bits - 1)


@SETTINGS
@given(bits=BITS, group=GROUPS, rows=st.integers(1, 6), n=st.integers(16, 300),
       seed=st.integers(0, 2**31))
def test_dequantize_formula(bits, group, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    gs = n if group == -1 else group
    ng = -(-n // gs)
    codes = random_codes(g, (rows, n), bits)
    scale = torch.rand(rows, ng, generator=g) + 0.1
    zero = torch.randn(rows, ng, generator=g)
    qw = QuantizedWeight(codes, scale, zero, bits, group)
    w = qw.dequantize()
    for r in range(rows):
        for k in range(0, n, max(1, n // 17)):
            expect = scale[r, k // gs] * codes[r, k].float() + zero[r, k // gs]
            assert torch.allclose(w[r, k], expect)
    packed = qw.pack_dense(torch.float32)
    back = QuantizedWeight.from_dense(packed["qweight"], packed["scales"], packed["zeros"], bits,
                                      group, n)
    assert torch.equal(back.dequantize(), w)


@SETTINGS
@given(bits=BITS, group=st.sampled_from([16, 32, 64, 128]), rows=st.integers(1, 8),
       n=st.integers(16, 300), sparsity=st.floats(0.0, 0.9), balanced=st.booleans(),
       seed=st.integers(0, 2**31))
def test_bsr_round_trip(bits, group, rows, n, sparsity, balanced, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g)
    keep = magnitude_keep_mask(w, group, sparsity, balanced)
    qw = quantize_rtn(w, bits, group, param_dtype=torch.float32, keep=keep)
    b = qw.pack_bsr(torch.float32)
    assert b["row_ptr"][-1] == keep.sum() == b["col_idx"].numel()
    back = QuantizedWeight.from_bsr(**b, bits=bits, group_size=group, in_features=n)
    assert torch.equal(back.keep, keep)
    assert torch.equal(back.dequantize(), qw.dequantize())
    # pruned groups are exactly zero, kept ones are the dense dequantisation
    dense = QuantizedWeight(qw.codes, qw.scale, qw.zero, bits, group).dequantize()
    mask = keep.repeat_interleave(group, 1)[:, :n]
    assert torch.equal(back.dequantize()[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(back.dequantize()[mask], dense[mask])
    # the dense packing of a sparse weight dequantises identically too
    d = qw.pack_dense(torch.float32)
    assert torch.equal(QuantizedWeight.from_dense(d["qweight"], d["scales"], d["zeros"], bits, group,
                                                  n).dequantize(), qw.dequantize())


def test_ragged_last_group_smollm_shape():
    """576 columns at group 128: four groups of 128 and one of 64, none padded."""
    torch.manual_seed(0)
    w = torch.randn(4, 576)
    qw = quantize_rtn(w, 4, 128)
    assert qw.n_groups == 5 and qw.scale.shape == (4, 5)
    last = w[:, 512:]
    s, z = qw.scale[:, 4:5], qw.zero[:, 4:5]
    # the short group's range is fitted to its own 64 columns only (shifted by < half a step
    # so that 0 lies on the grid)
    lo = last.min(1, keepdim=True).values
    assert bool(((z + s * -8 - lo).abs() <= s / 2 + 1e-3).all())
    # 0 on the grid, up to the fp16 rounding of z and s (relative 2^-11 each)
    q0 = z / s
    assert bool(((torch.remainder(q0 + 0.5, 1.0) - 0.5).abs() < 1e-3 + q0.abs() * 2**-10).all())
    err = (qw.dequantize() - w).abs().max()
    assert err <= qw.scale.max() / 2 + 1e-3


def test_rtn_error_bounded_by_half_step():
    torch.manual_seed(0)
    for bits in (2, 3, 4, 8):
        w = torch.randn(16, 200)
        qw = quantize_rtn(w, bits, 64, param_dtype=torch.float32)
        step = qw.scale.repeat_interleave(64, 1)[:, :200]
        assert bool(((qw.dequantize() - w).abs() <= step / 2 + 1e-5).all())


@pytest.mark.parametrize("bad", [
    lambda: pack_codes(torch.tensor([[2]], dtype=torch.int8), 2),
    lambda: pack_codes(torch.tensor([[0]], dtype=torch.int32), 4),
    lambda: unpack_codes(torch.zeros(1, 3, dtype=torch.int32), 4, 100),
    lambda: quantize_rtn(torch.randn(4, 64), 5, 32),
    lambda: quantize_rtn(torch.randn(4, 64), 4, 8),
    lambda: quantize_rtn(torch.randn(4, 64), 4, 512),
    lambda: quantize_rtn(torch.randn(4, 64), 4, 40),
    lambda: quantize_rtn(torch.full((4, 64), float("nan")), 4, 32),
    lambda: QuantizedWeight(torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 3),
                            torch.zeros(2, 3), 4, 32),
    lambda: magnitude_keep_mask(torch.randn(4, 64), 16, 1.0),
    lambda: magnitude_keep_mask(torch.randn(4, 64), -1, 0.5),
])
def test_bad_inputs_raise_clear_errors(bad):
    with pytest.raises((FormatError, ConfigError)):
        bad()


def test_fp16_overflow_is_an_error_not_inf():
    w = torch.tensor([[0.0] * 31 + [1e6]])
    qw = quantize_rtn(w, 4, 32, param_dtype=torch.float32)
    with pytest.raises(FormatError, match="float32"):
        qw.pack_dense(torch.float16)


def test_native_extension_built_when_compiler_present():
    import shutil

    if shutil.which("c++") or shutil.which("g++"):
        assert native.available(), "bitpress._C was not built although a C++ compiler exists"


@SETTINGS
@given(rows=st.integers(1, 9), ng=st.integers(1, 40), p=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31))
def test_keep_bits_round_trip(rows, ng, p, seed):
    """The on-disk bitmask (format_version 2) gives back the exact row pointers and column
    indices, one bit per group, rows padded to whole bytes with zero bits."""
    from bitpress.formats import bsr_to_keep_bits, keep_bits_bytes, keep_bits_to_bsr

    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows, ng, generator=g) < p
    row_ptr = torch.zeros(rows + 1, dtype=torch.int32)
    row_ptr[1:] = keep.sum(1).cumsum(0).to(torch.int32)
    cols = keep.nonzero(as_tuple=True)[1].to(torch.int32)
    bits = bsr_to_keep_bits(row_ptr, cols, ng)
    assert bits.dtype == torch.uint8 and bits.shape == (rows, keep_bits_bytes(ng))
    # bit g % 8 of byte g // 8
    for r in range(rows):
        for c in range(ng):
            assert bool((int(bits[r, c // 8]) >> (c % 8)) & 1) == bool(keep[r, c])
    rp, ci = keep_bits_to_bsr(bits, ng)
    assert rp.dtype == ci.dtype == torch.int32
    assert torch.equal(rp, row_ptr) and torch.equal(ci, cols)


def test_keep_bits_rejects_bad_masks():
    from bitpress.formats import keep_bits_to_bsr

    with pytest.raises(FormatError, match="uint8"):
        keep_bits_to_bsr(torch.zeros(2, 5, dtype=torch.int32), 36)
    with pytest.raises(FormatError, match="uint8"):
        keep_bits_to_bsr(torch.zeros(2, 4, dtype=torch.uint8), 36)
    bad = torch.zeros(2, 5, dtype=torch.uint8)
    bad[1, 4] = 1 << 5                       # group 37 of a 36-group row
    with pytest.raises(FormatError, match="past"):
        keep_bits_to_bsr(bad, 36)


def test_bsr_index_must_ascend_once_per_row():
    """Each row lists its kept groups once, in ascending order: an unsorted or repeated
    column index is refused (a bitmask could not hold it, and re-saving would pair codes
    with the wrong groups)."""
    from bitpress.formats import bsr_to_keep_bits, validate_bsr
    from bitpress.formats.packing import packed_words

    rp = torch.tensor([0, 2, 3], dtype=torch.int32)
    q = torch.zeros(3, packed_words(16, 4), dtype=torch.int32)
    sz = torch.ones(3)
    validate_bsr(rp, torch.tensor([0, 3, 0], dtype=torch.int32), q, sz, sz, 4, 16, 64)
    for cols in ([3, 0, 1], [2, 2, 1]):
        with pytest.raises(FormatError, match="ascending"):
            validate_bsr(rp, torch.tensor(cols, dtype=torch.int32), q, sz, sz, 4, 16, 64)
    # descending across a row boundary is fine: row 1 starts again at 0
    validate_bsr(rp, torch.tensor([1, 3, 0], dtype=torch.int32), q, sz, sz, 4, 16, 64)
    with pytest.raises(FormatError, match="twice"):
        bsr_to_keep_bits(rp, torch.tensor([2, 2, 1], dtype=torch.int32), 4)
    with pytest.raises(FormatError, match="range"):
        bsr_to_keep_bits(rp, torch.tensor([0, 4, 1], dtype=torch.int32), 4)



def test_atomic_output_dir_keeps_the_old_output_when_the_swap_fails(tmp_path, monkeypatch):
    """Replacing an existing output: if moving the new one into place fails, the previous
    output is back where it was and nothing new is left behind."""
    import os

    from bitpress.formats import checkpoint as ck

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    real = os.replace

    def flaky(src, dst):
        if Path(dst) == out and ".tmp-" in Path(src).name:
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        with ck.atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
