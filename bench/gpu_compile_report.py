"""ptxas report of every tensor-core entry point (no GPU needed): registers, spills, stack,
shared memory, compiled with nvcc for one architecture, as JSON.

    python bench/gpu_compile_report.py [--arch sm_90a] [--out bench/results/gpu/ptxas_sm90a.json]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile

from _common import write_json
from bitpress.kernels import cuda_mma


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("nvcc not found")
    entries = [(k, b, x, s, nt) for k in ("dense", "sparse") for b in (2, 3, 4) for x in (0, 1)
               for s in (0, 1) for nt in (1, 2, 4, 8)]
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.cu")
        with open(src, "w") as f:
            f.write(f'#define BITPRESS_QMMA_ONLY\n#include "{cuda_mma.source_path()}"\n')
            for k, b, x, s, nt in entries:
                f.write(f"{'BP_SPARSE' if k == 'sparse' else 'BP_DENSE'}({b}, {x}, {s}, {nt})\n")
        p = subprocess.run([nvcc, "-std=c++17", f"-arch={a.arch}", "-cubin", "-O3", "-Xptxas",
                            "-v", "-o", os.path.join(d, "k.cubin"), src],
                           capture_output=True, text=True, check=True)
    log = p.stdout + p.stderr
    rows = []
    for name, body in re.findall(r"Compiling entry function '(\w+)'(.*?)(?=Compiling entry|\Z)",
                                 log, re.S):
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", body)
        r = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", body)
        rows.append({"entry": name, "registers": int(r[1]), "smem_bytes": int(r[2]),
                     "stack_bytes": int(m[1]), "spill_store_bytes": int(m[2]),
                     "spill_load_bytes": int(m[3])})
    rows.sort(key=lambda r: r["entry"])
    for r in rows:
        print(f"{r['entry']:40s} regs {r['registers']:3d}  smem {r['smem_bytes']:6d}  "
              f"spills {r['spill_store_bytes']}/{r['spill_load_bytes']}")
    out = a.out or f"bench/results/gpu/ptxas_{a.arch}.json"
    nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True,
                                  text=True).stdout.splitlines()[-1]
    write_json(out, {"arch": a.arch, "nvcc": nvcc_version, "entries": rows})
    print(f"{len(rows)} entry points, {sum(r['spill_store_bytes'] > 0 for r in rows)} spilling;"
          f" wrote {out}")


if __name__ == "__main__":
    main()
