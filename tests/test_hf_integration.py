"""transformers integration: ``from_pretrained`` on bitpress checkpoints (after ``import
bitpress``, and through the checkpoint's remote-code loader without it), ``save_pretrained``
round trips, and every loader refusing broken or unknown checkpoints instead of building
randomly initialised layers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import bitpress
from bitpress.errors import FormatError
from bitpress.nn import GroupSparseLinear, QuantLinear, Recipe
from bitpress.pipeline.compress import compress

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent


def _auto(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **kw)


def _logits(model, seed=0):
    ids = torch.randint(0, 400, (2, 13), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _tensors(d):
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_llama_dir, tiny_gpt2_dir, tiny_qwen2_dir):
    root = tmp_path_factory.mktemp("hfq")
    out = {}
    for name, src, recipe in (
            ("llama_w4", tiny_llama_dir, Recipe(bits=4, group_size=32)),
            ("llama_gqsa", tiny_llama_dir, Recipe(bits=4, group_size=16, sparsity=0.5)),
            ("qwen2_w3", tiny_qwen2_dir, Recipe(bits=3, group_size=32)),
            ("gpt2_w2", tiny_gpt2_dir, Recipe(bits=2, group_size=-1))):
        compress(src, root / name, recipe, progress=False, dtype=torch.float32)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", ["llama_w4", "llama_gqsa", "qwen2_w3", "gpt2_w2"])
def test_from_pretrained_is_bitpress_load(ckpts, name, tmp_path):
    d = ckpts[name]
    ref = bitpress.load(d)
    model = _auto(d)
    cls = GroupSparseLinear if "gqsa" in name else QuantLinear
    n_packed = sum(isinstance(m, cls) for m in model.modules())
    assert n_packed == len(json.loads((d / "config.json").read_text())
                           ["quantization_config"]["modules"])
    assert model.config.quantization_config.quant_method == "bitpress"
    want = _logits(ref)
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
    # save_pretrained of either model: both loaders read it back identically
    for i, m in enumerate((model, ref)):
        out = tmp_path / f"sp{i}"
        m.save_pretrained(out)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["quantization_config"]["quant_method"] == "bitpress"
        assert "auto_map" not in cfg  # no reference to a code file it did not write
        torch.testing.assert_close(_logits(bitpress.load(out)), want, rtol=0, atol=0)
        torch.testing.assert_close(_logits(_auto(out)), want, rtol=0, atol=0)
    # a non-default compute dtype: same as bitpress.load with that dtype
    half = _auto(d, dtype=torch.bfloat16)
    assert half.get_input_embeddings().weight.dtype == torch.bfloat16
    ref_half = bitpress.pipeline.checkpoint.load(d, dtype=torch.bfloat16)
    for (k, a), b in zip(half.state_dict().items(), ref_half.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k


def _edited(src: Path, dst: Path, tensors=None, qcfg_edit=None, version=None) -> Path:
    shutil.copytree(src, dst)
    if tensors is not None:
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    if qcfg_edit:
        qcfg_edit(cfg["quantization_config"])
    if version is not None:
        cfg["quantization_config"]["format_version"] = version
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_broken_checkpoints_are_refused_by_both_loaders(ckpts, tmp_path):
    src = ckpts["llama_w4"]
    t = _tensors(src)
    mod = "model.layers.1.mlp.up_proj"

    def set_bits(q):
        q["modules"][mod]["bits"] = 2

    def set_group(q):
        q["modules"][mod]["group_size"] = 16

    cases = {
        "missing_qweight": dict(tensors={k: v for k, v in t.items() if k != f"{mod}.qweight"}),
        "missing_scales": dict(tensors={k: v for k, v in t.items() if k != f"{mod}.scales"}),
        "missing_norm": dict(tensors={k: v for k, v in t.items() if k != "model.norm.weight"}),
        "missing_guard": dict(tensors={k: v for k, v in t.items() if k != f"{mod}.weight"}),
        "short_qweight": dict(tensors={**t, f"{mod}.qweight": t[f"{mod}.qweight"][:, :-1].contiguous()}),
        "wrong_guard": dict(tensors={**t, f"{mod}.weight": torch.tensor([160, 96, 2, 32],
                                                                        dtype=torch.int32)}),
        "float_codes": dict(tensors={**t, f"{mod}.qweight": t[f"{mod}.qweight"].float()}),
        "extra_tensor": dict(tensors={**t, "model.layers.0.extra": torch.zeros(3)}),
        "bits_edited": dict(qcfg_edit=set_bits),
        "group_edited": dict(qcfg_edit=set_group),
    }
    for case, kw in cases.items():
        d = _edited(src, tmp_path / case, **kw)
        with pytest.raises(FormatError):
            bitpress.load(d)
        with pytest.raises((FormatError, RuntimeError, ValueError)):
            _auto(d)
    # a truncated shard
    d = tmp_path / "truncated"
    shutil.copytree(src, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(FormatError, match="truncated"):
        bitpress.load(d)
    with pytest.raises(Exception):
        _auto(d)


def test_format_2_checkpoints_still_load(ckpts, tmp_path):
    src = ckpts["llama_gqsa"]
    mods = json.loads((src / "config.json").read_text())["quantization_config"]["modules"]
    old = {k: v for k, v in _tensors(src).items() if not (k.endswith(".weight")
                                                          and k[:-len(".weight")] in mods)}
    d = _edited(src, tmp_path / "v2", tensors=old, version=2)
    want = _logits(bitpress.load(src))
    torch.testing.assert_close(_logits(bitpress.load(d)), want, rtol=0, atol=0)
    torch.testing.assert_close(_logits(_auto(d)), want, rtol=0, atol=0)
    # a format-3 checkpoint without guards is not a format-2 one
    with pytest.raises(FormatError, match="guard"):
        bitpress.load(_edited(d, tmp_path / "v3noguard", version=3))


def test_without_bitpress_imported(ckpts, tmp_path):
    """In a fresh interpreter: importing bitpress does not import transformers; transformers
    that never saw bitpress refuses a bitpress checkpoint (the guards' size mismatch) instead
    of initialising its linears randomly; ``trust_remote_code=True`` loads it through the
    checkpoint's own loader with the exact logits of ``bitpress.load``."""
    d = ckpts["llama_w4"]
    want = tmp_path / "want.pt"
    torch.save(_logits(bitpress.load(d)), want)
    script = textwrap.dedent(f"""
        import sys, torch
        import bitpress
        assert "transformers" not in sys.modules, "import bitpress imported transformers"
        del sys.modules["bitpress"]
        sys.meta_path[:] = [f for f in sys.meta_path if "bitpress" not in type(f).__module__]
        from transformers import AutoModelForCausalLM
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        assert "bitpress" not in AUTO_QUANTIZER_MAPPING
        try:
            AutoModelForCausalLM.from_pretrained({str(d)!r})
        except RuntimeError as e:
            assert "mismatch" in str(e), e
            print("REFUSED")
        else:
            print("LOADED")
        m = AutoModelForCausalLM.from_pretrained({str(d)!r}, trust_remote_code=True)
        assert type(m.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
        ids = torch.randint(0, 400, (2, 13), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = m(ids).logits
        print("EXACT" if torch.equal(got, torch.load({str(want)!r})) else "DIFFERENT")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["REFUSED", "EXACT"], r.stdout + r.stderr[-2000:]
