"""Decode-benchmark peers: a ``bitpress export --format onnx`` directory in ONNX Runtime
(CPU execution provider, MatMulNBits) and a ``--format openvino`` directory in OpenVINO's
CPU plugin, timed like ``bench/decode.py`` times bitpress (batch 1, KV cache, greedy, a fixed
number of new tokens; decode tokens/s counts the steps after the first new token, which the
prefill makes).

    from _onnx_peer import time_onnxruntime, time_openvino
    r = time_onnxruntime("/tmp/smol-w4-onnx", prompt_ids, 128, threads=1)
    # {"prefill_tok_s", "decode_tok_s", "ids", "rss", ...}

Each call builds its own session (a first untimed warm-up generation of 4 tokens is run so
that one-time kernel preparation is not counted). ``rss`` is the process's resident set
size after the timed generation, in bytes (the whole process: it includes whatever else the
caller has loaded).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bitpress.integrations.onnx_runtime import ExportedDecoder  # noqa: E402


def _rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _time(backend: str, model_dir: str, prompt_ids: Sequence[int], n_new: int, threads: int,
          exact: bool = True) -> dict[str, Any]:
    dec = ExportedDecoder(model_dir, backend=backend, threads=threads, exact=exact)
    dec.generate(list(prompt_ids), 4)  # warm-up (kernel preparation, first allocations)
    r = dec.generate(list(prompt_ids), n_new)
    n_dec = len(r["ids"]) - 1
    return {"runtime": backend, "threads": threads, "exact": exact,
            "prefill_tok_s": r["prompt_tokens"] / r["prefill_s"],
            "decode_tok_s": n_dec / r["decode_s"] if n_dec > 0 and r["decode_s"] > 0 else None,
            "prefill_s": r["prefill_s"], "decode_s": r["decode_s"], "ids": r["ids"],
            "rss": _rss()}


def time_onnxruntime(model_dir: str, prompt_ids: Sequence[int], n_new: int,
                     threads: int = 1) -> dict[str, Any]:
    """ONNX Runtime CPU EP on a ``--format onnx`` directory (float32, exact)."""
    return _time("onnxruntime", model_dir, prompt_ids, n_new, threads)


def time_openvino(model_dir: str, prompt_ids: Sequence[int], n_new: int, threads: int = 1,
                  exact: bool = True) -> dict[str, Any]:
    """OpenVINO CPU plugin on a ``--format openvino`` directory. ``exact`` (default) pins
    f32 inference precision and turns dynamic activation quantization off; ``exact=False``
    leaves OpenVINO's CPU defaults (bf16 / int8 activations where the CPU has them)."""
    return _time("openvino", model_dir, prompt_ids, n_new, threads, exact)
