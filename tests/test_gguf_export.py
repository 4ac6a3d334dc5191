"""``bitpress export --format gguf``: block encoders checked against the gguf package's own
dequantizer (always run), the exported file read back with gguf's reader, and -- where
llama-cpp-python is installed -- the file run in llama.cpp against bitpress's reference op."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from bitpress.cli import main  # noqa: E402
from bitpress.formats import QuantizedWeight, quantize_rtn  # noqa: E402
from bitpress.integrations.gguf_export import (decode, encode_q4_0, encode_q4_1,  # noqa: E402
                                               encode_q8_0, llama_qk_rows, maps_exactly)

pytestmark = pytest.mark.usefixtures("one_thread")


def _weight(out, n, seed, scale=0.05, shift=0.01):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=g) * scale + shift


def _pruned(qw: QuantizedWeight, seed: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(qw.scale.shape, generator=g) > 0.4
    return QuantizedWeight(qw.codes, qw.scale, qw.zero, qw.bits, qw.group_size, keep)


@pytest.mark.parametrize("shape", [(8, 32), (40, 96), (64, 576), (3, 1536)])
@pytest.mark.parametrize("gs", [32, 64, 128, -1])
def test_q4_0_and_q8_0_are_exact(shape, gs):
    w = _weight(*shape, seed=shape[0] * 7 + max(gs, 0))
    for bits, enc, name in ((4, encode_q4_0, "q4_0"), (8, encode_q8_0, "q8_0"),
                            (2, encode_q8_0, "q8_0")):
        for qw in (quantize_rtn(w, bits, gs, sym=True),):
            variants = [qw] + ([_pruned(qw, 1)] if gs != -1 else [])
            for v in variants:
                assert maps_exactly(v, name) is None
                raw, stats = enc(v)
                assert raw.dtype == np.uint8
                got = decode(raw, name)
                assert np.array_equal(got, v.dequantize().numpy()), (bits, gs, name)


def test_q4_0_refuses_what_it_cannot_hold():
    w = _weight(16, 64, seed=3)
    asym = quantize_rtn(w, 4, 32)
    assert "zero" in maps_exactly(asym, "q4_0")
    with pytest.raises(Exception, match="Q4_0 cannot hold"):
        encode_q4_0(asym)
    assert "multiple of 32" in maps_exactly(quantize_rtn(w, 4, 16, sym=True), "q4_0")
    assert maps_exactly(quantize_rtn(w, 3, 32, sym=True), "q4_0") is not None
    assert "multiple of 32" in maps_exactly(quantize_rtn(_weight(4, 48, 1), 4, -1), "q4_1")


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("gs", [32, 64, 128, -1])
def test_q4_1_exact_when_the_offset_is_fp16(bits, gs):
    """Free-float zeros chosen so that some offset m = z - o*s is an fp16 number: the
    encoder finds it and the blocks decode bit-exactly (pruned groups too)."""
    g = torch.Generator().manual_seed(bits * 100 + gs)
    out, n = 24, 256
    qw0 = quantize_rtn(_weight(out, n, seed=bits + gs), bits, gs)
    s = qw0.scale
    m = (torch.randn(s.shape, generator=g) * 0.02).half().float()
    z = m + 8 * s  # 8*s is exact: m + 8s decodes as d*q + m with q = c + 8
    z16 = z.half().float()
    ok = (z16 - 8 * s).half().float() == (z16 - 8 * s)
    z = torch.where(ok, z16, torch.zeros_like(z16))  # z = 0 -> m = -8s, exact too
    qw = QuantizedWeight(qw0.codes, s, z, bits, gs)
    for v in [qw] + ([_pruned(qw, 2)] if gs != -1 else []):
        raw, stats = encode_q4_1(v)
        assert stats["m_inexact_blocks"] == 0
        assert np.array_equal(decode(raw, "q4_1"), v.dequantize().numpy())


@pytest.mark.parametrize("seed", range(4))
def test_q4_1_rounding_of_the_offset_is_bounded_and_counted(seed):
    """General zeros: a block decodes exactly unless its fp16 offset m was rounded (counted
    in the stats), and then by at most half an fp16 ulp of m; the offset search never
    leaves more inexact blocks than the plain o = 8."""
    w = _weight(48, 320, seed=seed, shift=0.03 * seed)
    qw = quantize_rtn(w, 4, 32)
    raw, stats = encode_q4_1(qw)
    got = torch.from_numpy(decode(raw, "q4_1")).view(48, 10, 32)
    ref = qw.dequantize().view(48, 10, 32)
    bad_blocks = (got != ref).any(-1)
    assert int(bad_blocks.sum()) <= stats["m_inexact_blocks"]
    assert stats["m_inexact_blocks"] <= stats["m_inexact_blocks_at_offset_8"]
    # bound: |error| <= ulp(|m|)/2 with |m| <= |z| + 23*s
    s, z = qw.scale, qw.zero
    mmax = (z.abs() + 23 * s).half().float()
    ulp = torch.nextafter(mmax.half(), torch.tensor(float("inf")).half()).float() - mmax
    err = (got - ref).abs().amax(-1)
    assert bool((err <= ulp * 0.5 + 1e-12).all())
    # and without exact offsets the whole tensor stays within the fp16 rounding of m
    assert float((got - ref).abs().max()) < 1e-3


def test_llama_row_order_turns_half_rotation_into_pair_rotation():
    """The q/k row permutation makes llama.cpp's adjacent-pair rope (the GGUF layout) give
    the same attention scores as transformers' rotate-half rope on the original rows."""
    torch.manual_seed(0)
    n_head, d, n = 3, 16, 48
    wq = torch.randn(n_head * d, n)
    x = torch.randn(5, n)
    pos = torch.arange(5).float()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = pos[:, None] * inv[None]  # [5, d/2]
    cos, sin = ang.cos(), ang.sin()

    def rope_half(q):  # transformers: pairs (i, i + d/2)
        q = q.view(5, n_head, d)
        a, b = q[..., : d // 2], q[..., d // 2:]
        c, s_ = cos[:, None], sin[:, None]
        return torch.cat([a * c - b * s_, b * c + a * s_], -1)

    def rope_pairs(q):  # llama.cpp normal rope: pairs (2i, 2i+1)
        q = q.view(5, n_head, d // 2, 2)
        a, b = q[..., 0], q[..., 1]
        c, s_ = cos[:, None], sin[:, None]
        return torch.stack([a * c - b * s_, b * c + a * s_], -1).view(5, n_head, d)

    hf = rope_half(x @ wq.t())
    gg = rope_pairs(x @ wq[llama_qk_rows(n_head * d, n_head)].t())
    torch.testing.assert_close(torch.einsum("ihd,jhd->hij", gg, gg),
                               torch.einsum("ihd,jhd->hij", hf, hf), rtol=1e-4, atol=1e-3)
    # and without the permutation the scores differ (the test can fail)
    bad = rope_pairs(x @ wq.t())
    assert not torch.allclose(torch.einsum("ihd,jhd->hij", bad, bad),
                              torch.einsum("ihd,jhd->hij", hf, hf), rtol=1e-2, atol=1e-1)


# ---- whole-checkpoint export ------------------------------------------------------------

def _compress(src, out, *extra):
    assert main(["compress", str(src), "--out", str(out), "--method", "rtn", *extra]) == 0


def _read(path):
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in r.tensors}
    return r, tensors


def _field(r, key):
    return r.fields[key].contents()


@pytest.mark.parametrize("arch,extra,qtype", [
    ("llama", ["--bits", "4", "--group-size", "32"], "Q4_1"),
    ("llama", ["--bits", "4", "--group-size", "64", "--sym"], "Q4_0"),
    ("qwen2", ["--bits", "8", "--group-size", "32", "--sym"], "Q8_0"),
    ("qwen2", ["--bits", "2", "--group-size", "128"], "Q4_1"),
])
def test_export_writes_the_packed_weights(request, tmp_path, capsys, arch, extra, qtype):
    import bitpress

    src = request.getfixturevalue(f"tiny_{arch}_dir")
    ckpt, out = tmp_path / "q", tmp_path / "m.gguf"
    _compress(src, ckpt, *extra)
    capsys.readouterr()
    assert main(["export", str(ckpt), "--format", "gguf", "--out", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["arch"] == arch and rep["types"][qtype.lower()] == 14
    r, tensors = _read(out)
    assert _field(r, "general.architecture") == arch
    assert _field(r, f"{arch}.block_count") == 2
    assert _field(r, f"{arch}.attention.head_count_kv") == 2
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    toks = r.fields["tokenizer.ggml.tokens"]
    assert len(toks.data) == 512
    model = bitpress.load(ckpt)
    n_bad = 0
    for name, m in model.named_modules():
        if not hasattr(m, "quantized_weight"):
            continue
        i = name.split(".")[2]
        short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                 "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                 "down_proj": "ffn_down"}[name.rsplit(".", 1)[1]]
        t = tensors[f"blk.{i}.{short}.weight"]
        assert t.tensor_type.name == qtype
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        ref = m.dequantize()
        if arch == "llama" and short in ("attn_q", "attn_k"):
            n_head = 4 if short == "attn_q" else 2
            ref = ref[llama_qk_rows(ref.shape[0], n_head)]
        if qtype == "Q4_1":
            n_bad += int((got != ref).any())
            assert float((got - ref).abs().max()) < 1e-3
        else:
            assert torch.equal(got, ref), name
        if arch == "qwen2" and short in ("attn_q", "attn_k", "attn_v"):
            b = tensors[f"blk.{i}.{short}.bias"]
            assert torch.equal(torch.from_numpy(b.data.copy()), m.bias.float())
    if qtype == "Q4_1":
        assert rep["q4_1"]["tensors_not_bit_exact"] == n_bad
    else:
        assert rep["exact"] is True
    assert ("output.weight" in tensors) == (arch == "qwen2")  # tiny llama ties its head
    emb = tensors["token_embd.weight"]
    assert tuple(emb.shape) == (96, 512)  # ggml order: ne0 = hidden


def test_export_refuses_or_reports_requantization(tiny_llama_dir, tmp_path, capsys):
    ckpt = tmp_path / "g16"
    _compress(tiny_llama_dir, ckpt, "--bits", "4", "--group-size", "16")
    capsys.readouterr()
    out = tmp_path / "m.gguf"
    assert main(["export", str(ckpt), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no exact GGUF block type" in err and "--allow-requant" in err
    assert not out.exists() and not list(tmp_path.glob(".m.gguf*"))
    assert main(["export", str(ckpt), "--format", "gguf", "--out", str(out),
                 "--allow-requant"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["exact"] is False and len(rep["requantized"]) == 14
    for v in rep["requantized"].values():
        assert v["type"] == "q4_1" and 0 < v["relative_error"] < 0.2
    # an existing file is kept unless --force; a float model is not a packed checkpoint
    assert main(["export", str(ckpt), "--format", "gguf", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tiny_llama_dir), "--format", "gguf", "--out",
                 str(tmp_path / "x.gguf")]) == 2
    assert "not a bitpress checkpoint" in capsys.readouterr().err
    # forcing a float type writes the dequantized weights exactly
    assert main(["export", str(ckpt), "--format", "gguf", "--out", str(out), "--force",
                 "--gguf-type", "f32"]) == 0
    assert json.loads(capsys.readouterr().out)["exact"] is True


# ---- llama.cpp itself (optional) ---------------------------------------------------------

def _llama_logits(path, ids):
    llama_cpp = pytest.importorskip("llama_cpp")
    # fp32 KV cache (llama.cpp's default is fp16, which alone moves logits by ~1e-4)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=1,
                          logits_all=True, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("arch,extra,gtype,tol", [
    ("llama", ["--bits", "4", "--group-size", "32"], "f32", 5e-4),
    ("qwen2", ["--bits", "4", "--group-size", "64"], "f32", 5e-4),
    ("llama", ["--bits", "4", "--group-size", "32"], "auto", 3e-2),
    ("llama", ["--bits", "8", "--group-size", "32", "--sym"], "auto", 1e-2),
])
def test_llama_cpp_gives_bitpress_logits(request, tmp_path, arch, extra, gtype, tol):
    """llama.cpp on the exported file vs bitpress's reference op on the checkpoint, same
    token ids, fp32 KV cache. F32 files: the packed linears are exact fp32 weights, but the
    embedding (and the tied head) stay fp16 as stored, and llama.cpp's F16 matmul rounds
    the activations to fp16 (measured ~1.1e-4 * max |logit|): tolerance 5e-4. Q4_1 / Q8_0 files: llama.cpp's CPU matmul quantizes
    the activations to 8 bits (Q8_1 / Q8_0 blocks), so the tolerance is that of 8-bit
    activations (3e-2 / 1e-2 relative)."""
    pytest.importorskip("llama_cpp")
    import bitpress
    from bitpress.kernels.ops import use_impl

    src = request.getfixturevalue(f"tiny_{arch}_dir")
    ckpt, out = tmp_path / "q", tmp_path / "m.gguf"
    _compress(src, ckpt, *extra)
    assert main(["export", str(ckpt), "--format", "gguf", "--out", str(out),
                 "--gguf-type", gtype]) == 0
    ids = torch.randint(3, 400, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    model = bitpress.load(ckpt)
    with torch.no_grad(), use_impl("reference"):
        ref = model(torch.tensor([ids])).logits[0].float()
    got = _llama_logits(out, ids)
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= tol * scale, float((got - ref).abs().max()) / scale
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > (0.99 if gtype == "f32" else 0.9)


def test_llama_cpp_tokenizes_like_the_checkpoint(tiny_llama_dir, tmp_path):
    """The tokenizer metadata written from the checkpoint's tokenizer.json makes llama.cpp
    split text into the ids transformers gives."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from conftest import TEXT

    ckpt, out = tmp_path / "q", tmp_path / "m.gguf"
    _compress(tiny_llama_dir, ckpt, "--bits", "4", "--group-size", "32")
    assert main(["export", str(ckpt), "--format", "gguf", "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(ckpt)
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    try:
        for text in (TEXT[:300], "Packed weights: 4 bits, 32 per group!\n  x = 12345"):
            want = tok(text, add_special_tokens=False)["input_ids"]
            got = llm.tokenize(text.encode(), add_bos=False, special=False)
            assert got == want, text
    finally:
        llm.close()


def test_cli_gguf_type_choices_match_the_module():
    from bitpress.cli import build_parser
    from bitpress.integrations.gguf_export import GGUF_TYPES

    export = build_parser()._subparsers._group_actions[0].choices["export"]
    opt = next(a for a in export._actions if a.dest == "gguf_type")
    assert tuple(opt.choices) == GGUF_TYPES
