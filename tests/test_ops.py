"""The bitpress ops: opcheck, reference semantics, dispatch, autograd."""
from __future__ import annotations

import warnings

import pytest
import torch

import bitpress.kernels.ops as ops
from bitpress.formats import magnitude_keep_mask, quantize_rtn
from bitpress.kernels import dense_qmm, register_impl, sparse_qmm, use_impl

CASES = [  # (out, in, bits, group, leading batch)
    (8, 64, 4, 32, (1,)),
    (13, 200, 3, 64, (2, 3)),
    (5, 96, 2, -1, (4,)),
    (7, 576, 4, 128, (1, 1)),
    (3, 48, 8, 16, ()),
]


def make_dense(out, n, bits, group, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g)
    qw = quantize_rtn(w, bits, group)
    p = qw.pack_dense()
    b = torch.randn(out, generator=g) if bias else None
    return qw, p, b


def make_sparse(out, n, bits, group, sparsity=0.5, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g)
    keep = magnitude_keep_mask(w, group, sparsity)
    qw = quantize_rtn(w, bits, group, keep=keep)
    b = torch.randn(out, generator=g) if bias else None
    return qw, qw.pack_bsr(), b


@pytest.mark.parametrize("out,n,bits,group,lead", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_reference_matches_dequantized_linear(out, n, bits, group, lead, dtype):
    qw, p, b = make_dense(out, n, bits, group)
    x = torch.randn(*lead, n).to(dtype)
    gs = n if group == -1 else group
    with use_impl("reference"):
        y = dense_qmm(x, p["qweight"], p["scales"], p["zeros"], b, bits, gs, n)
    expect = torch.nn.functional.linear(x.float(), qw.dequantize(), b).to(dtype)
    assert y.dtype == dtype and y.shape == (*lead, out)
    torch.testing.assert_close(y, expect)


@pytest.mark.parametrize("out,n,bits,group", [(9, 200, 4, 16), (6, 64, 2, 32), (4, 576, 3, 128)])
def test_sparse_reference_matches_dequantized_linear(out, n, bits, group):
    qw, p, b = make_sparse(out, n, bits, group)
    x = torch.randn(3, n)
    with use_impl("reference"):
        y = sparse_qmm(x, p["row_ptr"], p["col_idx"], p["qvalues"], p["scales"], p["zeros"], b,
                       bits, group, n)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, qw.dequantize(), b))


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_dense(bias):
    for out, n, bits, group, lead in CASES[:3]:
        _, p, b = make_dense(out, n, bits, group, bias=bias)
        gs = n if group == -1 else group
        x = torch.randn(*lead, n, requires_grad=True)
        s = p["scales"].float().requires_grad_()
        z = p["zeros"].float().requires_grad_()
        torch.library.opcheck(torch.ops.bitpress.dense_qmm.default,
                              (x, p["qweight"], s, z, b, bits, gs, n))
        torch.library.opcheck(torch.ops.bitpress.dense_qmm.default,
                              (x.detach(), p["qweight"], p["scales"], p["zeros"], b, bits, gs, n))


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_sparse(bias):
    _, p, b = make_sparse(11, 200, 4, 16, bias=bias)
    x = torch.randn(2, 200, requires_grad=True)
    s = p["scales"].float().requires_grad_()
    z = p["zeros"].float().requires_grad_()
    torch.library.opcheck(torch.ops.bitpress.sparse_qmm.default,
                          (x, p["row_ptr"], p["col_idx"], p["qvalues"], s, z, b, 4, 16, 200))


def test_autograd_matches_dequantized_graph():
    """Gradients for x, scales, zeros and bias equal those of the explicit float formula."""
    qw, p, b = make_dense(10, 200, 3, 64)
    x = torch.randn(4, 200, dtype=torch.float64).float().requires_grad_()
    s = p["scales"].float().requires_grad_()
    z = p["zeros"].float().requires_grad_()
    bb = b.clone().requires_grad_()
    y = dense_qmm(x, p["qweight"], s, z, bb, 3, 64, 200)
    gy = torch.randn_like(y)
    y.backward(gy)
    x2, s2, z2, b2 = (t.detach().clone().requires_grad_() for t in (x, s, z, b))
    w = s2.repeat_interleave(64, 1)[:, :200] * qw.codes.float() + z2.repeat_interleave(64, 1)[:, :200]
    torch.nn.functional.linear(x2, w, b2).backward(gy)
    for a, e in ((x, x2), (s, s2), (z, z2), (bb, b2)):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-4)


def test_sparse_autograd_matches_dequantized_graph():
    qw, p, b = make_sparse(6, 80, 4, 16, sparsity=0.4)
    x = torch.randn(3, 80, requires_grad=True)
    s = p["scales"].float().requires_grad_()
    z = p["zeros"].float().requires_grad_()
    y = sparse_qmm(x, p["row_ptr"], p["col_idx"], p["qvalues"], s, z, b, 4, 16, 80)
    gy = torch.randn_like(y)
    y.backward(gy)
    w = qw.dequantize()
    torch.testing.assert_close(x.grad, gy @ w)
    # scale gradient of kept group j = sum over its columns of (gyᵀx)·code
    gw = gy.t() @ x.detach()
    rows, cols = qw.keep.nonzero(as_tuple=True)
    j = 3
    r, c = int(rows[j]), int(cols[j])
    cols_j = slice(16 * c, 16 * c + 16)
    torch.testing.assert_close(s.grad[j], (gw[r, cols_j] * qw.codes[r, cols_j].float()).sum())
    torch.testing.assert_close(z.grad[j], gw[r, cols_j].sum())


def test_dispatch_prefers_registered_impl_and_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(ops, "_REGISTRY", {})
    monkeypatch.setattr(ops, "_WARNED", set())
    _, p, b = make_dense(8, 64, 4, 32)
    x = torch.randn(2, 64)
    args = (x, p["qweight"], p["scales"], p["zeros"], b, 4, 32, 64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ref = dense_qmm(*args)
        dense_qmm(*args)
    assert sum("reference" in str(w.message) for w in rec) == 1

    calls = []

    def fake_fast(*a):
        calls.append(a[-1])
        return ops.reference.dense_qmm_ref(*a)

    register_impl("dense_qmm", "cpu", "fast", fake_fast, priority=10,
                  supports=lambda x, *rest: x.shape[0] == 2)
    torch.testing.assert_close(dense_qmm(*args), ref)
    assert calls == [64]
    dense_qmm(torch.randn(3, 64), *args[1:])  # not supported → reference, no new call
    assert calls == [64]
    with use_impl("reference"):
        dense_qmm(*args)
    assert calls == [64]
    with use_impl("nope"), pytest.raises(RuntimeError, match="not registered"):
        dense_qmm(*args)


def test_shape_mismatch_is_an_error():
    _, p, b = make_dense(8, 64, 4, 32)
    with pytest.raises(RuntimeError, match="features"):
        dense_qmm(torch.randn(2, 63), p["qweight"], p["scales"], p["zeros"], b, 4, 32, 64)


def test_fake_impl_under_compile_shapes():
    _, p, b = make_dense(8, 64, 4, 32)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(5, 7, 64)
        y = torch.ops.bitpress.dense_qmm(x, p["qweight"], p["scales"], p["zeros"], b, 4, 32, 64)
        assert y.shape == (5, 7, 8)
