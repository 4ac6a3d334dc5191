"""Checkpoint I/O and the CLI on real (tiny, randomly initialised) HF models."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bitpress
from bitpress.cli import main
from bitpress.errors import FormatError, SourceError
from bitpress.kernels import use_impl
from bitpress.nn import GroupSparseLinear, QuantLinear, Recipe
from bitpress.pipeline.compress import compress
from bitpress.pipeline.inspect import inspect_checkpoint
from bitpress.pipeline.source import open_source

from conftest import TEXT


def fake_quant_model(src_dir, bits, group, sparsity=None):
    """The source model with every targeted linear replaced by its dequantised weight."""
    from bitpress.nn.recipe import rtn_quantize_linear, target_linears

    model = open_source(src_dir).load_model()
    recipe = Recipe(bits=bits, group_size=group, sparsity=sparsity)
    for name, lin in list(target_linears(model, recipe)):
        w = lin.weight.detach()
        t = type(lin).__name__ == "Conv1D"
        qw = rtn_quantize_linear(w.t() if t else w, recipe)
        deq = qw.dequantize()
        lin.weight.data = deq.t().contiguous() if t else deq
    return model


def cast_unquantized(model, dtype):
    """What storing the unquantized tensors in ``dtype`` does to a float model."""
    for n, p in model.named_parameters():
        if not any(k in n for k in ("proj", "c_attn", "c_fc", "c_proj")):
            p.data = p.data.to(dtype).float()
    return model


@pytest.mark.parametrize("arch_fixture,bits,group,sparsity", [
    ("tiny_llama_dir", 4, 64, None),
    ("tiny_llama_dir", 2, -1, None),
    ("tiny_qwen2_dir", 3, 32, None),
    ("tiny_gpt2_dir", 4, 32, None),
    ("tiny_llama_dir", 4, 16, 0.5),
])
def test_compress_load_matches_fake_quant(request, tmp_path, arch_fixture, bits, group, sparsity):
    src = request.getfixturevalue(arch_fixture)
    out = tmp_path / "q"
    recipe = Recipe(bits=bits, group_size=group, sparsity=sparsity)
    compress(src, out, recipe, progress=False, dtype=torch.float32)
    model = bitpress.load(out)
    cls = GroupSparseLinear if sparsity else QuantLinear
    assert any(isinstance(m, cls) for m in model.modules())
    assert not any(p.device.type == "meta" for p in model.parameters())
    ref = fake_quant_model(src, bits, group, sparsity)
    ids = torch.randint(0, 400, (2, 17))
    with torch.no_grad(), use_impl("reference"):
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the default (fast) kernels stay close to it
        a, b = model(ids).logits, ref(ids).logits
        assert (a - b).abs().max() <= 0.05 * b.abs().max()
    # source untouched, nothing left beside the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_save_float16_storage_and_load_compute_dtype(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    compress(tiny_llama_dir, out, Recipe(bits=4, group_size=32), progress=False)
    files = bitpress.formats.SafetensorsDir(out)
    assert files.dtypes["model.embed_tokens.weight"] == "F16"
    assert "lm_head.weight" not in files  # tied: stored once
    model = bitpress.load(out)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref = cast_unquantized(fake_quant_model(tiny_llama_dir, 4, 32), torch.float16)
    ids = torch.randint(0, 400, (1, 9))
    with torch.no_grad(), use_impl("reference"):
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_sharded_save_round_trip(tiny_llama_dir, tmp_path):
    from bitpress.nn import replace_linears

    model = open_source(tiny_llama_dir).load_model()
    replace_linears(model, Recipe(bits=4, group_size=32))
    bitpress.save(model, tmp_path / "s", max_shard_bytes=50_000)
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert "model.safetensors.index.json" in names and sum(".safetensors" in n for n in names) > 3
    loaded = bitpress.load(tmp_path / "s")
    ids = torch.randint(0, 400, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_inspect_counts_bits(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    compress(tiny_llama_dir, out, Recipe(bits=4, group_size=32), progress=False)
    rep = inspect_checkpoint(out, histogram=True)
    assert rep["quantized_layers"] == 14
    # 4-bit codes + fp16 scale and zero per 32 weights = 4 + 32/32 = 5 bits/weight
    assert abs(rep["bits_per_weight_quantized"] - 5.0) < 1e-6
    assert all(sum(r["code_histogram"]) == r["shape"][0] * r["shape"][1] for r in rep["layers"])


def test_cli_compress_inspect_eval_generate(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["compress", str(tiny_llama_dir), "--out", str(out), "--bits", "4",
                 "--group-size", "64"]) == 0
    summary = json.loads((out / "bitpress_summary.json").read_text())
    assert summary["layers"] == 14 and summary["peak_rss_bytes"] > 0
    assert main(["inspect", str(out)]) == 0
    assert "bits/weight" in capsys.readouterr().out
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    for model in (str(tiny_llama_dir), str(out)):
        assert main(["eval", model, "--text", str(text), "--seqlen", "64", "--windows", "3"]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["windows"] == 3 and res["tokens_scored"] == 3 * 63
        assert 1.0 < res["perplexity"] < 1e4
    assert main(["generate", str(out), "--prompt", "The quick", "--max-new-tokens", "5"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["new_tokens"] <= 5
    assert plain["decode_path"] == "bitpress engine (C++), kernel mode exact"
    # the engine and transformers' generate agree (exact kernels)
    assert main(["generate", str(out), "--prompt", "The quick", "--max-new-tokens", "5",
                 "--no-engine"]) == 0
    hf = json.loads(capsys.readouterr().out)
    assert hf["text"] == plain["text"] and hf["decode_path"].startswith("transformers")
    # eval --kernel-mode names the mode and scores it (int8 differs from exact, slightly)
    assert main(["eval", str(out), "--text", str(text), "--seqlen", "64", "--windows", "3",
                 "--kernel-mode", "int8"]) == 0
    i8 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert i8["kernel_mode"] == "int8 (decode kernels at every size)"
    assert main(["eval", str(out), "--text", str(text), "--seqlen", "64", "--windows", "3"]) == 0
    ex = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ex["kernel_mode"].startswith("exact")
    assert i8["perplexity"] != ex["perplexity"] and abs(i8["nll"] / ex["nll"] - 1) < 0.05
    # --fast: fused linears/norms and an fp16 head leave greedy decoding where it was
    assert main(["generate", str(out), "--prompt", "The quick", "--max-new-tokens", "5",
                 "--fast"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == plain["text"]


def _corrupt_copies(src: Path, tmp_path: Path) -> dict[str, Path]:
    cases = {}
    trunc = tmp_path / "truncated"
    shutil.copytree(src, trunc)
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    cases["truncated"] = trunc
    garbage = tmp_path / "garbage"
    shutil.copytree(src, garbage)
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    cases["garbage"] = garbage
    shapes = tmp_path / "shapes"
    shutil.copytree(src, shapes)
    cfg = json.loads((shapes / "config.json").read_text())
    cfg["intermediate_size"] = 192  # weights in the file are 160 wide
    (shapes / "config.json").write_text(json.dumps(cfg))
    cases["wrong-shapes"] = shapes
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    shutil.copy(src / "config.json", pickle)
    (pickle / "pytorch_model.bin").write_bytes(b"not really")
    cases["pickle-only"] = pickle
    return cases


BAD_ARGS = {
    "missing source": (["compress", "/nonexistent/model"], "does not exist"),
    "unknown method": (["compress", "{src}", "--method", "magic"], "unknown method"),
    "bits 5": (["compress", "{src}", "--bits", "5"], "bits=5"),
    "group size 8": (["compress", "{src}", "--group-size", "8"], "group size 8"),
    "group size 1000": (["compress", "{src}", "--group-size", "1000"], "group size 1000"),
    "sparsity 2": (["compress", "{src}", "--sparsity", "2"], "sparsity"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_cli_bad_options_fail_cleanly(case, tiny_llama_dir, tmp_path, capsys):
    args, msg = BAD_ARGS[case]
    out = tmp_path / "out"
    argv = [a.format(src=tiny_llama_dir) for a in args] + ["--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitpress: error:") and msg in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_bad_sources_fail_cleanly(tiny_llama_dir, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    for name, src in _corrupt_copies(tiny_llama_dir, tmp_path).items():
        before = {p.name: p.read_bytes() for p in src.iterdir()}
        out = work / f"out-{name}"
        assert main(["compress", str(src), "--out", str(out)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("bitpress: error:") and len(err.splitlines()) == 1, (name, err)
        assert not out.exists() and list(work.iterdir()) == [], name
        assert {p.name: p.read_bytes() for p in src.iterdir()} == before, name


def test_existing_output_needs_force(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["compress", str(tiny_llama_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["compress", str(tiny_llama_dir), "--out", str(out), "--force",
                 "--group-size", "32"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_failure_mid_write_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    """No output appears; what is kept is the resumable work directory (docs/scale.md),
    which --resume continues and --force clears."""
    import bitpress.pipeline.streamout as so

    def boom(*a, **k):
        raise RuntimeError("disk full")

    real = so.write_safetensors
    monkeypatch.setattr(so, "write_safetensors", boom)
    with pytest.raises(RuntimeError):
        compress(tiny_llama_dir, tmp_path / "q", Recipe(bits=4, group_size=32), progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [".q.partial"]
    monkeypatch.setattr(so, "write_safetensors", real)
    compress(tiny_llama_dir, tmp_path / "q", Recipe(bits=4, group_size=32), progress=False,
             resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_load_rejects_tampered_checkpoints(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    compress(tiny_llama_dir, out, Recipe(bits=4, group_size=32), progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]["group_size"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="guard|shape"):
        bitpress.load(bad)
    cfg["quantization_config"]["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="format_version"):
        bitpress.load(bad)
    with pytest.raises(SourceError):
        bitpress.load(tmp_path / "nothing")


def test_eval_errors(tiny_llama_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    for argv, msg in (
        (["eval", str(tiny_llama_dir), "--text", str(short), "--seqlen", "64"], "shorter than"),
        (["eval", str(tiny_llama_dir), "--text", str(binary)], "not a text file"),
        (["eval", str(tiny_llama_dir), "--text", str(short), "--seqlen", "4096"], "context"),
    ):
        if "context" in msg:
            (tmp_path / "long.txt").write_text(TEXT * 20)
            argv[3] = str(tmp_path / "long.txt")
        assert main(argv) == 2
        assert msg in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).parent / "bitpress"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "bitpress.cli"]
    r = subprocess.run(cmd + ["inspect", str(tmp_path / "none")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2 and r.stderr.startswith("bitpress: error:")


def test_group_sparse_index_on_disk_is_a_bitmask(tiny_llama_dir, tmp_path):
    """format_version 2 writes one keep bit per group instead of row pointers and int32
    column indices; the summary's bits/weight counts exactly what is written; checkpoints of
    format_version 1 still load to the same model; a bitmask that disagrees with the config
    is refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from bitpress.formats import FORMAT_VERSION, keep_bits_to_bsr

    out = tmp_path / "q"
    summary = compress(tiny_llama_dir, out, Recipe(bits=4, group_size=16, sparsity=0.5),
                       progress=False, dtype=torch.float32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["format_version"] == FORMAT_VERSION == 3
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert not any(k.endswith((".row_ptr", ".col_idx")) for k in tensors)
    masks = {k: t for k, t in tensors.items() if k.endswith(".keep_bits")}
    mods = cfg["quantization_config"]["modules"]
    assert len(masks) == len(mods) and all(t.dtype == torch.uint8 for t in masks.values())
    # bits/weight = what the packed tensors take on disk
    packed = sum(t.numel() * t.element_size() for k, t in tensors.items()
                 if k.rsplit(".", 1)[0] in mods and not k.endswith((".bias", ".weight")))
    weights = sum(m["in_features"] * m["out_features"] for m in mods.values())
    assert summary["bits_per_weight"] == pytest.approx(8 * packed / weights, abs=1e-4)
    assert inspect_checkpoint(out)["bits_per_weight_quantized"] == pytest.approx(
        8 * packed / weights, rel=1e-6)
    model = bitpress.load(out)
    ids = torch.randint(0, 400, (1, 11))
    with torch.no_grad():
        want = model(ids).logits
    # the same checkpoint written as format_version 1 (row_ptr + int32 col_idx)
    v1 = tmp_path / "v1"
    shutil.copytree(out, v1)
    old = {}
    for k, t in tensors.items():
        if k.endswith(".keep_bits"):
            name = k[:-len(".keep_bits")]
            ng = -(-mods[name]["in_features"] // 16)
            old[f"{name}.row_ptr"], old[f"{name}.col_idx"] = keep_bits_to_bsr(t, ng)
        elif k.endswith(".weight") and k[:-len(".weight")] in mods:
            continue  # the format-3 guard
        else:
            old[k] = t
    save_file(old, str(v1 / "model.safetensors"), metadata={"format": "pt"})
    cfg1 = json.loads(json.dumps(cfg))
    cfg1["quantization_config"]["format_version"] = 1
    (v1 / "config.json").write_text(json.dumps(cfg1))
    with torch.no_grad():
        torch.testing.assert_close(bitpress.load(v1)(ids).logits, want, rtol=0, atol=0)
    # a bitmask with one kept group too many is refused
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    k = next(iter(masks))
    t = masks[k].clone()
    zero_bits = (t.to(torch.int32) == 0).nonzero()
    t[zero_bits[0, 0], 0] = 1
    save_file({**tensors, k: t}, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match="nnz"):
        bitpress.load(bad)
    # a format-2 file must not also carry row pointers / column indices
    extra = tmp_path / "extra"
    shutil.copytree(out, extra)
    name = next(iter(masks))[:-len(".keep_bits")]
    save_file({**tensors, f"{name}.col_idx": old[f"{name}.col_idx"]},
              str(extra / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match="does not have"):
        bitpress.load(extra)
    # a format-1 file whose row lists its groups out of order is refused, not mis-decoded
    r = next(i for i in range(len(old[f"{name}.row_ptr"]) - 1)
             if old[f"{name}.row_ptr"][i + 1] - old[f"{name}.row_ptr"][i] >= 2)
    a = int(old[f"{name}.row_ptr"][r])
    ci = old[f"{name}.col_idx"].clone()
    ci[[a, a + 1]] = ci[[a + 1, a]]
    save_file({**old, f"{name}.col_idx": ci}, str(v1 / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(FormatError, match="ascending"):
        bitpress.load(v1)
