"""Which MatMulNBits configurations onnxruntime's CPU kernel accepts, and what one GEMV costs
in each (issue 31): bits 2/3/4/8 x zero points (none / uint8 / float) x accuracy_level 0/4,
on a SmolLM2-sized 576 -> 1536 linear, batch 1, one thread, random codes.

    .venv/bin/python bench/onnx_matmulnbits.py --out bench/results/onnx/matmulnbits_gemv.json
"""
from __future__ import annotations

import argparse

import numpy as np

from _common import median_time, write_json


def session(bits, bs, k, n, zp_kind, acc):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nb = (k + bs - 1) // bs
    blob = bs * bits // 8
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, nb, blob)).astype(np.uint8), "B"),
             numpy_helper.from_array((rng.random((n, nb)) + 0.1).astype(np.float32), "S")]
    ins = ["A", "B", "S"]
    if zp_kind == "float":
        inits.append(numpy_helper.from_array((rng.random((n, nb)) * 2 ** bits)
                                             .astype(np.float32), "Z"))
        ins.append("Z")
    elif zp_kind == "uint8":
        inits.append(numpy_helper.from_array(
            rng.integers(0, 256, (n, (nb * bits + 7) // 8)).astype(np.uint8), "Z"))
        ins.append("Z")
    node = helper.make_node("MatMulNBits", ins, ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=bs, accuracy_level=acc)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT,
                                                                      [None, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21),
                                            helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 4
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/onnx/matmulnbits_gemv.json")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    import onnxruntime as ort

    k, n = 576, 1536
    rows = []
    for bits in (2, 3, 4, 8):
        for bs in (64, 128):
            for zp in ("none", "uint8", "float"):
                for acc in (0, 4):
                    r = {"bits": bits, "block_size": bs, "zero_points": zp,
                         "accuracy_level": acc}
                    try:
                        s = session(bits, bs, k, n, zp, acc)
                    except Exception as e:  # noqa: BLE001 - recorded: what the kernel refuses
                        r["refused"] = str(e).split("was false.")[-1].strip()[:200]
                        rows.append(r)
                        continue
                    a = np.random.default_rng(1).random((1, k)).astype(np.float32)
                    us = median_time(lambda: s.run(None, {"A": a}), args.reps, rounds=1) * 1e6
                    r["us_per_gemv"] = round(us, 1)
                    rows.append(r)
                    print(r, flush=True)
    write_json(args.out, {"onnxruntime": ort.__version__, "K": k, "N": n, "threads": 1,
                          "machine_note": "shared 2-core machine under load: indicative",
                          "rows": rows}, indent=2)


if __name__ == "__main__":
    main()
