"""Perplexity of bitpress checkpoints in each CPU kernel mode: what ``generate`` computes in
that mode (``bitpress eval --kernel-mode MODE``; ``exact`` = the default, with the exact GEMM
path for long windows). One ``bitpress eval`` process per (checkpoint, mode), ``--jobs`` at a
time, one thread each; rows are appended to the JSON as they finish (``--resume`` skips rows
already there).

    .venv/bin/python bench/mode_ppl.py NAME=CKPT [NAME=CKPT ...] --jobs 2 \
        --out bench/results/decode/modes_ppl.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from _common import cpu_model, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
WIKI = os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2", "test.txt")


def _rel(path: str) -> str:
    """A path as the JSON records it: relative to the repository root (no machine paths)."""
    return os.path.relpath(os.path.abspath(path), os.path.join(HERE, ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpts", nargs="+", metavar="NAME=DIR")
    ap.add_argument("--modes", default="exact,int8")
    ap.add_argument("--text", default=WIKI)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "decode", "modes_ppl.json"))
    args = ap.parse_args()
    rows = []
    if args.resume and os.path.exists(args.out):
        rows = json.load(open(args.out))["rows"]
    done = {(r["name"], r["mode"]) for r in rows}
    jobs = []
    for spec in args.ckpts:
        name, _, path = spec.partition("=")
        for mode in args.modes.split(","):
            if (name, mode) not in done:
                jobs.append((name, path, mode))

    def run(job):
        name, path, mode = job
        cmd = [sys.executable, "-m", "bitpress.cli", "eval", path, "--text", args.text,
               "--seqlen", str(args.seqlen), "--windows", str(args.windows)]
        if mode != "exact":
            cmd += ["--kernel-mode", mode]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env,
                           cwd=os.path.join(HERE, ".."))
        if p.returncode != 0:
            raise SystemExit(f"{name} {mode}: {p.stderr.strip()[-2000:]}")
        res = json.loads(p.stdout.strip().splitlines()[-1])
        res["text"] = _rel(res.get("text", args.text))
        return {"name": name, "checkpoint": path, "mode": mode, **res}

    with ThreadPoolExecutor(max(1, args.jobs)) as ex:
        for r in ex.map(run, jobs):
            rows.append(r)
            print(f"{r['name']:<24} {r['mode']:<6} ppl {r['perplexity']:.3f}  ({r['kernel_mode']})",
                  flush=True)
            meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"),
                    "cpu": cpu_model(), "text": _rel(args.text), "seqlen": args.seqlen,
                    "windows": args.windows, "command": "bench/mode_ppl.py " + " ".join(sys.argv[1:])}
            write_json(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
