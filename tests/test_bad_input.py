"""Bad input, as a new user would give it (issue 29, item 6): every case here once ended in
data loss, a traceback, a NaN result or a misleading message. Each must now fail with one
``bitpress: error:`` line and exit status 2 (or behave as stated), before any slow work,
leaving its inputs untouched and no output behind."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import bitpress
from bitpress.cli import main
from bitpress.errors import ConfigError, FormatError, OutputExistsError
from bitpress.formats.checkpoint import (atomic_output_dir, check_output_path,
                                         remove_stale_scratch, save_safetensors)

from conftest import TEXT, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
RTN = ["--method", "rtn", "--bits", "4", "--group-size", "32", "--dtype", "float32"]


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def packed(tiny_llama_dir, tmp_path_factory):
    """A packed RTN checkpoint of the tiny Llama (written once for the module)."""
    out = tmp_path_factory.mktemp("bad") / "q"
    assert main(["compress", str(tiny_llama_dir), "--out", str(out), *RTN]) == 0
    return out


def _edit_tensor(d: Path, name: str, fn) -> None:
    """Rewrite one tensor of the (single-file) safetensors checkpoint in ``d``."""
    from safetensors.torch import load_file, save_file

    f = next(p for p in d.glob("*.safetensors"))
    sd = load_file(str(f))
    assert name in sd, sorted(sd)[:20]
    fn(sd[name])
    save_file(sd, str(f), metadata={"format": "pt"})


# ---- data loss: an output that is, contains or lies inside an input -----------------------
def test_compress_never_replaces_its_source(tiny_llama_dir, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    before = _tree(src)
    for out in (src, tmp_path, src / "sub", Path(str(src) + "/")):
        assert main(["compress", str(src), "--out", str(out), "--force", *RTN]) == 2
        assert "input" in _err(capsys)
    # a symlink to the source is the source
    (tmp_path / "link").symlink_to(src)
    assert main(["compress", str(src), "--out", str(tmp_path / "link"), "--force", *RTN]) == 2
    assert _tree(src) == before and not (src / "sub").exists()
    # the calibration text is an input too
    calib = src / "calib.txt"
    calib.write_text(TEXT)
    assert main(["compress", str(tiny_llama_dir), "--out", str(src), "--force", "--calib",
                 str(calib), *RTN]) == 2
    assert calib.read_text() == TEXT


def test_export_and_finetune_never_replace_their_input(packed, tmp_path, calib_file, capsys):
    before = _tree(packed)
    for out in (packed, packed.parent, packed / "x"):
        assert main(["export", str(packed), "--out", str(out), "--force"]) == 2
        assert "input" in _err(capsys)
    assert main(["finetune", str(packed), "--text", str(calib_file), "--out", str(packed),
                 "--force"]) == 2
    assert "omit --out" in _err(capsys)
    for out in (packed.parent, packed / "x", calib_file):
        assert main(["finetune", str(packed), "--text", str(calib_file), "--out", str(out),
                     "--force", "--steps", "1"]) == 2
        assert "input" in _err(capsys)
    assert _tree(packed) == before and calib_file.read_text() == TEXT


def test_gguf_source_file_is_an_input(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="is the input"):
        check_output_path(f, [f], overwrite=True)
    with pytest.raises(ConfigError, match="contains the input"):
        check_output_path(tmp_path, [f], overwrite=True)
    assert check_output_path(tmp_path / "out", [f]) == (tmp_path / "out").absolute()


# ---- the output is checked before anything is loaded -------------------------------------
def test_bad_outputs_fail_before_loading(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import bitpress.pipeline.compress as comp

    def boom(*a, **k):
        raise AssertionError("the source was opened before the output was checked")
    monkeypatch.setattr(comp, "_open", boom)
    f = tmp_path / "file"
    f.write_text("x")
    cases = [([str(f), "--force"], "not a directory"),          # --force onto a file
             ([str(f)], "already exists"),
             ([str(f / "sub")], "not a directory"),             # under a file
             ]
    for out, msg in cases:
        assert main(["compress", str(tiny_llama_dir), "--out", *out, *RTN]) == 2
        assert msg in _err(capsys)
    assert f.read_text() == "x"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="permission bits do not stop root")
def test_read_only_output_folder(tiny_llama_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["compress", str(tiny_llama_dir), "--out", str(ro / "q"), *RTN]) == 2
        assert "not writable" in _err(capsys)
    finally:
        ro.chmod(0o755)


def test_check_output_path_kinds(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        check_output_path(d)
    assert check_output_path(d, overwrite=True) == d
    with pytest.raises(OutputExistsError, match="is a directory"):
        check_output_path(d, overwrite=True, kind="file")
    assert check_output_path(tmp_path / "a" / "b" / "c") == tmp_path / "a" / "b" / "c"
    assert not (tmp_path / "a").exists()  # nothing is created by the check
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bitpress-probe")]


# ---- NaN / Inf ----------------------------------------------------------------------------
@pytest.fixture()
def nan_norm_src(tiny_llama_dir, tmp_path):
    src = tmp_path / "nan-src"
    shutil.copytree(tiny_llama_dir, src)
    _edit_tensor(src, "model.layers.1.post_attention_layernorm.weight",
                 lambda t: t.__setitem__(3, float("nan")))
    return src


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nan_in_a_norm_weight_is_named(nan_norm_src, tmp_path, calib_file, method, capsys):
    argv = ["compress", str(nan_norm_src), "--out", str(tmp_path / "q"), "--method", method,
            "--group-size", "32"]
    if method == "gptq":
        argv += ["--calib", str(calib_file), "--nsamples", "4", "--seqlen", "32"]
    assert main(argv) == 2
    err = _err(capsys)
    assert "model.layers.1.post_attention_layernorm.weight" in err and "NaN" in err
    assert "activation" not in err
    assert not (tmp_path / "q").exists()
    # the float model is refused the same way by eval
    assert main(["eval", str(nan_norm_src), "--text", str(calib_file), "--seqlen", "32"]) == 2
    assert "post_attention_layernorm.weight" in _err(capsys)


def test_inf_scale_in_a_checkpoint_is_named(packed, tmp_path, calib_file, capsys):
    bad = tmp_path / "inf"
    shutil.copytree(packed, bad)
    name = "model.layers.0.self_attn.q_proj.scales"
    _edit_tensor(bad, name, lambda t: t.__setitem__((0, 0), float("inf")))
    with pytest.raises(FormatError, match=name.replace(".", r"\.") + ".*Inf"):
        bitpress.load(bad)
    assert main(["eval", str(bad), "--text", str(calib_file), "--seqlen", "32"]) == 2
    assert name in _err(capsys)
    assert capsys.readouterr().out == ""


def test_eval_never_prints_nan(tiny_llama_dir, tmp_path, calib_file, capsys):
    """Finite weights whose activations overflow: eval refuses with an error (exit 2) and
    prints no JSON, rather than ``"perplexity": NaN`` (which is not JSON)."""
    src = tmp_path / "overflow"
    shutil.copytree(tiny_llama_dir, src)
    _edit_tensor(src, "model.norm.weight", lambda t: t.fill_(3e38))
    assert main(["eval", str(src), "--text", str(calib_file), "--seqlen", "32",
                 "--windows", "2"]) == 2
    err = _err(capsys)
    assert "window 0" in err and ("NaN" in err or "Inf" in err)
    assert capsys.readouterr().out == ""


def test_gptq_blames_the_weight_not_the_activations():
    from bitpress.quant import QuantSpec, gptq

    W = torch.randn(8, 32)
    W[2, 5] = float("nan")
    with pytest.raises(ConfigError, match="weight contains NaN"):
        gptq(W, torch.eye(32), QuantSpec(bits=4, group_size=16))


# ---- inspect validates what it reports ----------------------------------------------------
@pytest.mark.parametrize("key,value", [("bits", 2), ("bits", 8), ("group_size", 64),
                                       ("group_size", -1), ("in_features", 64),
                                       ("out_features", 100), ("format", "bsr"),
                                       ("bits", 5), ("group_size", 100000), ("bits", "4"),
                                       ("in_features", 0)])
def test_inspect_refuses_an_edited_scheme(packed, tmp_path, key, value, capsys):
    bad = tmp_path / "edited"
    shutil.copytree(packed, bad)
    cfg = json.loads((bad / "config.json").read_text())
    mods = cfg["quantization_config"]["modules"]
    first = next(iter(mods))
    mods[first][key] = value
    if key == "format":
        mods[first]["nnz"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(bad)]) == 2
    err = _err(capsys)
    assert first in err
    assert capsys.readouterr().out == ""
    assert main(["inspect", str(packed)]) == 0  # the original is fine


def test_inspect_refuses_edited_headline_bits(packed, tmp_path, capsys):
    bad = tmp_path / "edited"
    shutil.copytree(packed, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 7
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(bad)]) == 2
    assert "quantization_config.bits" in _err(capsys)


# ---- killed saves -------------------------------------------------------------------------
def test_stale_scratch_folders_are_removed_by_the_next_write(tmp_path):
    out = tmp_path / "q"
    dead = tmp_path / ".q.tmp-999999999-abc"       # no such pid
    legacy = tmp_path / ".q.tmp-abcdefgh"          # older bitpress: no pid, a day old
    fresh_legacy = tmp_path / ".q.tmp-zzzzzzzz"    # ... but recent: may still be written
    live = tmp_path / f".q.tmp-{os.getpid()}-xyz"  # a live writer
    other = tmp_path / ".qq.tmp-999999999-abc"     # another output's
    for d in (dead, legacy, fresh_legacy, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 10)
    old = time.time() - 2 * 24 * 3600
    os.utime(legacy, (old, old))
    with atomic_output_dir(out) as tmp:
        (tmp / "f").write_text("new")
    assert not dead.exists() and not legacy.exists()
    assert fresh_legacy.exists() and live.exists() and other.exists()
    assert (out / "f").read_text() == "new"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.tmp-")
                and p not in (fresh_legacy, live)]


def test_output_moved_aside_by_a_killed_swap_is_restored(tmp_path):
    out = tmp_path / "q"
    aside = tmp_path / ".q.old-999999999-abc"
    (aside / "x").mkdir(parents=True)
    (aside / "x" / "f").write_text("previous")
    (tmp_path / ".q.tmp-999999999-def").mkdir()  # the new output, never renamed in
    assert remove_stale_scratch(out)
    assert (out / "f").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


_SIGTERM_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import bitpress.pipeline.checkpoint as so   # write_model_files writes config.json
    real = so.write_json
    def slow(path, obj, *a, **k):
        real(path, obj, *a, **k)
        if Path(path).name == "config.json":   # the final checkpoint's scratch folder
            Path(sys.argv[1]).write_text(str(Path(path).parent))
            time.sleep(120)
    so.write_json = slow
    from bitpress.cli import main
    sys.exit(main(["compress", sys.argv[2], "--out", sys.argv[3], "--method", "rtn",
                   "--group-size", "32"]))
""")


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_sigterm_while_saving_leaves_nothing(tiny_llama_dir, tmp_path):
    marker, out = tmp_path / "marker", tmp_path / "outs" / "q"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", _SIGTERM_SCRIPT, str(marker),
                          str(tiny_llama_dir), str(out)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not marker.exists():
            assert p.poll() is None, p.communicate()
            assert time.time() - t0 < 240, "the save never started"
            time.sleep(0.2)
        scratch = Path(marker.read_text())
        assert ".q.tmp-" in str(scratch) and scratch.exists()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    # no output and no scratch folder; only the resumable per-block work of the streamed
    # compression (`--resume` finishes it, `--force` starts over)
    assert [q.name for q in out.parent.iterdir()] in ([], [".q.partial"])


# ---- byte reproducibility of the writer ---------------------------------------------------
def test_safetensors_metadata_is_written_in_a_fixed_order(tmp_path):
    meta = {f"k{i}": str(i) for i in (5, 3, 9, 1, 7, 2)}
    t = {"b": torch.arange(6.0), "a": torch.ones(2, 3, dtype=torch.float16)}
    blobs = []
    for i in range(6):  # the safetensors library's own order is its hash map's
        save_safetensors(t, tmp_path / f"{i}.safetensors", metadata=dict(meta))
        blobs.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(set(blobs)) == 1
    n = int.from_bytes(blobs[0][:8], "little")
    header = json.loads(blobs[0][8:8 + n])
    assert list(header["__metadata__"]) == sorted(meta)
    from safetensors.torch import load_file
    got = load_file(str(tmp_path / "0.safetensors"))
    assert torch.equal(got["b"], t["b"]) and torch.equal(got["a"], t["a"])


def test_summary_size_excludes_the_summary(packed):
    s = json.loads((packed / "bitpress_summary.json").read_text())
    files = [f for f in packed.iterdir() if f.is_file() and f.name != "bitpress_summary.json"]
    assert s["size_on_disk_bytes"] == sum(f.stat().st_size for f in files)


# ---- messages -----------------------------------------------------------------------------
def _tiny_gguf(path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.arange(64 * 8, dtype=np.float32).reshape(64, 8))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_truncated_gguf_says_truncated(tmp_path, capsys):
    from bitpress.pipeline.source import _check_gguf

    full = tmp_path / "full.gguf"
    _tiny_gguf(full)
    _check_gguf(full)  # the complete file passes
    raw = full.read_bytes()
    for n in (len(raw) - 4, len(raw) // 2, 40, 10):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(raw[:n])
        assert main(["compress", str(cut), "--out", str(tmp_path / "q")]) == 2
        err = _err(capsys)
        assert "truncated" in err and "reshape" not in err


def test_missing_tokenizer_message(tiny_llama_dir, tmp_path, capsys):
    src = tmp_path / "notok"
    src.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, src / f.name)
    # RTN needs no tokenizer (data-free); evaluating the model does
    text = tmp_path / "t.txt"
    text.write_text("some text to score " * 50)
    assert main(["eval", str(src), "--text", str(text), "--seqlen", "16"]) == 2
    err = _err(capsys)
    assert "no tokenizer" in err and "sentencepiece" not in err


@pytest.mark.parametrize("content,msg", [(b"a" * 200_000 + b"\x00tail", "NUL byte at offset 200000"),
                                         (b"", "is empty"), (b" \n\t\n", "is empty"),
                                         (b"ok" * 100_000 + b"\xff\xfe", "not UTF-8")])
def test_text_check_reads_the_whole_file(packed, tmp_path, content, msg, capsys):
    t = tmp_path / "t.txt"
    t.write_bytes(content)
    assert main(["eval", str(packed), "--text", str(t), "--seqlen", "16"]) == 2
    assert msg in _err(capsys)


def test_text_that_is_a_directory(packed, tmp_path, capsys):
    assert main(["eval", str(packed), "--text", str(tmp_path)]) == 2
    assert "is a directory" in _err(capsys)
    assert main(["finetune", str(packed), "--text", str(tmp_path)]) == 2
    assert "is a directory" in _err(capsys)


def test_inspect_into_a_closed_pipe_is_quiet(packed):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "bitpress.cli", "inspect", str(packed)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # like `| head` that has already exited
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert p.returncode == 141


def test_few_calibration_tokens_warn(caplog):
    from bitpress.pipeline.calib import calibration_windows

    tok = make_tokenizer()
    text = TEXT[:2000]
    with caplog.at_level(logging.WARNING, logger="bitpress.pipeline.calib"):
        ids = calibration_windows(tok, text, 128, 64)
    assert ids.shape == (128, 64)
    assert any("windows overlap" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bitpress.pipeline.calib"):
        calibration_windows(tok, text, 2, 16)
    assert not caplog.records


# ---- more mistakes a new user makes -------------------------------------------------------
@pytest.mark.parametrize("argv,msg", [
    (["--bits", "5"], "bits"),
    (["--group-size", "100000"], "group size"),
    (["--group-size", "0"], "group size"),
    (["--sparsity", "1.5"], "sparsity"),
])
def test_bad_compress_options(tiny_llama_dir, tmp_path, argv, msg, capsys):
    assert main(["compress", str(tiny_llama_dir), "--out", str(tmp_path / "q"), *argv]) == 2
    assert msg in _err(capsys).lower()
    assert not (tmp_path / "q").exists()


def test_more_cli_mistakes(packed, tmp_path, calib_file, capsys):
    cases = [
        (["eval", str(packed), "--text", str(calib_file), "--batch-size", "0"], "--batch-size"),
        (["generate", str(packed), "--prompt", ""], "prompt is empty"),
        (["inspect", str(tmp_path / "nope")], "does not exist"),
        (["inspect", str(calib_file)], "is a file"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        assert msg in _err(capsys), argv


def test_os_errors_during_a_write_are_one_line(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """A full disk (or any refusal by the system) while saving: one error line, exit 2, and
    the scratch folder removed."""
    import errno

    import bitpress.pipeline.streamout as so

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(so, "write_json", full)
    out = tmp_path / "q"
    assert main(["compress", str(tiny_llama_dir), "--out", str(out), *RTN]) == 2
    assert "No space left on device" in _err(capsys)
    # the scratch folder is gone; at most the resumable streamed work is left
    assert [q.name for q in tmp_path.iterdir()] in ([], [".q.partial"])


def test_unwritable_location_is_reported_before_loading(tiny_llama_dir, tmp_path, monkeypatch,
                                                       capsys):
    """The read-only case as root sees it too: the probe folder cannot be created (here
    simulated, since permission bits do not stop root), so nothing is loaded."""
    import errno
    import tempfile

    import bitpress.pipeline.compress as comp

    def boom(*a, **k):
        raise AssertionError("the source was opened before the output was checked")
    real = tempfile.mkdtemp

    def refuse(*a, **k):
        if str(k.get("prefix", "")).startswith(".bitpress-probe"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*a, **k)
    monkeypatch.setattr(comp, "_open", boom)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    assert main(["compress", str(tiny_llama_dir), "--out", str(tmp_path / "ro" / "q"), *RTN]) == 2
    err = _err(capsys)
    assert "not writable" in err and "Permission denied" in err
