"""``bitpress export --format onnx|openvino``: the exported graphs compute what bitpress's
reference op computes (float32 tolerance 1e-4 abs + 1e-4 rel on logits of order 1; measured
differences are ~5e-7), their KV-cache decode equals their full forward, and what they
cannot represent is refused with a clear error."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")

import bitpress  # noqa: E402
from bitpress.cli import main  # noqa: E402
from bitpress.errors import ConfigError  # noqa: E402
from bitpress.formats.qweight import QuantizedWeight  # noqa: E402
from bitpress.integrations import onnx_export as ox  # noqa: E402
from bitpress.kernels.ops import use_impl  # noqa: E402
from bitpress.nn.modules import GroupSparseLinear, QuantLinear  # noqa: E402
from conftest import dir_digest  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(rtol=1e-4, atol=1e-4)


def _float_zeros(ckpt, out, seed=0):
    """The RTN checkpoint with decoupleQ-like free float zeros (z not a multiple of s) and a
    few groups with s = 0, z != 0 (constant groups), saved as a new checkpoint."""
    model = bitpress.load(ckpt)
    tok = bitpress.pipeline.checkpoint.load_tokenizer(ckpt)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (QuantLinear, GroupSparseLinear)):
            s = m.scales.float()
            z = m.zeros.float() + (torch.rand(s.shape, generator=g) - 0.5) * 3 * s
            dead = torch.rand(s.shape, generator=g) < 0.05
            s = torch.where(dead, torch.zeros_like(s), s)
            z = torch.where(dead, (torch.rand(s.shape, generator=g) - 0.5) * 0.05, z)
            m.scales.copy_(s.to(m.scales.dtype))
            m.zeros.copy_(z.to(m.zeros.dtype))
    bitpress.save(model, out, tokenizer=tok)
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, request):
    made = {}

    def get(arch, bits, gs, sparsity=None):
        key = (arch, bits, gs, sparsity)
        if key not in made:
            src = request.getfixturevalue(f"tiny_{arch}_dir")
            d = tmp_path_factory.mktemp(f"q-{arch}-{bits}-{gs}")
            extra = ["--sparsity", str(sparsity)] if sparsity else []
            assert main(["compress", str(src), "--out", str(d / "rtn"), "--method", "rtn",
                         "--bits", str(bits), "--group-size", str(gs), *extra]) == 0
            made[key] = _float_zeros(d / "rtn", d / "fz")
        return made[key]
    return get


def _reference_logits(ckpt, ids):
    model = bitpress.load(ckpt)
    with torch.no_grad(), use_impl("reference"):
        return model(ids).logits.numpy(), model


CASES = [("llama", 4, 32, None), ("qwen2", 2, 64, None), ("llama", 3, 48, None),
         ("qwen2", 8, 32, None), ("llama", 4, 16, 0.5), ("qwen2", 4, -1, None)]


@pytest.mark.parametrize("arch,bits,gs,sp", CASES)
def test_onnx_logits_equal_reference_and_cache(ckpts, tmp_path, arch, bits, gs, sp, capsys):
    pytest.importorskip("onnxruntime")
    from bitpress.integrations.onnx_runtime import ExportedDecoder

    ck = ckpts(arch, bits, gs, sp)
    before = dir_digest(ck)
    out = tmp_path / "onnx"
    capsys.readouterr()
    assert main(["export", str(ck), "--out", str(out), "--format", "onnx"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert dir_digest(ck) == before and rep["linears"] == 14
    assert {"model.onnx", "genai_config.json", "config.json", "tokenizer.json"} <= \
        {p.name for p in out.iterdir()}
    import onnx

    onnx.checker.check_model(str(out / "model.onnx"))  # a valid ONNX model (opset 21)
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nb = [n for n in g.node if n.op_type == "MatMulNBits"]
    assert len(nb) == 14 and all(n.domain == "com.microsoft" for n in nb)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    ref, model = _reference_logits(ck, ids)
    dec = ExportedDecoder(out, threads=1)
    got, present = dec.forward(ids.numpy())
    np.testing.assert_allclose(got, ref, **TOL)
    assert present[0].shape == (2, model.config.num_key_value_heads, 24,
                                model.config.hidden_size // model.config.num_attention_heads)
    # KV cache: prefill 10 tokens, then 14 single-token steps == the full forward
    lg, past = dec.forward(ids[:, :10].numpy())
    steps = [lg]
    for t in range(10, 24):
        lg, past = dec.forward(ids[:, t:t + 1].numpy(), past)
        steps.append(lg)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), got, **TOL)


def test_onnx_left_padding_and_generation(ckpts, tmp_path):
    """A left-padded row scores like the unpadded sequence; greedy generation through the
    runner equals transformers' greedy generation of the packed model."""
    pytest.importorskip("onnxruntime")
    from bitpress.integrations.onnx_runtime import ExportedDecoder

    ck = ckpts("llama", 4, 32)
    out = tmp_path / "onnx"
    ox.export_runtime(ck, out, "onnx")
    dec = ExportedDecoder(out)
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(5)).numpy()
    alone, _ = dec.forward(ids)
    padded = np.concatenate([np.zeros((1, 4), np.int64), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 4), np.int64), np.ones((1, 12), np.int64)], axis=1)
    pos = np.concatenate([np.zeros((1, 4), np.int64), np.arange(12)[None]], axis=1)
    lg, _ = dec.forward(padded, attention_mask=mask, position_ids=pos)
    np.testing.assert_allclose(lg[:, 4:], alone, **TOL)
    model = bitpress.load(ck)
    with torch.no_grad(), use_impl("reference"):
        hf = model.generate(torch.from_numpy(ids), max_new_tokens=12, do_sample=False,
                            pad_token_id=0)[0, 12:].tolist()
    assert dec.generate(ids[0].tolist(), 12)["ids"] == hf


def test_onnx_perplexity_equals_bitpress(ckpts, tmp_path):
    pytest.importorskip("onnxruntime")
    from conftest import TEXT

    from bitpress.integrations.onnx_runtime import ExportedDecoder, perplexity
    from bitpress.pipeline.checkpoint import load_tokenizer
    from bitpress.pipeline.evaluate import perplexity as bp_perplexity

    ck = ckpts("qwen2", 4, 32)
    out = tmp_path / "onnx"
    ox.export_runtime(ck, out, "onnx")
    tok = load_tokenizer(out)
    got = perplexity(ExportedDecoder(out), tok, TEXT, seqlen=64, windows=3, progress=False)
    with use_impl("reference"):
        ref = bp_perplexity(bitpress.load(ck), tok, TEXT, seqlen=64, windows=3, progress=False)
    assert got["tokens_scored"] == ref["tokens_scored"]
    assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)


@pytest.mark.parametrize("arch,bits,gs,sp", [("llama", 4, 32, None), ("qwen2", 2, 64, None),
                                             ("qwen2", 8, 32, None)])
def test_openvino_ir_equals_reference(ckpts, tmp_path, arch, bits, gs, sp):
    ov = pytest.importorskip("openvino")
    from bitpress.integrations.onnx_runtime import ExportedDecoder

    ck = ckpts(arch, bits, gs, sp)
    out = tmp_path / "ov"
    rep = ox.export_runtime(ck, out, "openvino")
    assert rep["format"] == "openvino" and (out / "openvino_model.xml").is_file()
    m = ov.Core().read_model(str(out / "openvino_model.xml"))
    low = [o for o in m.get_ops() if o.get_type_name() == "Constant"
           and str(o.get_output_element_type(0)) in ("<Type: 'uint4_t'>", "<Type: 'uint8_t'>")]
    assert len(low) == 14  # every packed linear kept as a u4/u8 constant, not re-quantized
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(4))
    ref, _ = _reference_logits(ck, ids)
    dec = ExportedDecoder(out, threads=1)
    got, _ = dec.forward(ids.numpy())
    np.testing.assert_allclose(got, ref, **TOL)
    lg, past = dec.forward(ids[:, :15].numpy())
    lg2, _ = dec.forward(ids[:, 15:].numpy(), past)
    np.testing.assert_allclose(np.concatenate([lg, lg2], 1), got, **TOL)


def test_weight_mapping_edge_cases():
    """Block sizes, the s = 0 re-encoding and the 8-bit zero term, on the tensors alone."""
    assert ox.nbits_block_size(128, 576) == 128 and ox.nbits_block_size(48, 96) == 16
    assert ox.nbits_block_size(96, 960) == 32 and ox.nbits_block_size(-1, 576) == 128
    g = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4, 8):
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        codes = torch.randint(lo, hi + 1, (8, 80), generator=g, dtype=torch.int8)
        s = torch.rand(8, 5, generator=g) + 0.01
        z = torch.randn(8, 5, generator=g)
        s[0, 1] = 0.0  # constant group
        s[1, 2] = 0.0
        z[1, 2] = 0.0  # zero group
        qw = QuantizedWeight(codes, s, z, bits, 16)
        cb = 4 if bits == 3 else bits
        q, s2, zp = ox.affine_codes(qw, cb)
        w = (q.float() - zp.repeat_interleave(16, 1)) * s2.repeat_interleave(16, 1)
        # float32 rounding of zp = 2^(b-1) - z/s and of the product: a few ulps of |z| + |s·q|
        e = lambda t: t.repeat_interleave(16, 1)  # noqa: E731
        bound = 4 * torch.finfo(torch.float32).eps * (e(z.abs()) + e(s) * (1 << cb))
        assert bool(((w - qw.dequantize()).abs() <= bound).all())
        assert torch.equal(w[0, 16:32], torch.full((16,), float(z[0, 1])))  # s = 0: exactly z
        assert not w[1, 32:48].any()
        t = ox.nbits_tensors(qw)  # no zero points: the op computes s·c, zeros added apart
        assert t["bits"] == cb and t["B"].shape == (8, 5, 16 * cb // 8)
        u = np.unpackbits(t["B"].reshape(8, -1), axis=-1, bitorder="little").reshape(8, 80, cb)
        q = (u.astype(np.int64) << np.arange(cb)).sum(-1)
        np.testing.assert_array_equal(q.astype(np.int64) - (1 << (cb - 1)), codes.numpy())
        np.testing.assert_array_equal(t["zero_t"], z.t().numpy())


def test_refusals(tiny_gpt2_dir, tiny_llama_dir, tmp_path, capsys):
    gpt2 = tmp_path / "gpt2q"
    assert main(["compress", str(tiny_gpt2_dir), "--out", str(gpt2), "--method", "rtn",
                 "--group-size", "32"]) == 0
    capsys.readouterr()
    assert main(["export", str(gpt2), "--out", str(tmp_path / "x"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "bitpress: error:" in err and "gpt2" in err and "llama" in err
    assert not (tmp_path / "x").exists()
    # a float (not packed) model
    assert main(["export", str(tiny_llama_dir), "--out", str(tmp_path / "y"),
                 "--format", "onnx"]) == 2
    assert "not a bitpress checkpoint" in capsys.readouterr().err
    ck = tmp_path / "llq"
    assert main(["compress", str(tiny_llama_dir), "--out", str(ck), "--method", "rtn",
                 "--group-size", "32"]) == 0
    model = bitpress.load(ck)
    model.config.use_sliding_window, model.config.sliding_window = True, 16
    with pytest.raises(ConfigError, match="sliding-window"):
        ox.build_graph(model)
    model.config.use_sliding_window = False
    with pytest.raises(ConfigError, match="activation"):
        model.config.hidden_act = "gelu"
        ox.build_graph(model)
    model.config.hidden_act = "silu"
    model.model.rotary_emb.rope_type = "dynamic"
    with pytest.raises(ConfigError, match="sequence length"):
        ox.build_graph(model)
    # existing output
    (tmp_path / "exists").mkdir()
    capsys.readouterr()
    assert main(["export", str(ck), "--out", str(tmp_path / "exists"), "--format", "onnx"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_onnx_options_container_and_accuracy(ckpts, tmp_path):
    """2-bit codes in 4-bit blocks stay exact; int8 activations (accuracy_level=4) run and
    stay close but are not claimed exact."""
    pytest.importorskip("onnxruntime")
    import onnx

    from bitpress.integrations.onnx_runtime import ExportedDecoder

    ck = ckpts("qwen2", 2, 64)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(6))
    ref, _ = _reference_logits(ck, ids)
    c4 = tmp_path / "c4"
    rep = ox.export_runtime(ck, c4, "onnx", container_2bit=4)
    assert any("4-bit container" in n for n in rep["notes"])
    g = onnx.load(str(c4 / "model.onnx"), load_external_data=False).graph
    bits = {a.i for n in g.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "bits"}
    assert bits == {4}
    np.testing.assert_allclose(ExportedDecoder(c4).forward(ids.numpy())[0], ref, **TOL)
    a4 = tmp_path / "a4"
    ox.export_runtime(ck, a4, "onnx", accuracy_level=4)
    got = ExportedDecoder(a4).forward(ids.numpy())[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    with pytest.raises(ConfigError, match="accuracy_level"):
        ox.export_runtime(ck, tmp_path / "bad", "onnx", accuracy_level=3)
    assert not (tmp_path / "bad").exists()
