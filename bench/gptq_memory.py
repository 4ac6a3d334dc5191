"""Peak memory of GPTQ's Hessian preparation (and optionally the whole layer solve) on one
large layer, e.g. Llama-2-13B's ``down_proj`` (5120 × 13824).

Each stage runs after the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``
← 5), so its figure is the stage's own peak above the resident set it started from:

* ``prepare_hessian``: ``bitpress.quant.gptq.prepare_hessian(H)`` (damped inverse Cholesky);
* ``gptq`` (``--full``): the whole pass ``gptq(W, H, W4 g128)``;
* ``error_report``: the pipeline's H-weighted error report (``_hessian_rel_error``).

``--src DIR`` measures another copy of bitpress (e.g. the commit before a change, exported
with ``git archive``), so before/after figures come from the same script::

    git archive b6423d2 bitpress | tar -x -C /tmp/bp_before
    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/gptq_memory.py --label before --src /tmp/bp_before
    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/gptq_memory.py --label after

Results are appended to bench/results/scale/gptq_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _memory_helpers():
    """bitpress.pipeline.memory of this checkout, loaded by file path: the child may import
    another bitpress (``--src``) and must measure it with the same helpers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_bp_memory", HERE.parent / "bitpress" / "pipeline" / "memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_mem = _memory_helpers()
_status, _reset_peak = _mem.proc_status, _mem.reset_peak_rss


def child(a) -> dict:
    sys.path[:] = [q for q in sys.path if os.path.abspath(q or ".") != str(HERE)]
    if a.src:
        sys.path.insert(0, a.src)
    import importlib

    import torch

    torch.set_num_threads(1)
    from bitpress.pipeline.stream import _return_big_frees_to_os

    _return_big_frees_to_os()  # as the streamed pipeline does: large buffers are mmap-ed
    g = importlib.import_module("bitpress.quant.gptq")
    from bitpress.quant import QuantSpec

    torch.manual_seed(0)
    n, out = a.inputs, a.outputs
    # a Hessian-like matrix: XᵀX/m of m tokens with log-normal channel scales (rank m < n is
    # fine: the damping makes it positive definite)
    X = torch.randn(a.tokens, n) * torch.exp(0.5 * torch.randn(n))
    H = (X.T @ X) / a.tokens
    del X
    W = torch.randn(out, n) * 0.02
    rec = {"bitpress": g.__file__, "n_in": n, "n_out": out, "tokens": a.tokens,
           "float64_nxn_bytes": 8 * n * n, "float32_nxn_bytes": 4 * n * n,
           "clear_refs": _reset_peak(), "stages": {}}

    def stage(name, fn):
        _reset_peak()
        st0 = _status()
        t = time.time()
        res = fn()
        st1 = _status()
        rec["stages"][name] = {"rss_before_bytes": st0["VmRSS"], "peak_bytes": st1["VmHWM"],
                               "peak_above_start_bytes": st1["VmHWM"] - st0["VmRSS"],
                               "seconds": round(time.time() - t, 1)}
        print(name, json.dumps(rec["stages"][name]), file=sys.stderr, flush=True)
        return res

    f = stage("prepare_hessian", lambda: g.prepare_hessian(H))
    del f
    if a.full:
        qw = stage("gptq", lambda: g.gptq(W, H, QuantSpec(bits=4, group_size=128)))
        What = qw.dequantize()
        del qw
    else:
        What = W + 1e-3 * torch.randn_like(W)
    from bitpress.pipeline.stream import _hessian_rel_error

    rec["rel_error"] = stage("error_report", lambda: _hessian_rel_error(W, What, H))
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True, help="e.g. before / after")
    ap.add_argument("--src", default=None, help="directory holding the bitpress package to "
                    "measure (default: this checkout)")
    ap.add_argument("--inputs", type=int, default=13824)
    ap.add_argument("--outputs", type=int, default=5120)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--full", action="store_true", help="also run the whole gptq() pass")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=str(HERE / "results" / "scale" / "gptq_memory.json"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--child", "--label", a.label, "--inputs", str(a.inputs),
           "--outputs", str(a.outputs), "--tokens", str(a.tokens)]
    cmd += ["--src", a.src] if a.src else []
    cmd += ["--full"] if a.full else []
    t0 = time.time()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=str(HERE.parent))
    if p.returncode != 0:
        return p.returncode
    rec = json.loads(p.stdout)
    rec.update(label=a.label, src=a.src or "this checkout", wall_seconds=round(time.time() - t0, 1),
               loadavg=os.getloadavg(), cpu_threads=1,
               note="shared 2-core machine under load from other jobs: seconds are upper bounds")
    path = Path(a.result)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append(rec)
    path.write_text(json.dumps(runs, indent=1) + "\n")
    print(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
