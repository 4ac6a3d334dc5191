"""The C++ decode engine (bitpress.runtime.engine) against Hugging Face's forward over the same
modules, for every family it supports, float and packed (dense 2/3/4-bit, group-sparse),
in the exact and the int8 kernel modes, on fresh random models."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bitpress.kernels import cpu as kcpu  # noqa: E402
from bitpress.nn import Recipe, replace_linears  # noqa: E402
from bitpress.runtime import DecodeEngine, EngineUnsupported, engine_support  # noqa: E402
from bitpress.runtime.engine import attach_generate, engine_for, make_sampler  # noqa: E402


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _qwen2(seed=1):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=211, hidden_size=64, intermediate_size=80,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=1, max_position_embeddings=64)
    m = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero q/k/v biases
        for layer in m.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_(0, 0.5)
    return m


def _qwen3(seed=2):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(vocab_size=211, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=64)
    return transformers.Qwen3ForCausalLM(cfg).eval()


def _gemma3(seed=3):
    torch.manual_seed(seed)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        sliding_window=4, layer_types=["sliding_attention", "sliding_attention",
                                       "full_attention"])
    m = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma norms are (1 + w): make w matter
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.3)
    return m


def _gpt2(seed=4):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=211, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return m


FAMILIES = {"llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "gemma3": _gemma3,
            "gpt2": _gpt2}
RECIPES = {"float": None, "w4g16": Recipe(bits=4, group_size=16),
           "w8g32": Recipe(bits=8, group_size=32),
           "w2g32": Recipe(bits=2, group_size=32), "w3pc": Recipe(bits=3, group_size=-1),
           "w4g16s50": Recipe(bits=4, group_size=16, sparsity=0.5)}


def _model(fam, recipe):
    m = FAMILIES[fam]()
    if RECIPES[recipe] is not None:
        replace_linears(m, RECIPES[recipe])
    return m


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _last_step_error(m, ids):
    """``_rel`` of a one-thread engine's decode step of the last token of ``ids`` (1 x n),
    after a prefill of the others, against the model's own forward over all of ``ids``."""
    n = ids.shape[1]
    with torch.no_grad():
        full = m(ids).logits[0].float()
        eng = DecodeEngine(m, max_len=8, threads=1)
        eng.prefill(ids[:, :n - 1])
        return _rel(eng.step(int(ids[0, n - 1]), n - 1), full[n - 1])


@pytest.mark.parametrize("fam", sorted(FAMILIES))
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_engine_steps_equal_hf_forward_exact(fam, recipe):
    m = _model(fam, recipe)
    ids = torch.randint(0, 211, (1, 9))
    with kcpu.kernel_mode("exact"), torch.no_grad():
        full = m(ids).logits[0].float()
        eng = DecodeEngine(m, max_len=16, threads=1, mode="exact")
        lg = eng.prefill(ids[:, :3])
        assert _rel(lg, full[2]) <= 1e-4
        for p in range(3, 9):  # gemma3: positions past its sliding window of 4
            assert _rel(eng.step(int(ids[0, p]), p), full[p]) <= 1e-4, (fam, recipe, p)


@pytest.mark.parametrize("fam", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("mode", ["int8", "lut"])
def test_engine_matches_hf_in_the_approximate_modes(fam, mode):
    # the same kernels in the same mode on both sides: eval --kernel-mode scores what
    # generate --kernel-mode computes. Rounding activations to int8 is discontinuous, so the
    # fp32-order differences of the two paths can move an activation by one int8 step: the
    # engine must be much closer to the same-mode forward than the mode is to exact. (Not on
    # the tiny random Gemma-3, whose 0.3-scale (1 + w) norms amplify one such step into
    # logit changes as large as the mode's own error; exact mode covers it above.)
    m = _model(fam, "w2g32")
    ids = torch.randint(0, 211, (1, 6))
    with kcpu.kernel_mode("exact"), torch.no_grad():
        exact = m(ids).logits[0].float()
    with kcpu.kernel_mode(mode), torch.no_grad():
        full = m(ids).logits[0].float()
        eng = DecodeEngine(m, max_len=8, threads=2, mode=mode)
        eng.prefill(ids[:, :1])
        same, other = [], []
        for p in range(1, 6):
            lg = eng.step(int(ids[0, p]), p)
            same.append(_rel(lg, full[p]))
            other.append(_rel(lg, exact[p]))
    assert max(same) <= 5e-2
    assert sum(same) < 0.5 * sum(other), (same, other)


def test_engine_greedy_equals_hf_generate_and_threads_agree():
    m = _model("llama", "w4g16")
    ids = torch.randint(0, 211, (1, 5))
    with kcpu.kernel_mode("exact"), torch.no_grad():
        hf = m.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                        pad_token_id=0)
        outs = []
        for threads in (1, 2):
            eng = DecodeEngine(m, max_len=32, threads=threads, mode="exact")
            tm = {}
            outs.append(eng.generate(ids, 12, timings=tm))
            assert tm["decode_steps"] == 11 and tm["prompt_tokens"] == 5
    assert torch.equal(outs[0], hf) and torch.equal(outs[1], hf)


def test_engine_sampling_and_eos():
    m = _model("qwen2", "w4g16")
    ids = torch.randint(0, 211, (1, 4))
    eng = DecodeEngine(m, max_len=32, threads=1)
    g = torch.Generator().manual_seed(0)
    out = eng.generate(ids, 10, sample=make_sampler(0.8, top_k=20, top_p=0.9, generator=g))
    assert out.shape == (1, 14)
    greedy = eng.generate(ids, 10)
    eos = int(greedy[0, 6])  # stop at the third new token
    short = eng.generate(ids, 10, eos_token_id=eos)
    assert short.shape[1] <= 7 and int(short[0, -1]) == eos


def test_engine_refusals():
    m = _model("llama", "w4g16")
    with pytest.raises(Exception, match="max_len"):
        DecodeEngine(m, max_len=8).generate(torch.zeros(1, 6, dtype=torch.long), 5)
    with pytest.raises(Exception, match="batch 1"):
        DecodeEngine(m, max_len=8).prefill(torch.zeros(2, 3, dtype=torch.long))
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=16, word_embed_proj_dim=16))
    assert "no decode-engine support" in engine_support(opt)
    with pytest.raises(EngineUnsupported):
        DecodeEngine(opt)
    assert engine_support(m) is None
    # an 8-bit group-sparse weight has no CPU kernel: refused by name, not run wrongly
    m8 = _model("llama", "float")
    replace_linears(m8, Recipe(bits=8, group_size=32, sparsity=0.5))
    with pytest.raises(EngineUnsupported, match="group-sparse 8-bit"):
        DecodeEngine(m8)


def test_attach_generate_routes_and_rebuilds_after_an_edit():
    m = attach_generate(_model("llama", "w4g16"))
    ids = torch.randint(0, 211, (1, 5))
    with kcpu.kernel_mode("exact"):
        out = m.generate(ids, max_new_tokens=6, do_sample=False)
        assert "engine" in m.bitpress_decode_path
        hf = m.__dict__["_bitpress_hf_generate"](ids, max_new_tokens=6, do_sample=False,
                                                 min_new_tokens=6, pad_token_id=0)
        assert torch.equal(out, hf)
        two = m.generate(ids.repeat(2, 1), max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert two.shape[0] == 2 and "transformers" in m.bitpress_decode_path
        eng = engine_for(m, 16)
        with torch.no_grad():  # an in-place edit of a float weight: the engine is rebuilt
            m.model.norm.weight.mul_(2.0)
        assert engine_for(m, 16) is not eng
        with torch.no_grad():
            ref = m(ids).logits[0, -1].float()
        eng2 = engine_for(m, 16)
        assert _rel(eng2.prefill(ids), ref) <= 1e-4


def test_engine_binds_fp16_and_bf16_weights():
    m = _model("llama", "w4g16")
    from bitpress.nn.fuse import pack_output_head

    pack_output_head(m, bits=16)  # HalfLinear head
    ids = torch.randint(0, 211, (1, 5))
    with kcpu.kernel_mode("exact"):
        assert _last_step_error(m, ids) <= 1e-4
    mb = copy.deepcopy(_model("qwen3", "float")).to(torch.bfloat16)
    # bf16 HF rounds every activation to bf16; the engine computes in fp32
    assert _last_step_error(mb, ids) <= 5e-2


def test_engine_after_the_fuse_helpers():
    # generate --fast: fused q/k/v and gate/up, torch.nn.RMSNorm, fp16 head; the engine binds
    # the members' own buffers and reads the fused norms' epsilon
    from bitpress.nn.fuse import fuse_linears, fuse_norms, pack_output_head
    from bitpress.pipeline.arch import fused_projections

    m = _model("llama", "w4g16")
    assert fuse_linears(m, fused_projections(m)) > 0 and fuse_norms(m) > 0
    pack_output_head(m, bits=16)
    ids = torch.randint(0, 211, (1, 6))
    with kcpu.kernel_mode("exact"):
        assert _last_step_error(m, ids) <= 1e-4
