"""Peak memory and wall time of `bitpress compress` on a checkpoint larger than RAM.

Runs the CLI as a child process, samples the child's /proc/PID/status (VmRSS, VmHWM) every
0.2 s, records when each output part appears (blocks are written as they finish), and
writes bench/results/scale/NAME.json. Example (the measurements in docs/scale.md):

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/synth_ckpt.py SYNTH/llama2-13b-synth
    PYTHONPATH=. python bench/scale.py SYNTH/llama2-13b-synth --name rtn_13b -- \
        --method rtn --bits 4 --group-size 128
    PYTHONPATH=. python bench/scale.py SYNTH/llama2-13b-synth --name gptq_13b_2blocks -- \
        --method gptq --bits 4 --group-size 128 --blocks 0:2 --nsamples 16 --seqlen 512

    # 2 processes (gloo) against 1 on a small model, same arguments:
    PYTHONPATH=. python bench/scale.py SRC --name dist2 --nproc 2 -- --method gptq ...

Everything after ``--`` goes to `bitpress compress` (``--out`` is added). The output is
deleted afterwards unless --keep. SYNTH: any scratch folder with room for the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import cpu_model
from bitpress.pipeline.memory import proc_status as _status

HERE = Path(__file__).resolve().parent


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def machine() -> dict:
    cpu = cpu_model()
    mem = 0
    try:
        mem = int(next(line.split()[1] for line in open("/proc/meminfo")
                       if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_total_bytes": mem,
            "platform": platform.platform(), "loadavg_start": os.getloadavg()}


def run(src: str, out: Path, args: list[str], nproc: int = 1, threads: int = 1,
        on_tick=None, stop_after_parts: int = 0) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    base = [sys.executable]
    if nproc > 1:
        base += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        base += ["-m", "bitpress.cli"]
    else:
        base += ["-m", "bitpress.cli"]
    cmd = base + ["compress", src, "--out", str(out)] + args
    partial = out.parent / f".{out.name}.partial"
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=str(HERE.parent))
    peak: dict[int, int] = {}
    timeline, parts = [], {}
    last_tick = t0
    stopped = None
    while p.poll() is None:
        if on_tick is not None and time.time() - last_tick > 30:
            last_tick = time.time()
            on_tick({"cmd": [("SRC" if c == src else "OUT" if c == str(out) else c)
                             for c in cmd[1:]], "rc": None, "partial": True,
                     "wall_seconds_so_far": round(time.time() - t0, 1),
                     "peak_rss_bytes_max": max(peak.values(), default=0),
                     "parts_first_seen_seconds": dict(sorted(parts.items())),
                     "rss_timeline": timeline[::max(1, len(timeline) // 300)]})
        rss = 0
        for pid in _tree(p.pid):
            st = _status(pid)
            if st:
                peak[pid] = max(peak.get(pid, 0), st.get("VmHWM", 0))
                rss += st.get("VmRSS", 0)
        timeline.append([round(time.time() - t0, 1), rss])
        if partial.exists():
            for f in partial.glob("block-*.safetensors"):
                parts.setdefault(f.name, round(time.time() - t0, 1))
        if stop_after_parts and len(parts) >= stop_after_parts and stopped is None:
            stopped = round(time.time() - t0, 1)  # e.g. the disk cannot hold the whole output
            p.terminate()
        time.sleep(0.2)
    stdout, stderr = p.communicate()
    wall = time.time() - t0
    summary = None
    try:
        summary = json.loads(stdout)
    except ValueError:
        pass
    # keep the timeline short: at most ~300 points
    step = max(1, len(timeline) // 300)
    shown = [("SRC" if c == src else "OUT" if c == str(out) else c) for c in cmd[1:]]
    return {"cmd": shown, "nproc": nproc, "threads_per_process": threads, "rc": p.returncode,
            "wall_seconds": round(wall, 1),
            "peak_rss_bytes_per_process": sorted(peak.values(), reverse=True)[:nproc + 1],
            "peak_rss_bytes_max": max(peak.values(), default=0),
            "parts_first_seen_seconds": dict(sorted(parts.items())),
            "out_bytes": _dir_bytes(out), "summary": summary,
            "stopped_after_parts": stop_after_parts or None, "stopped_at_seconds": stopped,
            "rss_timeline": timeline[::step], "stderr_tail": stderr[-3000:]}


def main() -> int:
    argv = sys.argv[1:]
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("--name", required=True)
    ap.add_argument("--work", default=None, help="where outputs go (default: beside src)")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    ap.add_argument("--compare-single", action="store_true",
                    help="with --nproc > 1: also run 1 process and compare the outputs")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--stop-after-parts", type=int, default=0,
                    help="stop the run (SIGTERM) once this many block parts are written, e.g. "
                         "when the disk cannot hold the whole output; the partial output is "
                         "deleted unless --keep")
    a = ap.parse_args(argv)
    src = Path(a.src)
    work = Path(a.work) if a.work else src.parent
    rec = {"name": a.name, "machine": machine(), "source": src.name,
           "source_bytes": _dir_bytes(src) if src.is_dir() else src.stat().st_size,
           "compress_args": rest,
           "note": "shared machine: 2 cores used by several agents at once; wall times are "
                   "upper bounds"}
    outs = []
    dest = HERE / "results" / "scale"
    dest.mkdir(parents=True, exist_ok=True)
    runs = [(a.nproc, a.threads)]
    if a.compare_single and a.nproc > 1:
        runs.append((1, a.threads))
    for nproc, threads in runs:
        out = work / f"{a.name}-np{nproc}.out"
        shutil.rmtree(out, ignore_errors=True)
        def tick(partial, rec=rec):
            (dest / f"{a.name}.json").write_text(json.dumps(
                dict(rec, runs=rec.get("runs", []) + [partial]), indent=1) + "\n")

        r = run(str(src), out, rest, nproc, threads, on_tick=tick,
                stop_after_parts=a.stop_after_parts)
        rec.setdefault("runs", []).append(r)
        outs.append(out)
        print(json.dumps({k: v for k, v in r.items() if k not in ("rss_timeline", "summary",
                                                                   "stderr_tail")}), flush=True)
        if r["rc"] != 0:
            print(r["stderr_tail"], file=sys.stderr)
    if len(outs) == 2:
        same = {}
        for f in sorted(outs[1].iterdir()):
            if f.name == "bitpress_summary.json":
                continue
            g = outs[0] / f.name
            same[f.name] = g.exists() and g.read_bytes() == f.read_bytes()
        rec["files_identical_to_single_process"] = same
    rec["machine"]["loadavg_end"] = os.getloadavg()
    (dest / f"{a.name}.json").write_text(json.dumps(rec, indent=1) + "\n")
    if not a.keep:
        for o, r in zip(outs, rec["runs"]):
            shutil.rmtree(o, ignore_errors=True)
            if r["stopped_at_seconds"]:  # (a failed run keeps its partial for --resume)
                shutil.rmtree(o.parent / f".{o.name}.partial", ignore_errors=True)
    return 0 if all(r["rc"] == 0 or r["stopped_at_seconds"] for r in rec["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
