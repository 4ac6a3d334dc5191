"""The package's layout keeps DESIGN's rules: imports point one way (formats <- kernels <- nn
<- pipeline <- cli; the passes quant/sparse/cache use formats and nn, never kernels or the
pipeline), no module grows past ~600 lines unless listed below with its reason, and the
pipeline's architecture table names the sibling projections its own probe finds."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

PKG = Path(__file__).resolve().parents[1] / "bitpress"

#: modules allowed over MAX_LINES, each with the reason it is still one piece
LONG_MODULES = {
    "quant/decoupleq.py": "the decoupleQ layer solver; issue 30 item 4 shares its GPTQ "
                          "feedback loop and clipping search with gptq.py, which shortens it",
}
MAX_LINES = 600


def _imports(path: Path) -> set[str]:
    """Top-level ``bitpress`` subpackages/modules that ``path`` imports (lazy imports inside
    functions included), relative imports resolved."""
    rel = path.relative_to(PKG.parent).with_suffix("").parts
    pkg = list(rel if path.name == "__init__.py" else rel[:-1])
    if path.name == "__init__.py":
        pkg = pkg[:-1] if pkg[-1] == "__init__" else pkg
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(pkg[:len(pkg) - node.level + 1])
                names = ([f"{base}.{node.module}"] if node.module
                         else [f"{base}.{a.name}" for a in node.names])
            else:
                names = [node.module or ""]
        else:
            continue
        out |= {n.split(".")[1] for n in names if n.startswith("bitpress.") and n.count(".")}
    return out


def _package_imports(sub: str) -> dict[str, set[str]]:
    """File (relative to bitpress/) -> the other top-level parts of bitpress it imports."""
    return {str(f.relative_to(PKG)): _imports(f) - {sub}
            for f in sorted((PKG / sub).rglob("*.py"))}


def test_import_resolution_sees_relative_and_lazy_imports(tmp_path):
    # the checker itself: a relative import inside a function counts
    got = _imports(PKG / "pipeline" / "compress.py")
    assert {"quant", "sparse", "formats", "nn"} <= got


#: what each part may import besides itself and the leaves ``errors`` and ``deps`` (the
#: optional-dependency table) (DESIGN, section 2); cache's weight quantizer uses quant's
#: clipping search (one of each)
ALLOWED = {
    "formats": set(),
    "kernels": {"formats", "_C"},
    "nn": {"formats", "kernels"},
    "quant": {"formats", "nn"},
    "sparse": {"formats", "nn", "quant"},
    "cache": {"formats", "nn", "quant"},
}


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_point_one_way(part):
    """Passes (quant, sparse, cache) import neither kernels nor the pipeline; sparse may use
    quant's solvers, not the reverse; formats, kernels and nn never import what sits above."""
    bad = {f: sorted(imp - ALLOWED[part] - {"errors", "deps"})
           for f, imp in _package_imports(part).items()}
    bad = {f: v for f, v in bad.items() if v}
    assert not bad, f"imports against DESIGN's directions: {bad}"


def test_passes_never_import_kernels_or_pipeline():
    for part in ("quant", "sparse", "cache"):
        for f, imp in _package_imports(part).items():
            assert not imp & {"kernels", "pipeline", "runtime", "cli"}, (f, imp)


def test_no_module_over_the_limit_unless_listed():
    long = {}
    for f in sorted(PKG.rglob("*.py")):
        n = sum(1 for _ in f.open(encoding="utf-8"))
        rel = str(f.relative_to(PKG))
        if n > MAX_LINES and rel not in LONG_MODULES:
            long[rel] = n
    assert not long, (f"modules over {MAX_LINES} lines: {long}; split them by purpose or list "
                      f"them in LONG_MODULES with the reason")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_architecture_table_names_the_groups_the_probe_finds(arch):
    """``pipeline.arch.fused_projections`` (what ``nn.fuse`` fuses) equals the sibling
    linears that the pipeline's probe (``sequential_groups``) finds reading one input."""
    from transformers import AutoModelForCausalLM

    from bitpress.pipeline.arch import fused_projections
    from bitpress.pipeline.capture import sequential_groups
    from bitpress.pipeline.skeleton import block_linears, find_blocks

    from conftest import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    _, blocks = find_blocks(model)
    block = blocks[0]
    ids = torch.randint(0, 512, (1, 8))
    groups = sequential_groups(block, list(block_linears(block)),
                               lambda: model(input_ids=ids, use_cache=False))
    found = {tuple(n.rsplit(".", 1)[-1] for n in g) for g in groups if len(g) > 1}
    assert found == set(fused_projections(model)), (arch, groups)
