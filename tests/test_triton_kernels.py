"""Triton kernels of bitpress::dense_qmm / sparse_qmm against the pure-torch reference.

Without a GPU every kernel runs in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``
is set here, before Triton is imported); with a GPU the same tests run the compiled kernels
on CUDA tensors. The interpreter is slow, so shapes are tiny and launch configs are forced
small (several programs per dimension, split-K and tasks that cross row boundaries).

Tolerance per output (``mag = |x| @ |W|^T``): ``eps * mag + |ref| * ulp + 1e-5`` with ``eps``
the rounding of the dequantised weight fed to ``tl.dot`` (fp16 2^-10, bf16 2^-7, fp32 1e-5)
and ``ulp`` one unit of the output dtype (both sides round an fp32 result to it; the
interpreter truncates on store instead of rounding).
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"   # must precede the first import of triton
os.environ.setdefault("BITPRESS_TRITON_TUNE", "0")  # heuristic configs: no autotuning in tests

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from bitpress.formats import quantize_rtn  # noqa: E402
from bitpress.kernels import reference, registered_impls  # noqa: E402
from bitpress.kernels.triton import repack, triton_dense_qmm, triton_sparse_qmm, tune  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    _k = importlib.import_module("bitpress.kernels.triton.kernels")
    if type(_k.dense_gemv_kernel).__name__ != "InterpretedFunction":  # imported too early
        importlib.reload(_k)

EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 1e-5}
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 1e-6}


def _weight(out, inf, bits, gs, keep=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_rtn(torch.randn(out, inf, generator=g), bits, gs, keep=keep)


def _x(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def _check(y, ref, w, x):
    mag = x.reshape(-1, x.shape[-1]).float().abs().cpu() @ w.abs().t()
    mag = mag.reshape(ref.shape)
    tol = EPS[x.dtype] * mag + ref.float().abs().cpu() * ULP[x.dtype] + 1e-5
    err = (y.float().cpu() - ref.float().cpu()).abs()
    assert y.dtype == ref.dtype and y.shape == ref.shape and y.device == x.device
    assert bool((err <= tol).all()), f"max err {err.max():.3g}, worst excess {(err - tol).max():.3g}"


def _dense(qw, dtype=torch.float16):
    p = {k: v.to(DEVICE) for k, v in qw.pack_dense(dtype).items()}
    return p["qweight"], p["scales"], p["zeros"]


def _bsr(qw):
    p = {k: v.to(DEVICE) for k, v in qw.pack_bsr().items()}
    return p["row_ptr"], p["col_idx"], p["qvalues"], p["scales"], p["zeros"]


# ---- dense ---------------------------------------------------------------------------------------
# (bits, group_size, in_features): group-tile path, gather path (gs 48 not a multiple of the
# K tile; ragged last group), per-channel with a ragged word, 3-bit (10 codes per word)
DENSE = [(2, 64, 128), (3, 32, 96), (4, 48, 100), (2, -1, 70), (3, 128, 200), (4, 256, 256)]


@pytest.mark.parametrize("bits,gs,inf", DENSE)
@pytest.mark.parametrize("m", [1, 3])
def test_dense_gemv(bits, gs, inf, m):
    out = 40
    qw = _weight(out, inf, bits, gs)
    qweight, scales, zeros = _dense(qw)
    x = _x((m, inf), torch.float16)
    bias = _x((out,), torch.float32, seed=2)
    ref = reference.dense_qmm_ref(x, qweight, scales, zeros, bias, bits, qw.gs, inf)
    w = qw.dequantize()
    # heuristic config, then a forced split-K config with small tiles (several programs)
    y = triton_dense_qmm(x, qweight, scales, zeros, bias, bits, qw.gs, inf, kernel="gemv")
    _check(y, ref, w, x)
    cfg = {"BLOCK_M": 2, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2}
    y = triton_dense_qmm(x, qweight, scales, zeros, bias, bits, qw.gs, inf, kernel="gemv",
                         config=cfg)
    _check(y, ref, w, x)


@pytest.mark.parametrize("bits,gs,inf,dtype", [
    (2, 64, 128, torch.float16), (3, 32, 96, torch.bfloat16), (4, 48, 100, torch.float32),
    (2, -1, 70, torch.bfloat16), (4, 48, 100, torch.float16)])
def test_dense_mm(bits, gs, inf, dtype):
    out, m = 40, 18
    qw = _weight(out, inf, bits, gs)
    qweight, scales, zeros = _dense(qw)
    x = _x((m, inf), dtype)
    bias = _x((out,), dtype, seed=2)
    ref = reference.dense_qmm_ref(x, qweight, scales, zeros, bias, bits, qw.gs, inf)
    w = qw.dequantize()
    for split in (1, 3):
        cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": split}
        y = triton_dense_qmm(x, qweight, scales, zeros, bias, bits, qw.gs, inf, kernel="mm",
                             config=cfg)
        _check(y, ref, w, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dense_gemv_dtypes_and_params(dtype):
    bits, gs, inf, out = 4, 32, 64, 24
    qw = _weight(out, inf, bits, gs)
    qweight, scales, zeros = _dense(qw, torch.float32 if dtype == torch.float32 else dtype)
    x = _x((1, inf), dtype)
    ref = reference.dense_qmm_ref(x, qweight, scales, zeros, None, bits, gs, inf)
    y = triton_dense_qmm(x, qweight, scales, zeros, None, bits, gs, inf)
    _check(y, ref, qw.dequantize(), x)


def test_dense_auto_leading_dims_and_empty():
    bits, gs, inf, out = 2, 32, 64, 24
    qw = _weight(out, inf, bits, gs)
    qweight, scales, zeros = _dense(qw)
    for shape in [(2, 3, inf), (inf,), (2, 0, inf)]:
        x = _x(shape, torch.float16)
        ref = reference.dense_qmm_ref(x, qweight, scales, zeros, None, bits, gs, inf)
        y = triton_dense_qmm(x, qweight, scales, zeros, None, bits, gs, inf)
        assert y.shape == ref.shape
        if x.numel():
            _check(y, ref, qw.dequantize(), x)


def test_dense_repack_cache_tracks_in_place_updates():
    bits, gs, inf, out = 4, 32, 64, 16
    qw = _weight(out, inf, bits, gs)
    qweight, scales, zeros = _dense(qw)
    x = _x((1, inf), torch.float32)
    p1 = repack.dense_packed(qweight, scales, zeros, bits, gs, inf)
    assert repack.dense_packed(qweight, scales, zeros, bits, gs, inf) is p1
    scales.mul_(2.0)
    assert repack.dense_packed(qweight, scales, zeros, bits, gs, inf) is not p1
    ref = reference.dense_qmm_ref(x, qweight, scales, zeros, None, bits, gs, inf)
    y = triton_dense_qmm(x, qweight, scales, zeros, None, bits, gs, inf)
    _check(y, ref, reference.dense_weight(qweight, scales, zeros, bits, gs, inf).cpu(), x)
    with pytest.raises(ValueError, match="scales/zeros"):
        triton_dense_qmm(x, qweight, scales[:, :1], zeros, None, bits, gs, inf)


# ---- group-sparse ------------------------------------------------------------------------------
def _skewed_keep(out, ng, seed=0):
    """Row 0 keeps every group, a few rows keep none, the rest one or two groups."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(out, ng, generator=g) < 0.2
    keep[0] = True
    keep[1] = False
    keep[out - 1] = False
    keep[5, -1] = True   # a (possibly short) last group
    return keep


@pytest.mark.parametrize("bits,gs,inf", [(2, 32, 200), (3, 48, 190), (4, 64, 256)])
@pytest.mark.parametrize("m", [1, 2])
def test_sparse_task_and_row_on_skewed_mask(bits, gs, inf, m):
    out = 16
    ng = (inf + gs - 1) // gs
    qw = _weight(out, inf, bits, gs, keep=_skewed_keep(out, ng))
    args = _bsr(qw)
    x = _x((m, inf), torch.float16)
    bias = _x((out,), torch.float16, seed=2)
    ref = reference.sparse_qmm_ref(x, *args, bias, bits, gs, inf)
    w = qw.dequantize()
    # 3 tasks of equal size: each starts and ends inside some row
    y = triton_sparse_qmm(x, *args, bias, bits, gs, inf, split="task",
                          config={"n_tasks": 3, "BLOCK_G": 4})
    _check(y, ref, w, x)
    y = triton_sparse_qmm(x, *args, bias, bits, gs, inf, split="row", config={"BLOCK_G": 4})
    _check(y, ref, w, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sparse_default_configs_and_dtypes(dtype):
    bits, gs, inf, out = 4, 32, 128, 12
    keep = torch.rand(out, inf // gs, generator=torch.Generator().manual_seed(3)) < 0.5
    qw = _weight(out, inf, bits, gs, keep=keep)
    args = _bsr(qw)
    x = _x((3, 1, inf), dtype)
    ref = reference.sparse_qmm_ref(x, *args, None, bits, gs, inf)
    y = triton_sparse_qmm(x, *args, None, bits, gs, inf)          # auto: task split
    _check(y, ref, qw.dequantize(), x)


def test_sparse_large_batch_densified_and_empty():
    bits, gs, inf, out = 2, 32, 64, 16
    keep = _skewed_keep(out, inf // gs)
    qw = _weight(out, inf, bits, gs, keep=keep)
    args = _bsr(qw)
    x = _x((17, inf), torch.float16)           # > SPARSE_GEMV_MAX_M: tensor-core GEMM path
    ref = reference.sparse_qmm_ref(x, *args, None, bits, gs, inf)
    y = triton_sparse_qmm(x, *args, None, bits, gs, inf,
                          config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 1})
    _check(y, ref, qw.dequantize(), x)
    # nothing kept at all
    qw0 = _weight(out, inf, bits, gs, keep=torch.zeros(out, inf // gs, dtype=torch.bool))
    args0 = _bsr(qw0)
    bias = _x((out,), torch.float16, seed=2)
    for split in ("task", "row"):
        y = triton_sparse_qmm(x[:1], *args0, bias, bits, gs, inf, split=split)
        assert torch.equal(y.float().cpu(), bias.float().cpu().expand(1, out))


# ---- configs, tuning cache, registration ---------------------------------------------------------
def test_tune_helpers(tmp_path, monkeypatch):
    assert [tune.m_bucket(m) for m in (1, 2, 3, 16, 17, 4096)] == [1, 2, 4, 16, 32, 512]
    assert tune.block_k_for(48, 4096) == 16 and tune.block_k_for(128, 4096) == 128
    assert tune.block_k_for(256, 4096, 128) == 128 and tune.block_k_for(4096, 4096) == 128
    assert tune.group_tile(64, 4096, 64) and not tune.group_tile(48, 4096, 32)
    cfg = tune.gemv_default(1, 4096, 4096, 64, torch.device("cpu"))
    assert cfg["BLOCK_K"] == 64 and cfg["SPLIT_K"] >= 1
    for c in tune.gemv_candidates(1, 4096, 4096, 64, torch.device("cpu")):
        assert c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"] <= 16384 or c == cfg
    assert tune.mm_candidates(256, 4096, 4096, 128, torch.device("cpu"))
    # no tuning off the GPU: the default comes back and nothing is run
    monkeypatch.setenv("BITPRESS_TRITON_CACHE", str(tmp_path))
    got = tune.pick("k", torch.device("cpu"), {"a": 1}, lambda: [{"a": 2}],
                    lambda c: (_ for _ in ()).throw(AssertionError("ran")))
    assert got == {"a": 1}


@pytest.mark.skipif(DEVICE != "cuda", reason="the per-GPU-model tuning cache needs a GPU")
def test_tuning_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("BITPRESS_TRITON_CACHE", str(tmp_path))
    monkeypatch.setenv("BITPRESS_TRITON_TUNE", "1")
    tune._tables.clear()
    tune._picked.clear()
    calls = []
    got = tune.pick("key", torch.device("cuda"), {"a": 0}, lambda: [{"a": 1}, {"a": 2}],
                    lambda c: calls.append(c))
    assert got in ({"a": 1}, {"a": 2}) and calls
    assert any(p.suffix == ".json" for p in tmp_path.iterdir())
    tune._tables.clear()
    tune._picked.clear()
    assert tune.pick("key", torch.device("cuda"), {"a": 0}, lambda: [], lambda c: None) == got


def test_registration_follows_the_gpu():
    names = registered_impls("dense_qmm", "cuda")
    if torch.cuda.is_available():
        assert "triton" in names and "triton" in registered_impls("sparse_qmm", "cuda")
    else:
        assert "triton" not in names


@pytest.mark.skipif(DEVICE != "cuda", reason="the op dispatch to Triton needs a CUDA device")
def test_ops_dispatch_to_triton_on_cuda():
    from bitpress.kernels import dense_qmm, select_impl, sparse_qmm

    bits, gs, inf, out = 2, 64, 256, 64
    qw = _weight(out, inf, bits, gs, keep=_skewed_keep(out, inf // gs))
    qweight, scales, zeros = _dense(qw)
    x = _x((1, inf), torch.float16)
    args = (x, qweight, scales, zeros, None, bits, gs, inf)
    from bitpress.kernels import cuda_mma
    top = "cuda_mma" if cuda_mma.REGISTERED else "triton"   # the tensor-core kernel ranks first
    assert select_impl("dense_qmm", "cuda", *args)[0] == top
    _check(dense_qmm(*args), reference.dense_qmm_ref(*args), qw.dequantize(), x)
    sargs = (x, *_bsr(qw), None, bits, gs, inf)
    assert select_impl("sparse_qmm", "cuda", *sargs)[0] == top
    _check(sparse_qmm(*sargs), reference.sparse_qmm_ref(*sargs), qw.dequantize(), x)


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("checks the CPU-tensor guard of the interpreter-less path")
    from bitpress.kernels.triton import api

    monkeypatch.setattr(api, "_interpreting", lambda: False)
    qw = _weight(8, 32, 4, 32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        triton_dense_qmm(_x((1, 32), torch.float16), *_dense(qw), None, 4, 32, 32)
    assert "bitpress.kernels.triton.kernels" in sys.modules
