"""``bitpress export``: packed checkpoints back to plain float Hugging Face directories."""
from __future__ import annotations

import json

import pytest
import torch

import bitpress
from bitpress.cli import main
from bitpress.kernels.ops import use_impl
from bitpress.nn.modules import GroupSparseLinear, QuantLinear
from conftest import dir_digest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch,extra,cls", [
    ("llama", ["--sparsity", "0.5", "--group-size", "16"], GroupSparseLinear),
    ("llama", ["--bits", "3", "--group-size", "32"], QuantLinear),
    ("gpt2", ["--sparsity", "0.5", "--group-size", "16"], GroupSparseLinear),
])
def test_export_is_the_packed_model_in_float(request, tmp_path, arch, extra, cls, capsys):
    from transformers import AutoModelForCausalLM

    src = request.getfixturevalue(f"tiny_{arch}_dir")
    ckpt, out = tmp_path / "q", tmp_path / "f"
    assert main(["compress", str(src), "--out", str(ckpt), "--method", "rtn", *extra]) == 0
    before = dir_digest(ckpt)
    capsys.readouterr()
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert dir_digest(ckpt) == before  # the input is only read
    packed = bitpress.load(ckpt)
    mods = {n: m for n, m in packed.named_modules() if isinstance(m, cls)}
    assert rep["linears"] == len(mods) > 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for name, m in mods.items():  # the weight the reference op multiplies by, exactly
        w = plain.get_submodule(name).weight
        w = w.t() if arch == "gpt2" else w
        assert torch.equal(w, m.dequantize()), name
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), use_impl("reference"):
        ref = packed(ids).logits
    with torch.no_grad():
        got = plain(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_staged_pruning_through_export(tiny_llama_dir, tmp_path):
    """An exported S50 model compressed again at S75 keeps every group the first stage
    pruned pruned (they are zero), and prunes only among the kept ones."""
    s50, f50, s75 = tmp_path / "s50", tmp_path / "f50", tmp_path / "s75"
    common = ["--method", "rtn", "--group-size", "16"]
    assert main(["compress", str(tiny_llama_dir), "--out", str(s50), *common,
                 "--sparsity", "0.5"]) == 0
    assert main(["export", str(s50), "--out", str(f50)]) == 0
    assert main(["compress", str(f50), "--out", str(s75), *common, "--sparsity", "0.75"]) == 0
    a, b = bitpress.load(s50), bitpress.load(s75)
    n = 0
    for name, m in a.named_modules():
        if isinstance(m, GroupSparseLinear):
            keep_a = m.quantized_weight().keep.bool()
            keep_b = b.get_submodule(name).quantized_weight().keep.bool()
            assert not (keep_b & ~keep_a).any(), name
            assert abs(keep_b.float().mean().item() - 0.25) < 0.02
            n += 1
    assert n == 14


def test_export_errors_leave_nothing(tiny_llama_dir, tmp_path, capsys):
    ckpt = tmp_path / "q"
    assert main(["compress", str(tiny_llama_dir), "--out", str(ckpt), "--method", "rtn",
                 "--group-size", "32"]) == 0
    capsys.readouterr()
    # a float model is not a packed checkpoint
    assert main(["export", str(tiny_llama_dir), "--out", str(tmp_path / "x")]) == 2
    assert "not a bitpress checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # an existing output is kept unless --force
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "keep.txt").write_text("mine")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "y")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "y" / "keep.txt").read_text() == "mine"
    # half-precision output on request
    assert main(["export", str(ckpt), "--out", str(tmp_path / "h"), "--dtype", "bfloat16"]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "h" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}
