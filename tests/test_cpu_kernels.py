"""CPU kernels of bitpress::dense_qmm / sparse_qmm against the pure-torch reference.

Tolerances (per output, ``mag = |W| @ |x|`` the magnitude of the dot product):

* ``exact`` mode: ``|y - ref| <= 2e-5 * mag`` (fp32 summation order only);
* ``int8`` mode: ``|y - ref| <= int8_error_bound + 2e-5 * mag`` (the documented bound:
  activations move by at most half an int8 step of their segment);
* ``lut`` mode (2-bit, AVX2): ``|y - ref| <= lut_error_bound + 2e-5 * mag`` (each int8
  table entry is off by at most half a table step; under the scalar ISA lut runs int8);
* bf16 activations: plus half a bf16 ulp of the output (``2^-8 |ref|``), since both sides
  round the fp32 result to bf16.

Every test runs once per ISA this CPU has (scalar always; avx2 / avx512 when present;
avx512-emu, the AVX-512 code path with vpdpbusd emulated by SIMDe, when built).
"""
from __future__ import annotations

import pytest
import torch

from bitpress.formats import magnitude_keep_mask, quantize_rtn
from bitpress.kernels import dense_qmm, reference, select_impl, sparse_qmm, use_impl

cpu = pytest.importorskip("bitpress.kernels.cpu", reason="bitpress._C CPU kernels not built")

ISAS = cpu.available_isas()


# the kernels' results do not depend on the thread count (the sparse tests vary it on
# purpose); one thread keeps this file fast on a small shared machine
pytestmark = pytest.mark.usefixtures("one_thread_per_test")


@pytest.fixture(params=ISAS)
def isa(request):
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa("auto")


def _weight(out: int, inf: int, bits: int, gs: int, param_dtype=torch.float16, keep=None,
            seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inf, generator=g)
    return quantize_rtn(w, bits, gs, param_dtype=param_dtype, keep=keep)


def assert_within_bound(y, ref, mag, bound, dtype):
    """``y`` within the module docstring's tolerance of ``ref``: ``bound`` (the mode's error
    bound, 0 when exact) + 2e-5 * ``mag`` + 1e-6, plus 2^-7 |ref| for 16-bit activations."""
    tol = bound + 2e-5 * mag + 1e-6
    if dtype != torch.float32:
        tol = tol + ref.float().abs() * 2.0 ** -7
    err = (y.float() - ref.float()).abs()
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert bool((err <= tol).all()), f"max err {err.max():.3g}, worst excess {(err - tol).max():.3g}"


def _dense_case(qw, bits, gs_eff, x, bias, mode, param_dtype=torch.float16):
    p = qw.pack_dense(param_dtype)
    inf = qw.in_features
    args = (x, p["qweight"], p["scales"], p["zeros"], bias, bits, gs_eff, inf)
    ref = reference.dense_qmm_ref(*args)
    y = cpu.dense_qmm_cpu(*args, mode=mode)
    w = reference.dense_weight(p["qweight"], p["scales"], p["zeros"], bits, gs_eff, inf)
    mag = x.float().abs() @ w.abs().t()
    bound = cpu.int8_error_bound(x, qw.codes, p["scales"].float(), gs_eff) if mode == "int8" \
        else torch.zeros_like(mag)
    assert_within_bound(y, ref, mag, bound, x.dtype)


# (out, in, group_size): ragged last groups, per-channel (one and several segments),
# rows not a multiple of the 8-row tile, a tiny layer and a larger one
DENSE_SHAPES = [
    (1, 16, 16), (37, 100, 32), (64, 576, 128), (24, 200, -1), (40, 600, -1), (33, 80, 48),
    (19, 272, 256), (8, 160, 80), (13, 112, 112), (72, 1040, 208), (9, 48, 16),
    (130, 1000, 64),
]


@pytest.mark.parametrize("mode", ["exact", "int8"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dense_matches_reference(isa, mode, bits, shape):
    out, inf, gs = shape
    qw = _weight(out, inf, bits, gs, seed=out * 7 + inf)
    gs_eff = inf if gs == -1 else gs
    g = torch.Generator().manual_seed(1)
    for m in (1, 3, 8):
        x = torch.randn(m, inf, generator=g)
        bias = torch.randn(out, generator=g) if m == 3 else None
        _dense_case(qw, bits, gs_eff, x, bias, mode)


@pytest.mark.parametrize("mode", ["exact", "int8"])
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_dtypes_and_batches(isa, mode, param_dtype, x_dtype):
    bits, gs, out, inf = 4, 64, 45, 320
    qw = _weight(out, inf, bits, gs, param_dtype=param_dtype, seed=3)
    g = torch.Generator().manual_seed(2)
    for m in ((1,), (2, 5), (64,), (2, 1, 7)):
        x = torch.randn(*m, inf, generator=g).to(x_dtype)
        _dense_case(qw, bits, gs, x, torch.randn(out, generator=g), mode, param_dtype)


def _skewed_keep(out: int, ng: int, seed: int) -> torch.Tensor:
    """Rows from empty to full: the first rows keep everything, a band keeps nothing, the
    rest is random at ~50%, so an even split of rows would be badly unbalanced."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(out, ng, generator=g) < 0.5
    keep[: max(1, out // 5)] = True
    keep[out // 3: out // 3 + max(1, out // 6)] = False
    return keep


def _assert_sparse_call(x, p, bias, qw, keep, bits, gs, inf, mode, param_dtype=torch.float16):
    """The CPU kernel on the BSR weight ``p`` (packed from ``qw`` with ``keep``) within the
    mode's bound of the reference op."""
    args = (x, p["row_ptr"], p["col_idx"], p["qvalues"], p["scales"], p["zeros"], bias, bits,
            gs, inf)
    ref = reference.sparse_qmm_ref(*args)
    y = cpu.sparse_qmm_cpu(*args, mode=mode)
    w = reference.sparse_weight(*args[1:6], bits, gs, inf)
    mag = x.abs() @ w.abs().t()
    sc = (qw.scale * keep).to(param_dtype).float()
    bound = cpu.int8_error_bound(x, qw.codes, sc, gs) if mode == "int8" else 0 * mag
    assert_within_bound(y, ref, mag, bound, x.dtype)


# g16 at 300, 1024 (one full mask word) and 2100 inputs (three words, the last one partial):
# the batch-1 g16 path walks the mask a word at a time
SPARSE_SHAPES = [(37, 100, 32), (64, 576, 128), (33, 80, 48), (50, 256, 64), (21, 300, 16),
                 (9, 1024, 16), (40, 2100, 16), (96, 1000, 256), (5, 64, 64)]


@pytest.mark.parametrize("mode", ["exact", "int8"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", SPARSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sparse_matches_reference(isa, mode, bits, shape):
    out, inf, gs = shape
    ng = (inf + gs - 1) // gs
    keep = _skewed_keep(out, ng, seed=out + inf)
    qw = _weight(out, inf, bits, gs, keep=keep, seed=out)
    p = qw.pack_bsr()
    g = torch.Generator().manual_seed(5)
    prev = torch.get_num_threads()
    cpu._C.qmm_set_min_work(1)  # split even these small weights across every thread
    try:
        for nt, m in ((1, 1), (2, 1), (2, 3), (3, 9)):
            torch.set_num_threads(nt)
            x = torch.randn(m, inf, generator=g)
            bias = torch.randn(out, generator=g) if m == 3 or nt == 2 else None
            _assert_sparse_call(x, p, bias, qw, keep, bits, gs, inf, mode)
    finally:
        torch.set_num_threads(prev)
        cpu._C.qmm_set_min_work(65536)


def test_sparse_many_threads_tiny_and_empty(isa):
    # more threads than kept groups, an all-pruned weight, a single kept group
    torch.set_num_threads(3)
    cpu._C.qmm_set_min_work(1)
    out, inf, gs, bits = 11, 96, 32, 4
    one = torch.zeros(out, 3, dtype=torch.bool)
    one[0, 2] = True
    for keep in (torch.zeros(out, 3, dtype=torch.bool), one):
        qw = _weight(out, inf, bits, gs, keep=keep)
        p = qw.pack_bsr()
        x = torch.randn(2, inf)
        args = (x, p["row_ptr"], p["col_idx"], p["qvalues"], p["scales"], p["zeros"], None,
                bits, gs, inf)
        torch.testing.assert_close(cpu.sparse_qmm_cpu(*args, mode="exact"),
                                   reference.sparse_qmm_ref(*args), atol=1e-4, rtol=1e-4)
    cpu._C.qmm_set_min_work(65536)


def test_sparse_large_balanced_split_bf16(isa):
    if isa == "scalar":
        pytest.skip("large shape: vector path only")
    out, inf, gs, bits = 512, 2048, 128, 4
    keep = _skewed_keep(out, inf // gs, seed=9)
    qw = _weight(out, inf, bits, gs, keep=keep, seed=9)
    p = qw.pack_bsr()
    x = torch.randn(4, inf).bfloat16()
    args = (x, p["row_ptr"], p["col_idx"], p["qvalues"], p["scales"], p["zeros"], None, bits,
            gs, inf)
    ref = reference.sparse_qmm_ref(*args)
    y = sparse_qmm(*args)  # through the op: default cpu_native
    w = reference.sparse_weight(*args[1:6], bits, gs, inf)
    mag = x.float().abs() @ w.abs().t()
    sc = (qw.scale * keep).to(torch.float16).float()
    assert_within_bound(y, ref, mag, cpu.int8_error_bound(x, qw.codes, sc, gs), x.dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dense_threaded_split(isa, bits):
    torch.set_num_threads(3)
    cpu._C.qmm_set_min_work(1)
    try:
        qw = _weight(43, 200, bits, 64, seed=bits)
        _dense_case(qw, bits, 64, torch.randn(5, 200), torch.randn(43), "int8")
        _dense_case(qw, bits, 64, torch.randn(1, 200), None, "exact")
    finally:
        cpu._C.qmm_set_min_work(65536)


def test_op_dispatch_selects_native_and_modes():
    qw = _weight(24, 128, 4, 32)
    p = qw.pack_dense()
    x = torch.randn(3, 128)
    args = (x, p["qweight"], p["scales"], p["zeros"], None, 4, 32, 128)
    name, _ = select_impl("dense_qmm", "cpu", *args)
    assert name == "cpu_native"
    ref = reference.dense_qmm_ref(*args)
    with use_impl("cpu_exact"):
        torch.testing.assert_close(dense_qmm(*args), ref, atol=1e-4, rtol=1e-4)
    with use_impl("cpu_int8"):
        y8 = dense_qmm(*args)
    bound = cpu.int8_error_bound(x, qw.codes, p["scales"].float(), 32)
    assert bool(((y8 - ref).abs() <= bound + 1e-4).all())
    # dense 8-bit runs natively; group-sparse 8-bit has no CPU kernel: the op must still
    # answer (reference)
    q8 = _weight(8, 64, 8, 32).pack_dense()
    a8 = (torch.randn(1, 64), q8["qweight"], q8["scales"], q8["zeros"], None, 8, 32, 64)
    assert select_impl("dense_qmm", "cpu", *a8)[0] == "cpu_native"
    s8 = _weight(8, 64, 8, 32, keep=_skewed_keep(8, 2, seed=0)).pack_bsr()
    sa8 = (torch.randn(1, 64), s8["row_ptr"], s8["col_idx"], s8["qvalues"], s8["scales"],
           s8["zeros"], None, 8, 32, 64)
    assert select_impl("sparse_qmm", "cpu", *sa8)[0] == "reference"


def test_act_mode_switch_and_isa_errors():
    assert cpu.get_act_mode() in ("lut", "int8", "exact")
    prev = cpu.get_act_mode()
    try:
        cpu.set_act_mode("exact")
        qw = _weight(16, 64, 2, 16)
        p = qw.pack_dense()
        x = torch.randn(1, 64)
        args = (x, p["qweight"], p["scales"], p["zeros"], None, 2, 16, 64)
        torch.testing.assert_close(dense_qmm(*args), reference.dense_qmm_ref(*args),
                                   atol=1e-4, rtol=1e-4)
    finally:
        cpu.set_act_mode(prev)
    with pytest.raises(ValueError):
        cpu.set_act_mode("fp8")
    with pytest.raises(ValueError):
        cpu.set_isa("avx9000")
    for name in ("avx2", "avx512", "avx512-emu"):  # an ISA this CPU or build lacks: clear error
        if name not in ISAS:
            with pytest.raises(ValueError, match=name):
                cpu.set_isa(name)
    assert cpu.get_isa() in ISAS


@pytest.mark.skipif(not {"avx2"} < set(ISAS), reason="needs avx2 and an AVX-512 build to run")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_vnni_builds_equal_avx2_bit_for_bit(bits):
    # vpdpbusd and vpmaddubsw + vpmaddwd give the same exact integers, and the float steps
    # are the same intrinsics: every AVX-512 build must reproduce avx2 to the bit for dense
    # weights, every mode, odd shapes, batch 1..9. The group-sparse row kernels sum 16 lanes
    # per vector in the AVX-512 build and 8 in the AVX2 one (a different fp32 order), so
    # there the builds agree to fp32 rounding (the emulated build, 8 lanes, to the bit)
    others = [i for i in ISAS if i.startswith("avx512")]
    g = torch.Generator().manual_seed(bits)
    cases = []
    for out, inf, gs in ((37, 200, 40), (64, 256, 64), (9, 96, -1), (130, 512, 128)):
        gs_arg = 16 * max(1, gs // 16) if gs > 0 else -1
        qw = _weight(out, inf, bits, gs_arg, seed=out + inf)
        gs_eff = inf if gs_arg == -1 else gs_arg
        p = qw.pack_dense()
        for m in (1, 4, 9):
            x = torch.randn(m, inf, generator=g)
            cases.append((x, p["qweight"], p["scales"], p["zeros"], None, bits, gs_eff, inf))
    keep = _skewed_keep(48, 16, seed=bits)
    p = _weight(48, 256, bits, 16, keep=keep).pack_bsr()
    sargs = (p["row_ptr"], p["col_idx"], p["qvalues"], p["scales"], p["zeros"], None, bits, 16, 256)
    # (group-sparse kernels take 2/3/4-bit weights only)
    xs = [torch.randn(m, 256, generator=g) for m in (1, 5)] if bits != 8 else []
    modes = ("int8", "exact", "lut", "lut63") if bits == 2 else ("int8", "exact")
    try:
        for mode in modes:
            cpu.set_isa("avx2")
            want = [cpu.dense_qmm_cpu(*a, mode=mode) for a in cases]
            want_s = [cpu.sparse_qmm_cpu(x, *sargs, mode=mode) for x in xs]
            for name in others:
                cpu.set_isa(name)
                for a, w in zip(cases, want):
                    assert torch.equal(cpu.dense_qmm_cpu(*a, mode=mode), w), (name, mode, a[0].shape)
                for x, w in zip(xs, want_s):
                    got = cpu.sparse_qmm_cpu(x, *sargs, mode=mode)
                    if name == "avx512":
                        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))
                    else:
                        assert torch.equal(got, w), (name, mode)
    finally:
        cpu.set_isa("auto")


def test_prefetch_distance_changes_nothing_but_speed():
    # prefetching past the end of a weight (1 MiB ahead of a few-KiB buffer) must not fault
    # and no distance may change a result bit
    dense = [(_weight(40, 200, b, 32 if b != 2 else 64).pack_dense(), b, 32 if b != 2 else 64)
             for b in (2, 3, 4)]
    keep = magnitude_keep_mask(torch.randn(24, 200), 16, 0.5)
    sp = _weight(24, 200, 4, 16, keep=keep).pack_bsr()
    x = torch.randn(3, 200)

    def run():
        ys = [cpu.dense_qmm_cpu(x[:m], p["qweight"], p["scales"], p["zeros"], None, b, g, 200)
              for p, b, g in dense for m in (1, 3)]
        ys.append(cpu.sparse_qmm_cpu(x, sp["row_ptr"], sp["col_idx"], sp["qvalues"],
                                     sp["scales"], sp["zeros"], None, 4, 16, 200))
        return ys

    prev = cpu.get_prefetch()
    assert prev == cpu.DEFAULT_PREFETCH_BYTES
    try:
        base = run()
        for d in (0, 64, 1 << 20):
            cpu.set_prefetch(d)
            assert cpu.get_prefetch() == d
            for y, y0 in zip(run(), base):
                assert torch.equal(y, y0)
    finally:
        cpu.set_prefetch(prev)
    for bad in (-1, 1.5, True, "2048"):
        with pytest.raises(ValueError):
            cpu.set_prefetch(bad)


@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (8, 8), (13, 37), (50, 64), (67, 203), (9, 1030)])
def test_half_linear_matches_fp32_linear(isa, wdtype, shape):
    out, inf = shape
    g = torch.Generator().manual_seed(out * 1000 + inf)
    w = (torch.randn(out, inf, generator=g) * 0.1).to(wdtype)
    ref_w = w.double()
    prev = torch.get_num_threads()
    cpu._C.qmm_set_min_work(1)  # split even tiny weights across threads
    try:
        for nt, m, xdt, bias in ((1, 1, torch.float32, False), (3, 4, torch.float32, True),
                                 (2, 7, torch.bfloat16, True)):
            torch.set_num_threads(nt)
            x = torch.randn(2, m, inf, generator=g).to(xdt)
            b = torch.randn(out, generator=g) if bias else None
            y = cpu.half_linear_cpu(x, w, b)
            ref = torch.nn.functional.linear(x.double(), ref_w, None if b is None else b.double())
            assert y.dtype == xdt and y.shape == (2, m, out)
            tol = 1e-5 * (x.double().abs() @ ref_w.abs().t()) + 1e-6
            if xdt != torch.float32:
                tol = tol + ref.abs() * 2.0 ** -7
            assert bool(((y.double() - ref).abs() <= tol).all())
    finally:
        torch.set_num_threads(prev)
        cpu._C.qmm_set_min_work(65536)


def test_half_linear_rejects_bad_input():
    w = torch.randn(4, 8).half()
    with pytest.raises(ValueError):
        cpu.half_linear_cpu(torch.randn(1, 8), w.float())
    with pytest.raises(ValueError):
        cpu.half_linear_cpu(torch.randn(1, 7), w)
    with pytest.raises(ValueError):
        cpu.half_linear_cpu(torch.randn(1, 8), w, torch.randn(5))
    with pytest.raises(ValueError):
        cpu.half_linear_cpu(torch.randn(1, 8), w.reshape(2, 2, 8))
    assert cpu.half_linear_cpu(torch.randn(0, 8), w).shape == (0, 4)


def test_repack_cache_sees_inplace_updates():
    qw = _weight(16, 64, 4, 32)
    p = qw.pack_dense()
    x = torch.randn(2, 64)
    args = lambda: (x, p["qweight"], p["scales"], p["zeros"], None, 4, 32, 64)  # noqa: E731
    y0 = cpu.dense_qmm_cpu(*args(), mode="exact")
    p["scales"].mul_(2)
    p["qweight"].bitwise_xor_(0x11111111)
    y1 = cpu.dense_qmm_cpu(*args(), mode="exact")
    torch.testing.assert_close(y1, reference.dense_qmm_ref(*args()), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(y0, y1)


def _errors_in_practice(bits, gs, modes):
    """Relative output errors against the reference of a random 256 x 1024 RTN weight on 4
    random inputs: that of the weight quantisation itself (``x @ w.t()``), then one per
    kernel mode in ``modes``."""
    w = torch.randn(256, 1024)
    qw = quantize_rtn(w, bits, gs)
    p = qw.pack_dense()
    x = torch.randn(4, 1024)
    args = (x, p["qweight"], p["scales"], p["zeros"], None, bits, gs, 1024)
    ref = reference.dense_qmm_ref(*args)
    rel = lambda y: ((y - ref).norm() / ref.norm()).item()  # noqa: E731
    return rel(x @ w.t()), *(rel(cpu.dense_qmm_cpu(*args, mode=m)) for m in modes)


def test_int8_error_is_small_in_practice():
    # the bound is worst case; typical error is far below it and below the weight error
    rel_w, rel = _errors_in_practice(4, 128, ["int8"])
    assert rel < 1e-2 and rel < rel_w / 5


# ---- 2-bit lookup-table kernel (mode "lut": AVX2 only; elsewhere it runs int8) -------------
LUT_SHAPES = [(1, 16, 16), (37, 100, 32), (24, 200, -1), (40, 600, -1), (33, 80, 48),
              (19, 272, 256), (72, 1040, 208), (130, 1000, 64)]


def _lut_case(qw, gs_eff, x, bias, param_dtype=torch.float16):
    p = qw.pack_dense(param_dtype)
    inf = qw.in_features
    args = (x, p["qweight"], p["scales"], p["zeros"], bias, 2, gs_eff, inf)
    ref = reference.dense_qmm_ref(*args)
    w = reference.dense_weight(p["qweight"], p["scales"], p["zeros"], 2, gs_eff, inf)
    mag = x.float().abs() @ w.abs().t()
    sc = p["scales"].float()
    for mode in ("lut", "lut63"):
        y = cpu.dense_qmm_cpu(*args, mode=mode)
        if cpu.get_isa() != "scalar":
            bound = cpu.lut_error_bound(x, qw.codes, sc, gs_eff, mode=mode)
        else:  # the scalar ISA has no lut kernel: int8 runs instead
            bound = cpu.int8_error_bound(x, qw.codes, sc, gs_eff)
            torch.testing.assert_close(y, cpu.dense_qmm_cpu(*args, mode="int8"), rtol=0, atol=0)
        assert_within_bound(y, ref, mag, bound, x.dtype)


@pytest.mark.parametrize("shape", LUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lut_w2_matches_reference(isa, shape):
    out, inf, gs = shape
    qw = _weight(out, inf, 2, gs, seed=out * 5 + inf)
    gs_eff = inf if gs == -1 else gs
    g = torch.Generator().manual_seed(11)
    for m in (1, 3, 6):
        x = torch.randn(m, inf, generator=g)
        if m == 6:
            x[:, : inf // 3] *= 40  # segments of very different magnitude
        _lut_case(qw, gs_eff, x, torch.randn(out, generator=g) if m == 3 else None)


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32])
def test_lut_w2_dtypes_threads_batched_shapes(isa, param_dtype):
    qw = _weight(45, 320, 2, 64, param_dtype=param_dtype, seed=4)
    g = torch.Generator().manual_seed(3)
    torch.set_num_threads(3)
    cpu._C.qmm_set_min_work(1)
    try:
        for shp, dt in (((1, 1), torch.float32), ((2, 5), torch.bfloat16), ((9,), torch.float16)):
            x = torch.randn(*shp, 320, generator=g).to(dt)
            _lut_case(qw, 64, x, torch.randn(45, generator=g), param_dtype)
    finally:
        cpu._C.qmm_set_min_work(65536)


def test_lut_modes_share_weight_and_other_bits_run_int8():
    # both repacks of one weight live side by side in the cache; 3/4-bit "lut" is int8
    qw = _weight(24, 256, 2, 64, seed=8)
    p = qw.pack_dense()
    x = torch.randn(2, 256)
    args = (x, p["qweight"], p["scales"], p["zeros"], None, 2, 64, 256)
    ref = reference.dense_qmm_ref(*args)
    for mode in ("int8", "lut", "exact", "lut"):
        assert (cpu.dense_qmm_cpu(*args, mode=mode) - ref).abs().max() < 0.1 * ref.abs().max()
    for bits in (3, 4):
        p4 = _weight(24, 256, bits, 64).pack_dense()
        a4 = (x, p4["qweight"], p4["scales"], p4["zeros"], None, bits, 64, 256)
        assert torch.equal(cpu.dense_qmm_cpu(*a4, mode="lut"), cpu.dense_qmm_cpu(*a4, mode="int8"))
        assert torch.equal(cpu.dense_qmm_cpu(*a4, mode="lut63"),
                           cpu.dense_qmm_cpu(*a4, mode="int8"))
    with use_impl("cpu_lut"):
        assert torch.equal(dense_qmm(*args), cpu.dense_qmm_cpu(*args, mode="lut"))


def test_lut_error_is_small_in_practice():
    if ISAS == ["scalar"]:
        pytest.skip("no SIMD ISA: the lut kernel does not run")
    rel_w, rel, rel63 = _errors_in_practice(2, 64, ["lut", "lut63"])
    assert rel < 3e-2 and rel < rel_w / 10
    assert rel63 < 6e-2 and rel63 < rel_w / 5  # tables in +-63: about twice the error


# ---- the GEMM path: dequantised panels through torch's BLAS ------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dense_gemm_path_is_the_reference_bit_for_bit(bits, shape):
    # the dequantised panel is computed with the reference's arithmetic (fp32 product, then
    # sum, no FMA), and one panel is exactly the reference's F.linear call
    out, inf, gs = shape
    gs_eff = inf if gs == -1 else gs
    g = torch.Generator().manual_seed(out * 7 + inf)
    for pdt in (torch.float16, torch.bfloat16, torch.float32):
        qw = _weight(out, inf, bits, gs, param_dtype=pdt, seed=out + bits)
        p = qw.pack_dense(pdt)
        for m, xdt, with_bias in ((1, torch.float32, False), (17, torch.float32, True),
                                  (5, torch.bfloat16, True)):
            x = torch.randn(m, inf, generator=g).to(xdt)
            bias = torch.randn(out, generator=g) if with_bias else None
            args = (x, p["qweight"], p["scales"], p["zeros"], bias, bits, gs_eff, inf)
            y = cpu.dense_qmm_cpu(*args, mode="blas")
            ref = reference.dense_qmm_ref(*args)
            assert y.dtype == ref.dtype and torch.equal(y, ref)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sparse_gemm_path_is_the_reference_bit_for_bit(bits):
    g = torch.Generator().manual_seed(bits)
    for out, inf, gs in SPARSE_SHAPES:
        keep = _skewed_keep(out, (inf + gs - 1) // gs, seed=out + inf)
        p = _weight(out, inf, bits, gs, keep=keep, seed=out).pack_bsr()
        x = torch.randn(9, inf, generator=g)
        bias = torch.randn(out, generator=g)
        args = (x, p["row_ptr"], p["col_idx"], p["qvalues"], p["scales"], p["zeros"], bias,
                bits, gs, inf)
        assert torch.equal(cpu.sparse_qmm_cpu(*args, mode="blas"), reference.sparse_qmm_ref(*args))


def test_gemm_path_in_panels_and_threads(monkeypatch):
    # a weight larger than one panel is multiplied panel by panel (ragged last panel); the
    # dequantisation threads over rows; both must give the reference (up to BLAS blocking)
    monkeypatch.setattr(cpu.gemm, "GEMM_PANEL_BYTES", 4 * 96 * 24)   # 24 rows of 96 columns
    torch.set_num_threads(2)
    qw = _weight(100, 96, 3, 32)
    p = qw.pack_dense()
    x = torch.randn(40, 96)
    bias = torch.randn(100)
    args = (x, p["qweight"], p["scales"], p["zeros"], bias, 3, 32, 96)
    torch.testing.assert_close(cpu.dense_qmm_cpu(*args, mode="blas"),
                               reference.dense_qmm_ref(*args), atol=1e-5, rtol=1e-5)
    keep = _skewed_keep(100, 3, seed=1)
    s = _weight(100, 96, 4, 32, keep=keep).pack_bsr()
    sargs = (x, s["row_ptr"], s["col_idx"], s["qvalues"], s["scales"], s["zeros"], bias, 4, 32,
             96)
    torch.testing.assert_close(cpu.sparse_qmm_cpu(*sargs, mode="blas"),
                               reference.sparse_qmm_ref(*sargs), atol=1e-5, rtol=1e-5)
    # one panel, enough rows x columns for the dequantisation to split over both threads
    monkeypatch.setattr(cpu.gemm, "GEMM_PANEL_BYTES", 8 << 20)
    w = torch.randn(320, 304)
    x = torch.randn(12, 304)
    p = quantize_rtn(w, 2, 16).pack_dense()
    args = (x, p["qweight"], p["scales"], p["zeros"], None, 2, 16, 304)
    assert torch.equal(cpu.dense_qmm_cpu(*args, mode="blas"), reference.dense_qmm_ref(*args))
    s = quantize_rtn(w, 4, 16, keep=magnitude_keep_mask(w, 16, 0.5)).pack_bsr()
    sargs = (x, s["row_ptr"], s["col_idx"], s["qvalues"], s["scales"], s["zeros"], None, 4, 16,
             304)
    assert torch.equal(cpu.sparse_qmm_cpu(*sargs, mode="blas"), reference.sparse_qmm_ref(*sargs))


def test_native_switches_to_the_gemm_path_at_gemm_rows():
    # cpu_native: below gemm_rows the activation-mode kernel (lut for 2-bit: approximate),
    # from gemm_rows on the exact GEMM path, through the op and through a module's plan
    from bitpress.nn import QuantLinear

    prev = cpu.get_gemm_rows()
    qw = _weight(48, 256, 2, 64)
    p = qw.pack_dense()
    lin = QuantLinear.from_quantized(qw, bias=None)
    try:
        cpu.set_gemm_rows(8)
        for m in (1, 7, 8, 30):
            x = torch.randn(m, 256)
            args = (x, p["qweight"], p["scales"], p["zeros"], None, 2, 64, 256)
            ref = reference.dense_qmm_ref(*args)
            y, ym = dense_qmm(*args), lin(x.reshape(1, m, 256)).reshape(m, 48)
            if m >= 8:
                assert torch.equal(y, ref) and torch.equal(ym, ref)
            elif cpu.get_act_mode() != "exact":
                assert not torch.equal(y, ref)
                assert float((y - ref).norm() / ref.norm()) < 0.05
        cpu.set_gemm_rows(10 ** 9)   # off: the kernel at every size
        x = torch.randn(30, 256)
        args = (x, p["qweight"], p["scales"], p["zeros"], None, 2, 64, 256)
        if cpu.get_act_mode() != "exact":
            assert not torch.equal(dense_qmm(*args), reference.dense_qmm_ref(*args))
        for bad in (0, -1, 2.5, True):
            with pytest.raises(ValueError):
                cpu.set_gemm_rows(bad)
    finally:
        cpu.set_gemm_rows(prev)


def test_gemm_path_rejects_malformed_weights():
    qw = _weight(16, 64, 4, 32)
    p = qw.pack_dense()
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="scales/zeros"):
        cpu.dense_qmm_cpu(x, p["qweight"], p["scales"][:, :1], p["zeros"], None, 4, 32, 64,
                          mode="blas")
    s = _weight(16, 64, 4, 32, keep=torch.ones(16, 2, dtype=torch.bool)).pack_bsr()
    bad = s["col_idx"].clone()
    bad[0] = 7
    with pytest.raises(ValueError, match="col_idx"):
        cpu.sparse_qmm_cpu(x, s["row_ptr"], bad, s["qvalues"], s["scales"], s["zeros"], None, 4,
                           32, 64, mode="blas")


@pytest.mark.parametrize("spread", ["randn", "heavy"])
def test_exact_mode_is_fp32_accurate(isa, spread):
    """The exact mode against the float64 product of the same dequantised weight: on the SIMD
    ISAs x enters as three int8 planes, which must reproduce it to fp32 accuracy. Bounds
    relative to sum |W||x|: measured worst 4.7e-7 (randn) and 7.0e-6 (activations spread over
    e^(2 randn)); with the last plane dropped the same cases reach 4.4e-5 and 1.8e-3."""
    limit = {"randn": 4e-6, "heavy": 5e-5}[spread]
    worst = 0.0
    for out, inf, gs in DENSE_SHAPES:
        for bits in (2, 3, 4, 8):
            qw = _weight(out, inf, bits, gs, seed=bits)
            gse = gs if gs > 0 else inf
            p = qw.pack_dense(torch.float16)
            g = torch.Generator().manual_seed(out + bits)
            x = torch.randn(3, inf, generator=g)
            if spread == "heavy":
                x = x * torch.exp(2 * torch.randn(1, inf, generator=g))
            w = reference.dense_weight(p["qweight"], p["scales"], p["zeros"], bits, gse, inf)
            y64 = x.double() @ w.double().t()
            mag = x.double().abs() @ w.double().abs().t()
            y = cpu.dense_qmm_cpu(x, p["qweight"], p["scales"], p["zeros"], None, bits, gse, inf,
                                  mode="exact")
            worst = max(worst, float(((y.double() - y64).abs() / mag).max()))
    assert worst <= limit, f"{isa}: worst relative error {worst:.3g} > {limit:g}"


@pytest.mark.parametrize("spread", ["randn", "heavy"])
def test_sparse_exact_mode_is_fp32_accurate(isa, spread):
    """As the dense test above, for group-sparse weights in their default layout (row tiles on
    avx512: three int8 planes of x; row streams elsewhere: fp32)."""
    limit = {"randn": 4e-6, "heavy": 5e-5}[spread]
    worst = 0.0
    for out, inf, gs in SPARSE_SHAPES:
        for bits in (2, 3, 4):
            keep = _skewed_keep(out, (inf + gs - 1) // gs, seed=bits)
            p = _weight(out, inf, bits, gs, keep=keep, seed=bits).pack_bsr()
            g = torch.Generator().manual_seed(out + bits)
            x = torch.randn(3, inf, generator=g)
            if spread == "heavy":
                x = x * torch.exp(2 * torch.randn(1, inf, generator=g))
            args = (p["row_ptr"], p["col_idx"], p["qvalues"], p["scales"], p["zeros"])
            w = reference.sparse_weight(*args, bits, gs, inf)
            y64 = x.double() @ w.double().t()
            mag = x.double().abs() @ w.double().abs().t() + 1e-30
            y = cpu.sparse_qmm_cpu(x, *args, None, bits, gs, inf, mode="exact")
            worst = max(worst, float(((y.double() - y64).abs() / mag).max()))
    assert worst <= limit, f"{isa}: worst relative error {worst:.3g} > {limit:g}"


# odd row counts (partial 16-row tiles), inputs not a multiple of the group, every group size
# class (one 16-column sub-block, several, the largest), tiles with empty groups and empty rows
ROW_TILE_SHAPES = [(37, 100, 32), (5, 64, 16), (16, 48, 16), (33, 300, 16), (40, 512, 64),
                   (19, 520, 256), (64, 1024, 16)]


@pytest.mark.parametrize("layout", ["tiles", "tiles16", "tiles24", "streams"])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_sparse_layouts_match_reference(isa, monkeypatch, layout, bits, param_dtype):
    """Both sparse runtime layouts on every ISA (row tiles run the AVX-512 kernel on avx512 and
    the portable scalar one elsewhere), every tile height, every parameter dtype, batch 1..9,
    1-3 threads."""
    if layout.startswith("tiles") and layout != "tiles":
        monkeypatch.setenv("BITPRESS_SPARSE_TILE_ROWS", layout[5:])
        layout = "tiles"
    monkeypatch.setenv("BITPRESS_SPARSE_LAYOUT", layout)
    assert cpu.sparse_layout(bits) == (1 if layout == "tiles" else 0)
    cpu._C.qmm_set_min_work(1)
    prev = torch.get_num_threads()
    try:
        for i, (out, inf, gs) in enumerate(ROW_TILE_SHAPES):
            keep = _skewed_keep(out, (inf + gs - 1) // gs, seed=i)
            qw = _weight(out, inf, bits, gs, param_dtype=param_dtype, keep=keep, seed=i)
            p = qw.pack_bsr(param_dtype)
            args = (p["row_ptr"], p["col_idx"], p["qvalues"], p["scales"], p["zeros"])
            packed = cpu._sparse_packed(*args, bits, gs, inf)[0]
            tagged = int(packed[:8].view(torch.int64)) != 0  # a row-tile buffer starts with its tag
            assert tagged == (layout == "tiles")
            g = torch.Generator().manual_seed(i)
            for nt, m in ((1, 1), (2, 2), (3, 5), (2, 9)):
                torch.set_num_threads(nt)
                x = torch.randn(m, inf, generator=g)
                bias = torch.randn(out, generator=g) if m != 1 else None
                for mode in ("exact", "int8"):
                    _assert_sparse_call(x, p, bias, qw, keep, bits, gs, inf, mode, param_dtype)
    finally:
        torch.set_num_threads(prev)
        cpu._C.qmm_set_min_work(65536)


def test_sparse_layout_choice_and_errors(monkeypatch):
    keep = _skewed_keep(20, 4, seed=1)
    p = _weight(20, 64, 4, 16, keep=keep).pack_bsr()
    args = (p["row_ptr"], p["col_idx"], p["qvalues"], p["scales"], p["zeros"], 4, 16, 64)
    # the default: row tiles exactly where the AVX-512 kernel runs; 3-bit weights keep streams
    assert cpu.sparse_layout(4) == (1 if cpu.get_isa() == "avx512" else 0)
    monkeypatch.setenv("BITPRESS_SPARSE_LAYOUT", "tiles")
    assert cpu.sparse_layout(3) == 0 and cpu.sparse_layout(2) == 1
    tiles = cpu._sparse_packed(*args)[0]
    monkeypatch.setenv("BITPRESS_SPARSE_LAYOUT", "streams")
    streams = cpu._sparse_packed(*args)[0]  # a second cache entry, not the tiles one
    assert int(tiles[:8].view(torch.int64)) != 0 and int(streams[:8].view(torch.int64)) == 0
    nnz = p["col_idx"].numel()
    for buf in (tiles, streams):  # what a kernel reads: within the buffer, at least the groups
        used = cpu._C.qmm_sparse_used_bytes(buf.data_ptr(), nnz, 20, 64, 4, 16, 0)
        assert nnz * 12 < used <= buf.numel()
    x = torch.randn(2, 64)
    want = reference.sparse_qmm_ref(x, *args[:5], None, 4, 16, 64)
    torch.testing.assert_close(cpu.sparse_qmm_cpu(x, *args[:5], None, 4, 16, 64, mode="exact"),
                               want, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("BITPRESS_SPARSE_LAYOUT", "diagonal")
    with pytest.raises(ValueError, match="BITPRESS_SPARSE_LAYOUT"):
        cpu._sparse_packed(*args)
    with pytest.raises(ValueError, match="layout"):
        cpu._C.qmm_sparse_packed_bytes(10, 20, 64, 3, 16, 0, 1)
