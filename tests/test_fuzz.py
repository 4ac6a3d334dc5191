"""Property tests (hypothesis): bit packing, the format validators and every CPU kernel
against the reference op, over random bits, group sizes, ragged shapes, batches and
sparsity patterns (issue 29, item 5).

The default budget is small so that this file runs in well under a minute on one core
(``BITPRESS_FUZZ_EXAMPLES`` examples per property, default 30); raise it for a longer hunt,
e.g. ``BITPRESS_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py``. Failing examples are
printed by hypothesis with a ``@reproduce_failure`` line. tests/sanitize.sh runs this file
against an AddressSanitizer + UBSan build of the extension.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bitpress.errors import BitpressError, FormatError  # noqa: E402
from bitpress.formats import (QuantizedWeight, bsr_to_keep_bits, keep_bits_bytes,  # noqa: E402
                              keep_bits_to_bsr, pack_codes, packed_words, quantize_rtn,
                              unpack_codes, validate_bsr, validate_quantization_config)
from bitpress.formats.checkpoint import SafetensorsDir, read_safetensors_header  # noqa: E402
from bitpress.kernels import native, reference  # noqa: E402

EXAMPLES = int(os.environ.get("BITPRESS_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

GROUPS = st.sampled_from([16 * k for k in range(1, 17)] + [-1])


pytestmark = pytest.mark.usefixtures("one_thread_per_test")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- packing ------------------------------------------------------------------------------
def _pack_reference(codes: list[int], bits: int) -> list[int]:
    """The canonical layout, written out: code i of a row goes to word i // pf at bit
    (i % pf) * bits, offset to unsigned; a short last word is padded with the code of 0."""
    pf = 32 // bits
    words = []
    for w in range(0, len(codes), pf):
        chunk = codes[w:w + pf] + [0] * (pf - len(codes[w:w + pf]))
        v = 0
        for j, c in enumerate(chunk):
            v |= (c + (1 << (bits - 1))) << (j * bits)
        words.append(v - (1 << 32) if v >= 1 << 31 else v)
    return words


@FUZZ
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 5), n=st.integers(1, 300),
       seed=st.integers(0, 2**31 - 1))
def test_pack_roundtrip_and_layout(bits, rows, n, seed):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    codes = torch.randint(lo, hi, (rows, n), generator=_gen(seed), dtype=torch.int64).to(torch.int8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows, packed_words(n, bits))
    assert packed[0].tolist() == _pack_reference(codes[0].tolist(), bits)
    assert torch.equal(unpack_codes(packed, bits, n), codes)
    assert torch.equal(native.unpack_codes(packed, bits, n), codes)  # the C++ unpacker


@FUZZ
@given(bits=st.sampled_from([2, 3, 4, 8]), n=st.integers(1, 100), extra=st.integers(-3, 3),
       bad=st.integers(-128, 127))
def test_pack_rejects_bad_input(bits, n, extra, bad):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.zeros(2, n, dtype=torch.int8)
    codes[1, n // 2] = bad
    if lo <= bad <= hi:
        pack_codes(codes, bits)
    else:
        with pytest.raises(FormatError):
            pack_codes(codes, bits)
    words = packed_words(n, bits) + extra
    assume(words >= 0)
    p = torch.zeros(2, words, dtype=torch.int32)
    if extra:
        with pytest.raises(FormatError):
            unpack_codes(p, bits, n)
        with pytest.raises(FormatError):
            native.unpack_codes(p, bits, n)


@FUZZ
@given(out=st.integers(1, 12), ng=st.integers(1, 40), density=st.floats(0, 1),
       seed=st.integers(0, 2**31 - 1))
def test_keep_bits_roundtrip(out, ng, density, seed):
    keep = torch.rand(out, ng, generator=_gen(seed)) < density
    rp = torch.zeros(out + 1, dtype=torch.int32)
    rp[1:] = keep.sum(1).cumsum(0)
    ci = keep.nonzero()[:, 1].to(torch.int32)
    kb = bsr_to_keep_bits(rp, ci, ng)
    assert kb.shape == (out, keep_bits_bytes(ng)) and kb.dtype == torch.uint8
    rp2, ci2 = keep_bits_to_bsr(kb, ng)
    assert torch.equal(rp2, rp) and torch.equal(ci2, ci)


# ---- format validators: corrupt input raises FormatError, nothing else --------------------
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10)
SCHEME_KEYS = ["format", "bits", "group_size", "in_features", "out_features", "nnz"]


def _valid_config():
    return {"quant_method": "bitpress", "format_version": 2, "method": "rtn", "bits": 4,
            "group_size": 128, "sparsity": None, "ignore": [], "param_dtype": "float16",
            "modules": {"model.layers.0.mlp.up_proj": {
                "format": "dense", "bits": 4, "group_size": 128, "in_features": 576,
                "out_features": 1536},
                "model.layers.0.mlp.down_proj": {
                "format": "bsr", "bits": 4, "group_size": 16, "in_features": 1536,
                "out_features": 576, "nnz": 1000}}}


@FUZZ
@given(edits=st.lists(st.tuples(
    st.sampled_from(["top", "up", "down"]),
    st.sampled_from(SCHEME_KEYS + ["quant_method", "format_version", "modules", "extra"]),
    JSONISH | st.integers(-5, 5000) | st.sampled_from(["dense", "bsr", 2, 3, 4, 8, -1, 16])),
    min_size=1, max_size=4))
def test_quantization_config_validator(edits):
    validate_quantization_config(_valid_config())
    cfg = _valid_config()
    for where, key, value in edits:
        mods = cfg.get("modules")
        target = cfg if where == "top" else mods.get(
            "model.layers.0.mlp.up_proj" if where == "up" else "model.layers.0.mlp.down_proj") \
            if isinstance(mods, dict) else None
        if isinstance(target, dict):
            target[key] = value
    try:
        validate_quantization_config(cfg)
    except FormatError:
        return
    # accepted: then every module's scheme is one the loader and inspect can use
    from bitpress.pipeline.checkpoint import scheme_tensors

    for m in cfg["modules"].values():
        for shape, _ in scheme_tensors(m, cfg["format_version"]).values():
            assert all(isinstance(d, int) and d >= 0 for d in shape)


@FUZZ
@given(cfg=JSONISH)
def test_quantization_config_validator_any_json(cfg):
    try:
        validate_quantization_config(cfg)
    except FormatError:
        pass


@FUZZ
@given(out=st.integers(1, 6), ng=st.integers(1, 6), gs=st.sampled_from([16, 32, 48]),
       bits=st.sampled_from([2, 3, 4]), data=st.data())
def test_validate_bsr_corrupt(out, ng, gs, bits, data):
    """Random row pointers / column indices / shapes: FormatError or a valid index."""
    in_f = ng * gs - data.draw(st.integers(0, gs - 1))
    nnz = data.draw(st.integers(0, out * ng + 2))
    ints = st.integers(-3, out * ng + 3)
    rp = torch.tensor(data.draw(st.lists(ints, min_size=out + 1, max_size=out + 1)),
                      dtype=data.draw(st.sampled_from([torch.int32, torch.int32, torch.int64])))
    ci = torch.tensor(data.draw(st.lists(st.integers(-2, ng + 1), min_size=nnz, max_size=nnz)),
                      dtype=torch.int32)
    words = packed_words(gs, bits) + data.draw(st.sampled_from([0, 0, 0, 1, -1]))
    qv = torch.zeros(data.draw(st.sampled_from([nnz, nnz, nnz + 1])), max(words, 0),
                     dtype=torch.int32)
    sc = torch.ones(data.draw(st.sampled_from([nnz, nnz, max(nnz - 1, 0)])))
    try:
        validate_bsr(rp, ci, qv, sc, torch.zeros(nnz), bits, gs, in_f)
    except FormatError:
        return
    # accepted: a well-formed index that the dense view reproduces
    q = QuantizedWeight.from_bsr(rp, ci, qv, sc.half(), torch.zeros(nnz).half(), bits, gs, in_f)
    assert int(q.keep.sum()) == nnz


@FUZZ
@given(ng=st.integers(1, 40), out=st.integers(1, 5), data=st.data())
def test_keep_bits_corrupt(ng, out, data):
    nb = keep_bits_bytes(ng) + data.draw(st.sampled_from([0, 0, 1, -1]))
    assume(nb >= 0)
    raw = data.draw(st.lists(st.integers(0, 255), min_size=out * nb, max_size=out * nb))
    kb = torch.tensor(raw, dtype=torch.uint8).reshape(out, nb)
    try:
        rp, ci = keep_bits_to_bsr(kb, ng)
    except FormatError:
        return
    assert rp.numel() == out + 1 and int(rp[-1]) == ci.numel()
    assert ci.numel() == 0 or int(ci.max()) < ng


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


HEADER_VALUES = JSONISH | st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F16", "I32", "U8", "X9", 3]),
     "shape": st.lists(st.integers(-2, 6), max_size=3) | JSONISH,
     "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3) | JSONISH})


@FUZZ
@given(header=st.dictionaries(st.text(min_size=1, max_size=6), HEADER_VALUES, max_size=3)
       | JSONISH, data=st.binary(max_size=64), cut=st.integers(0, 8), data2=st.data())
def test_safetensors_header_corrupt(tmp_path_factory, header, data, cut, data2):
    d = tmp_path_factory.mktemp("st")
    raw = _safetensors_bytes(header, data)
    if data2.draw(st.booleans()):
        raw = raw[: max(0, len(raw) - cut)]
    (d / "model.safetensors").write_bytes(raw)
    try:
        files = SafetensorsDir(d)
    except FormatError:
        return
    # accepted: every tensor it lists can be read, or reading it says FormatError
    for k in files.keys():
        try:
            t = files.get(k)
        except FormatError:
            continue
        assert tuple(t.shape) == files.shapes[k]


@FUZZ
@given(raw=st.binary(max_size=200))
def test_safetensors_random_bytes(tmp_path_factory, raw):
    d = tmp_path_factory.mktemp("st")
    (d / "x.safetensors").write_bytes(raw)
    try:
        read_safetensors_header(d / "x.safetensors")
    except FormatError:
        pass


@FUZZ
@given(bits=st.integers(-1, 9), gs=st.sampled_from([-1, 0, 16, 32, 48, 256]) | st.integers(-2, 300),
       out=st.integers(0, 4), inf=st.integers(0, 40), ng=st.integers(0, 4))
def test_quantized_weight_rejects_inconsistent(bits, gs, out, inf, ng):
    codes = torch.zeros(out, inf, dtype=torch.int8)
    try:
        QuantizedWeight(codes, torch.ones(out, ng), torch.zeros(out, ng), bits, gs)
    except BitpressError:
        return
    assert inf >= 1 and ng == math.ceil(inf / (inf if gs == -1 else gs))


# ---- CPU kernels against the reference op --------------------------------------------------
cpu = pytest.importorskip("bitpress.kernels.cpu", reason="bitpress._C CPU kernels not built")
ISAS = cpu.available_isas()
from test_cpu_kernels import assert_within_bound  # noqa: E402  (the kernels' tolerance)


def _bound(mode, bits, isa, x, codes, scale, gs_eff):
    if mode in ("exact", "blas"):
        return 0.0
    if mode in ("lut", "lut63") and bits == 2 and isa != "scalar":
        return cpu.lut_error_bound(x, codes, scale, gs_eff, mode)
    return cpu.int8_error_bound(x, codes, scale, gs_eff)


@contextlib.contextmanager
def _kernel_settings(isa: str, threads: int, split_tiny: bool):
    """The block runs on ``isa`` with ``threads`` threads (the module's fixture restores the
    count after the test); ``split_tiny``: the packed kernels split even the tiniest weight
    across the threads (a minimum work of 1 instead of the default 65536)."""
    cpu.set_isa(isa)
    torch.set_num_threads(threads)
    if split_tiny:
        cpu._C.qmm_set_min_work(1)
    try:
        yield
    finally:
        if split_tiny:
            cpu._C.qmm_set_min_work(65536)
        cpu.set_isa("auto")


KERNEL = dict(bits=st.sampled_from([2, 3, 4]), gs=GROUPS, out=st.integers(1, 40),
              inf=st.integers(1, 600), batch=st.integers(1, 9),
              isa=st.sampled_from(ISAS), mode=st.sampled_from(["exact", "int8", "lut", "lut63",
                                                               "blas"]),
              x_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
              param_dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
              bias=st.booleans(), threads=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))


@FUZZ
@given(**KERNEL)
def test_dense_qmm_matches_reference(bits, gs, out, inf, batch, isa, mode, x_dtype,
                                     param_dtype, bias, threads, seed):
    g = _gen(seed)
    gs_eff = inf if gs == -1 else gs
    qw = quantize_rtn(torch.randn(out, inf, generator=g) * 0.1, bits, gs,
                      param_dtype=param_dtype)
    p = qw.pack_dense(param_dtype)
    x = torch.randn(batch, inf, generator=g).to(x_dtype)
    b = torch.randn(out, generator=g) if bias else None
    args = (x, p["qweight"], p["scales"], p["zeros"], b, bits, gs_eff, inf)
    with _kernel_settings(isa, threads, split_tiny=True):
        y = cpu.dense_qmm_cpu(*args, mode=mode)
    ref = reference.dense_qmm_ref(*args)
    w = reference.dense_weight(p["qweight"], p["scales"], p["zeros"], bits, gs_eff, inf)
    mag = x.float().abs() @ w.abs().t()
    assert_within_bound(y, ref, mag,
                        _bound(mode, bits, isa, x, qw.codes, p["scales"].float(), gs_eff), x_dtype)


@FUZZ
@given(**KERNEL, density=st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.9, 1.0]),
       pattern=st.sampled_from(["random", "rows", "cols", "band"]))
def test_sparse_qmm_matches_reference(bits, gs, out, inf, batch, isa, mode, x_dtype,
                                      param_dtype, bias, threads, seed, density, pattern):
    if gs == -1:
        gs = 16
    g = _gen(seed)
    ng = (inf + gs - 1) // gs
    keep = torch.rand(out, ng, generator=g) < density
    if pattern == "rows":     # whole rows kept or empty
        keep = (torch.rand(out, 1, generator=g) < density).expand(out, ng).clone()
    elif pattern == "cols":   # the same groups in every row
        keep = (torch.rand(1, ng, generator=g) < density).expand(out, ng).clone()
    elif pattern == "band":   # full rows, then empty ones
        keep[: out // 3] = True
        keep[out // 3: 2 * out // 3] = False
    qw = quantize_rtn(torch.randn(out, inf, generator=g) * 0.1, bits, gs,
                      param_dtype=param_dtype, keep=keep)
    p = qw.pack_bsr(param_dtype)
    x = torch.randn(batch, inf, generator=g).to(x_dtype)
    b = torch.randn(out, generator=g) if bias else None
    args = (x, p["row_ptr"], p["col_idx"], p["qvalues"], p["scales"], p["zeros"], b, bits, gs,
            inf)
    with _kernel_settings(isa, threads, split_tiny=True):
        y = cpu.sparse_qmm_cpu(*args, mode=mode)
    ref = reference.sparse_qmm_ref(*args)
    w = reference.sparse_weight(*args[1:6], bits, gs, inf)
    mag = x.float().abs() @ w.abs().t()
    sc = (qw.scale * keep).to(param_dtype).float()
    sparse_mode = "int8" if mode in ("lut", "lut63") else mode  # no lut kernel for sparse
    assert_within_bound(y, ref, mag, _bound(sparse_mode, bits, isa, x, qw.codes, sc, gs), x_dtype)


@FUZZ
@given(out=st.integers(1, 70), inf=st.integers(1, 300), batch=st.integers(0, 9),
       wdtype=st.sampled_from([torch.float16, torch.bfloat16]),
       x_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       isa=st.sampled_from(ISAS), bias=st.booleans(), threads=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_half_linear_matches_fp32_linear(out, inf, batch, wdtype, x_dtype, isa, bias, threads,
                                         seed):
    g = _gen(seed)
    w = torch.randn(out, inf, generator=g).to(wdtype)
    x = torch.randn(batch, inf, generator=g).to(x_dtype)
    b = torch.randn(out, generator=g) if bias else None
    with _kernel_settings(isa, threads, split_tiny=False):
        y = cpu.half_linear_cpu(x, w, b)
    ref = torch.nn.functional.linear(x.float(), w.float(), b).to(x_dtype)
    mag = x.float().abs() @ w.float().abs().t()
    assert_within_bound(y, ref, mag, 0.0, x_dtype)


@pytest.mark.parametrize("bits,gs,inf", [(3, 16, 129), (3, 32, 129), (3, 16, 121), (3, 48, 97),
                                         (2, 16, 129), (4, 16, 129), (3, -1, 129)])
def test_gemm_dequant_short_last_group(bits, gs, inf):
    """Found by test_dense_qmm_matches_reference: at 3 bits (10 codes per word, so groups
    of 16 do not start on word boundaries) a last group that ends inside the word it starts
    in made the GEMM path's dequantisation rewrite the previous group's columns of that
    word with the last group's scale and zero (csrc/cpu/qmm.cpp ``dequant_run``)."""
    g = _gen(7)
    qw = quantize_rtn(torch.randn(3, inf, generator=g), bits, gs)
    p = qw.pack_dense(torch.float16)
    gs_eff = inf if gs == -1 else gs
    w = reference.dense_weight(p["qweight"], p["scales"], p["zeros"], bits, gs_eff, inf)
    x = torch.randn(2, inf, generator=g)
    args = (x, p["qweight"], p["scales"], p["zeros"], None, bits, gs_eff, inf)
    y = cpu.dense_qmm_cpu(*args, mode="blas")
    assert torch.equal(y, reference.dense_qmm_ref(*args))  # one panel: bit for bit
    assert torch.allclose(y, x @ w.t(), atol=1e-5)
