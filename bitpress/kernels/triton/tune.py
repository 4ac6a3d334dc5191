"""Launch configurations for the Triton kernels: heuristics, and autotuning whose winners are
cached on disk per GPU model (and Triton version), so only the first run on a new card pays
for tuning and later start-ups read a small JSON file.

* ``BITPRESS_TRITON_TUNE=0`` turns tuning off (heuristic configs only).
* ``BITPRESS_TRITON_CACHE=DIR`` moves the cache (default ``~/.cache/bitpress/triton``).

Tuning keys are ``kernel|bits|gs|N|K|M-bucket|dtype``; M is bucketed to a power of two so
a decode loop with growing batch does not retune every step. Under the interpreter (CPU
tensors) nothing is tuned.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import threading
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

Config = dict
_lock = threading.Lock()
_tables: dict[str, dict[str, Config]] = {}
_picked: dict[tuple, Config] = {}   # (key, device index) -> config, this process


def tuning_enabled() -> bool:
    return os.environ.get("BITPRESS_TRITON_TUNE", "1") not in ("0", "false", "no")


def m_bucket(m: int) -> int:
    return 1 if m <= 1 else min(1 << math.ceil(math.log2(m)), 512)


def block_k_for(gs: int, k: int, cap: int = 128) -> int:
    """Largest power of two in [16, cap] dividing ``gs`` (so a K tile stays inside one group);
    for per-channel weights (one group) just ``cap`` (capped near K)."""
    if gs >= k:
        return max(16, min(cap, 1 << max(4, math.ceil(math.log2(max(k, 1))))))
    bk = cap
    while bk > 16 and gs % bk:
        bk //= 2
    return bk


def group_tile(gs: int, k: int, block_k: int) -> bool:
    return gs >= k or gs % block_k == 0


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---- heuristics --------------------------------------------------------------------------------
def gemv_default(m: int, n: int, k: int, gs: int, device: torch.device) -> Config:
    bm = 1 if m <= 1 else (2 if m <= 2 else 4)
    # 128 outputs x 128 codes with 4 warps: every word, x element and (s, z) is requested once
    # (tests/test_triton_sass.py checks the SASS)
    bn = 128 if n >= 4096 else (64 if n >= 2048 else 32)
    bk = block_k_for(gs, k, 128 if bm == 1 else 64)
    progs = -(-n // bn) * -(-m // bm)
    k_tiles = -(-k // bk)
    split = 1
    while progs * split < 2 * num_sms(device) and split * 2 <= min(8, k_tiles):
        split *= 2
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 4}


def mm_default(m: int, n: int, k: int, gs: int, device: torch.device) -> Config:
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    bn = 64 if m <= 64 else 128
    bk = block_k_for(gs, k, 64)
    progs = -(-n // bn) * -(-m // bm)
    split = 1
    k_tiles = -(-k // bk)
    while m <= 64 and progs * split < num_sms(device) and split * 2 <= min(4, k_tiles):
        split *= 2
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 4,
            "num_stages": 3}


def sparse_default(m: int, n: int, nnz: int, gs: int, device: torch.device) -> Config:
    tasks = 4 * num_sms(device)
    return {"n_tasks": max(1, min(tasks, nnz)), "BLOCK_G": 16 if gs <= 128 else 8,
            "num_warps": 4}


# ---- candidates --------------------------------------------------------------------------------
def gemv_candidates(m: int, n: int, k: int, gs: int, device: torch.device) -> list[Config]:
    base = gemv_default(m, n, k, gs, device)
    out = [base]
    bm = base["BLOCK_M"]
    sms = num_sms(device)
    for bn in (32, 64, 128):
        for bk in sorted({block_k_for(gs, k, 128), block_k_for(gs, k, 256)}):
            if bm * bn * bk > 16384:
                continue
            k_tiles = -(-k // bk)
            progs = -(-n // bn) * -(-m // bm)
            for split in (1, 2, 4, 8):
                if split > k_tiles or (split > 1 and progs * split > 8 * sms):
                    continue
                c = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
                     "num_warps": 4}
                if c not in out:
                    out.append(c)
    return out


def mm_candidates(m: int, n: int, k: int, gs: int, device: torch.device) -> list[Config]:
    out = [mm_default(m, n, k, gs, device)]
    bms = (16,) if m <= 16 else ((32,) if m <= 32 else ((64,) if m <= 64 else (64, 128)))
    for bm in bms:
        for bn in (64, 128):
            for bk in sorted({block_k_for(gs, k, 64), block_k_for(gs, k, 128)}):
                for split in ((1, 2, 4) if m <= 64 else (1,)):
                    for nw, ns in ((4, 3), (8, 4)):
                        c = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
                             "num_warps": nw, "num_stages": ns}
                        if c not in out:
                            out.append(c)
    return out


def sparse_candidates(m: int, n: int, nnz: int, gs: int, device: torch.device) -> list[Config]:
    out = [sparse_default(m, n, nnz, gs, device)]
    sms = num_sms(device)
    for per_sm in (2, 4, 8):
        for bg in (8, 16, 32):
            for nw in (2, 4):
                c = {"n_tasks": max(1, min(per_sm * sms, nnz)), "BLOCK_G": bg, "num_warps": nw}
                if c not in out:
                    out.append(c)
    return out


# ---- the per-GPU-model disk cache ------------------------------------------------------------
def _cache_file(device: torch.device) -> str:
    import triton

    root = os.environ.get("BITPRESS_TRITON_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "bitpress", "triton")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", torch.cuda.get_device_name(device))
    return os.path.join(root, f"{name}-triton{triton.__version__}.json")


def _table(path: str) -> dict[str, Config]:
    t = _tables.get(path)
    if t is None:
        try:
            with open(path) as f:
                t = json.load(f)
            if not isinstance(t, dict):
                t = {}
        except (OSError, ValueError):
            t = {}
        _tables[path] = t
    return t


def _save(path: str, table: dict[str, Config]) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not break inference
        log.info("bitpress triton: cannot write tuning cache %s (%s)", path, e)


def pick(key: str, device: torch.device, default: Config, candidates: Callable[[], list[Config]],
         run: Callable[[Config], None]) -> Config:
    """The cached winner for ``key`` on this GPU model; on a miss, time every candidate with
    ``run(config)`` (skipping any that fail to compile), store and return the fastest."""
    if device.type != "cuda" or not tuning_enabled():
        return default
    memo = (key, device.index)
    hit = _picked.get(memo)
    if hit is not None:
        return hit
    path = _cache_file(device)
    with _lock:
        table = _table(path)
        hit = table.get(key)
    if hit is not None:
        _picked[memo] = hit
        return hit
    from triton.testing import do_bench

    best: Optional[Config] = None
    best_t = float("inf")
    for cfg in candidates():
        try:
            t = do_bench(lambda: run(cfg), warmup=3, rep=15)
        except Exception as e:  # noqa: BLE001 (out of shared memory/registers, ...)
            log.debug("bitpress triton: config %s failed for %s: %s", cfg, key, e)
            continue
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        best = default
    log.info("bitpress triton: tuned %s -> %s (%.1f us)", key, best, best_t * 1e3)
    with _lock:
        table = _table(path)
        table[key] = best
        _save(path, table)
    _picked[memo] = best
    return best
