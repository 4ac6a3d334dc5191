"""Which kernels are active is reported (``bitpress inspect`` / ``generate``, JSON and a human
line), and ``BITPRESS_REQUIRE_NATIVE=1`` turns the pure-torch fallback into an error at the first
packed call. The fallback is simulated by making the loader of ``bitpress._C`` fail."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bitpress.cli import main
from bitpress.formats import quantize_rtn
from bitpress.kernels import native, ops
from bitpress.nn import Recipe
from bitpress.pipeline.compress import compress

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_native(monkeypatch):
    """The loader of bitpress._C fails as on a machine where it was never built."""
    def fail():
        raise ImportError("simulated: no bitpress._C")

    monkeypatch.setattr(native, "_import", fail)
    monkeypatch.setattr(native, "_built_files", lambda: [])
    for op in ("dense_qmm", "sparse_qmm"):  # kernels/cpu.py never registered its kernels
        monkeypatch.setitem(ops._REGISTRY, (op, "cpu"), [])
    native._module.cache_clear()
    yield
    monkeypatch.undo()
    native._module.cache_clear()
    assert native._module() is not None or not native._built_files()


@pytest.fixture(scope="module")
def packed(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("native") / "q"
    compress(tiny_llama_dir, out, Recipe(bits=4, group_size=32), progress=False)
    return out


def test_status_names_the_isa_the_dispatcher_chose():
    if not native.available():
        pytest.skip("bitpress._C not built here")
    from bitpress.kernels import cpu

    st = native.status()
    assert st["native"] is True and st["decode_engine"] is True
    assert st["isa"] == cpu.get_isa() and st["isa"] in st["isas"] and "scalar" in st["isas"]
    assert Path(st["extension"]).name.startswith("_C")
    assert f"ISA {st['isa']}" in native.describe() and native.reason() is None
    prev = cpu.get_isa()
    try:  # a forced ISA is what is reported
        cpu.set_isa("scalar")
        assert native.status()["isa"] == "scalar"
    finally:
        cpu.set_isa("auto")
    assert cpu.get_isa() == prev


def test_fallback_reported_and_required(no_native, monkeypatch):
    st = native.status()
    assert st["native"] is False and "not built" in st["reason"]
    assert st["summary"].startswith("pure-torch fallback: no compiled extension")
    assert "C++ compiler" in st["fix"] and "Fix:" in native.describe(st)
    with pytest.raises(native.NativeKernelsMissing, match="compiled CPU kernels.*not built"):
        native.require("decoding")
    monkeypatch.delenv(native.REQUIRE_ENV, raising=False)
    native.require_if_asked()  # not asked: the fallback is allowed
    monkeypatch.setenv(native.REQUIRE_ENV, "1")
    with pytest.raises(native.NativeKernelsMissing, match=native.REQUIRE_ENV):
        native.require_if_asked()


def test_first_fallback_call_raises_when_required(no_native, monkeypatch):
    """Without the extension a CPU call falls back to the reference (a warning with the
    reason); with BITPRESS_REQUIRE_NATIVE=1 that first call raises instead."""
    torch.manual_seed(0)
    qw = quantize_rtn(torch.randn(24, 64), bits=4, group_size=32)
    p = qw.pack_dense(torch.float32)
    x = torch.randn(3, 64)
    args = (x, p["qweight"], p["scales"], p["zeros"], None, 4, 32, 64)
    monkeypatch.setenv(native.REQUIRE_ENV, "1")
    with pytest.raises(native.NativeKernelsMissing, match="bitpress::dense_qmm on cpu"):
        ops.dense_qmm(*args)
    monkeypatch.setenv(native.REQUIRE_ENV, "0")
    ops._WARNED.discard(("dense_qmm", "cpu"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y = ops.dense_qmm(*args)
    assert any("no compiled extension" in str(m.message) for m in w), [str(m.message) for m in w]
    torch.testing.assert_close(y, x @ qw.dequantize().T, rtol=1e-4, atol=1e-4)


def test_inspect_reports_kernels(packed, capsys, no_native):
    assert main(["inspect", str(packed), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["kernels"]["native"] is False and "reason" in rep["kernels"]
    assert main(["inspect", str(packed)]) == 0
    assert "kernels      pure-torch fallback" in capsys.readouterr().out


def test_inspect_and_generate_report_native(packed, capsys):
    if not native.available():
        pytest.skip("bitpress._C not built here")
    assert main(["inspect", str(packed), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["kernels"]["native"] is True and rep["kernels"]["isa"] == native.status()["isa"]
    assert main(["generate", str(packed), "--prompt", "The quick", "--max-new-tokens", "3"]) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert res["kernels"]["native"] is True and res["decode_path"].startswith("bitpress engine")
    assert f"bitpress: kernels: native C++ kernels (bitpress._C), ISA {rep['kernels']['isa']}" \
        in cap.err


_SCRIPT = r"""
import json, os, sys
sys.modules["bitpress._C"] = None  # as if never built: the import fails
from bitpress.cli import main
ckpt = sys.argv[1]
rc = main(["generate", ckpt, "--prompt", "The quick", "--max-new-tokens", "3"])
print("RC", rc, flush=True)
rc = main(["generate", ckpt, "--prompt", "The quick", "--max-new-tokens", "3",
           "--kernel-mode", "int8"])
print("RC", rc, flush=True)
os.environ["BITPRESS_REQUIRE_NATIVE"] = "1"
rc = main(["generate", ckpt, "--prompt", "The quick", "--max-new-tokens", "3"])
print("RC", rc, flush=True)
"""


def test_generate_without_the_extension(packed):
    """A real absence (the import of bitpress._C fails in a fresh process, so the CPU kernels
    never register): generate runs on the reference, says so in its JSON and on stderr; an
    explicit --kernel-mode and BITPRESS_REQUIRE_NATIVE=1 are errors, not silent fallbacks."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(native.REQUIRE_ENV, None)
    p = subprocess.run([sys.executable, "-c", _SCRIPT, str(packed)], capture_output=True,
                       text=True, env=env, timeout=300, cwd=ROOT)
    lines = p.stdout.splitlines()
    assert p.returncode == 0, p.stderr[-3000:]
    assert [ln for ln in lines if ln.startswith("RC")] == ["RC 0", "RC 2", "RC 2"], p.stdout
    res = json.loads(lines[0])
    assert res["kernels"]["native"] is False and res["new_tokens"] <= 3
    assert res["decode_path"].startswith("transformers generate") and "reference" in \
        res["decode_path"]
    assert "bitpress: kernels: pure-torch fallback" in p.stderr
    assert "bitpress: error: kernel mode 'int8' selects a compiled CPU kernel" in p.stderr
    assert ("bitpress: error: the decode engine (BITPRESS_REQUIRE_NATIVE=1) needs bitpress's "
            "compiled CPU kernels") in p.stderr
