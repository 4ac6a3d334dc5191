"""SASS of the Triton GEMV compiled for sm_90 (``triton.compile`` needs no GPU): every packed
word, x element and (scale, zero) of a tile is requested from global memory exactly once
(design defect 1: the old kernel requested each word once per code, 8x for W4), and no
local-memory traffic. Compiled in a subprocess so that the interpreter mode of the other
Triton tests (TRITON_INTERPRET=1) does not leak in."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, re, subprocess, sys, pathlib, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bitpress.kernels.triton import kernels as K
cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
out = []
for bits, bkw, bn, nw in json.loads(sys.argv[1]):
    pf = 32 // bits
    sig = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16",
           "b_ptr": "*fp16", "y_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32", "KW": "i32",
           "GS": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    const = dict(BITS=bits, PF=pf, PF_PAD=triton.next_power_of_2(pf), BLOCK_M=1, BLOCK_N=bn,
                 BLOCK_KW=bkw, SPLIT_K=1, GROUP_TILE=True, HAS_BIAS=False)
    sig.update({k: "constexpr" for k in const})
    ck = triton.compile(ASTSource(fn=K.dense_gemv_kernel, signature=sig, constexprs=const),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": nw, "num_stages": 1})
    path = pathlib.Path(sys.argv[2]) / f"w{bits}.cubin"
    path.write_bytes(ck.asm["cubin"])
    sass = subprocess.run([str(cuobjdump), "-sass", str(path)], capture_output=True, text=True).stdout
    out.append({"bits": bits, "bkw": bkw, "bn": bn, "warps": nw,
                "ops": re.findall(r"\b((?:LDG|LDL|STL|LDGSTS)[A-Z0-9._]*)", sass)})
print("JSON" + json.dumps(out))
'''


def _width(op: str) -> int:
    for suf, w in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if op.endswith(suf):
            return w
    return 4


def test_gemv_requests_each_byte_once(tmp_path):
    # the heuristic config for N >= 4096, batch 1: 128 outputs x 128 codes, 4 warps
    cfgs = [[bits, 128 // (32 // bits), 128, 4] for bits in (2, 4)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    p = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cfgs), str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for res in json.loads(p.stdout.split("JSON", 1)[1]):
        bits, bkw, bn, warps, ops = (res["bits"], res["bkw"], res["bn"], res["warps"],
                                     res["ops"])
        pf = 32 // bits
        assert not any(o.startswith(("LDL", "STL")) for o in ops), ops
        requested = sum(_width(o) for o in ops if o.startswith("LDG")) * 32 * warps
        # one K step of the loop (num_stages=1: the loop body holds each load once)
        distinct = bkw * bn * 4 + (bkw * pf) * 2 + 2 * bn * 2   # words + x + s, z (fp16)
        assert requested == distinct, (bits, requested, distinct, ops)
