"""Whole-model CPU decode of SmolLM2-135M: bitpress's C++ decode engine against its float model,
Hugging Face's eager generate, and the runtimes users pick instead (llama.cpp, onnxruntime,
OpenVINO), all in one process, the same prompt and the same greedy decoding.

Protocol: the prompt is the first ``--prompt-tokens`` (512) tokens of WikiText-2 test, then
``--new-tokens`` (128) greedy tokens; every runner runs once per round, rounds interleaved (a
load change on this shared machine hits every runner alike); the median over rounds is
reported for each thread count. Prefill tok/s = prompt tokens / time to the first new token;
decode tok/s = decode steps (new tokens after the first) / their time.

bitpress rows (weights from the packaged GGUF, RTN unless ``--ckpt`` names a checkpoint):
``fp32`` (the float model on the engine), ``W4 g128``, ``W2 g64`` and ``W4 g16 S50``
(magnitude-pruned 16-wide groups: GQSA's storage and kernels), each with the output head at
W8 g128 (``+h8``; llama.cpp's Q4_0 keeps the head at Q8_0 for this model) and run in the
``exact`` kernel mode (the default: what the reference op computes; prefill through the exact
GEMM path) and the opt-in ``int8`` mode (prefill through the int8 kernels). ``HF W4 g128``
is the same model through transformers' eager ``generate`` loop. Peers run when their
packages are installed: llama.cpp (``bench/_llamacpp.py``: F32, F16, Q8_0, Q4_0 GGUFs of the
same weights, plus bitpress's own GGUF export where available), onnxruntime and OpenVINO
(``bench/_onnx_peer.py``, bitpress's ONNX / OpenVINO exports).

    .venv/bin/python bench/decode.py --threads 1,2 --rounds 3
    .venv/bin/python bench/decode.py --only "fp32,W4 g128 +h8" --peers none --rounds 1
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import bitpress  # noqa: E402
import bitpress.nn as bnn  # noqa: E402
from bitpress.kernels import cpu as kcpu  # noqa: E402
from bitpress.nn.fuse import pack_output_head  # noqa: E402
from bitpress.pipeline.source import open_source, packaged_gguf  # noqa: E402
from bitpress.runtime import DecodeEngine  # noqa: E402
from _common import cpu_info, write_json  # noqa: E402

WIKI = os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2", "test.txt")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def packed(base, recipe, head_bits: int = 0):
    m = copy.deepcopy(base)
    bnn.replace_linears(m, recipe)
    if head_bits:
        pack_output_head(m, bits=head_bits, group_size=128)
    return m.eval()


def engine_runner(model, mode: str, threads: int, max_len: int) -> Callable:
    """A bitpress engine run: exact mode keeps the default prefill (exact GEMM path for long
    prompts); the approximate modes run the prompt through the same kernels too."""
    eng = DecodeEngine(model, max_len=max_len, threads=threads, mode=mode)

    def run(ids, new):
        tm: dict = {}
        with kcpu.kernel_mode(None if mode == "exact" else mode):
            out = eng.generate(ids, new, timings=tm)
        return tm["prefill_s"], tm["decode_s"], out[0, ids.shape[1]:].tolist()

    run.weight_mb = eng.weight_bytes / 1e6
    return run


def hf_runner(model) -> Callable:
    @torch.inference_mode()
    def run(ids, new):
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        toks = [int(nxt)]
        t1 = time.perf_counter()
        for _ in range(new - 1):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(int(nxt))
        return t1 - t0, time.perf_counter() - t1, toks

    return run


def peer_runner(fn: Callable, path: str, threads: int) -> Callable:
    def run(ids, new):
        r = fn(path, ids[0].tolist(), new, threads)
        n = len(ids[0])
        ids_out = r.get("ids", r.get("generated_ids", []))
        return n / r["prefill_tok_s"], (new - 1) / r["decode_tok_s"], list(ids_out)

    return run


def bitpress_exports(model, tok, work: str, peers: list, notes: dict) -> dict:
    """The W4 g128 model saved as a bitpress checkpoint and exported for the peers that run
    bitpress's own weights (GGUF for llama.cpp, ONNX, OpenVINO); cached under ``work``."""
    out: dict = {}
    if model is None or not peers:
        return out
    ckpt = os.path.join(work, "bitpress-w4g128")
    if not os.path.isdir(ckpt):
        bitpress.save(model, ckpt, tok)
    jobs = {"gguf": ("llamacpp", os.path.join(work, "bitpress-w4g128.gguf")),
            "onnx": ("onnxruntime", os.path.join(work, "bitpress-w4g128-onnx")),
            "openvino": ("openvino", os.path.join(work, "bitpress-w4g128-openvino"))}
    for fmt, (peer, path) in jobs.items():
        if peer not in peers:
            continue
        try:
            if not os.path.exists(path):
                if fmt == "gguf":
                    from bitpress.integrations.gguf_export import export_gguf

                    export_gguf(ckpt, path, "auto", False)
                else:
                    from bitpress.integrations.onnx_export import export_runtime

                    export_runtime(ckpt, path, fmt, False)
            out[fmt if fmt == "gguf" else peer] = path
        except Exception as e:  # noqa: BLE001
            notes[f"export {fmt}"] = f"failed: {type(e).__name__}: {e}"
    return out


def main() -> None:  # noqa: C901 - one benchmark, all its runners
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma list (default 1,2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--text", default=WIKI, help="prompt source text (WikiText-2 test)")
    ap.add_argument("--only", default=None, help="comma list of row names to run")
    ap.add_argument("--modes", default="exact,int8", help="kernel modes of the packed rows")
    ap.add_argument("--peers", default="llamacpp,onnxruntime,openvino",
                    help="peer runtimes to time when installed ('none' for none)")
    ap.add_argument("--peer-dir", default=os.path.join(HERE, "models"),
                    help="where peer model files are made and cached (not committed)")
    ap.add_argument("--ckpt", action="append", default=[], metavar="NAME=DIR",
                    help="also time a bitpress checkpoint (bitpress.load); repeatable")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "decode", "decode.json"))
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    modes = args.modes.split(",")
    want = set(args.only.split(",")) if args.only else None
    load_start = os.getloadavg()

    t = time.perf_counter()
    src = open_source(packaged_gguf())
    base = src.load_model().eval()
    tok = src.load_tokenizer()
    text = open(args.text, encoding="utf-8").read()
    ids = tok(text[:20 * args.prompt_tokens], return_tensors="pt").input_ids[:, :args.prompt_tokens]
    if ids.shape[1] < args.prompt_tokens:
        raise SystemExit(f"{args.text}: fewer than {args.prompt_tokens} tokens")
    max_len = args.prompt_tokens + args.new_tokens
    print(f"loaded SmolLM2-135M in {time.perf_counter() - t:.1f} s; prompt {ids.shape[1]} "
          f"tokens, {args.new_tokens} new", flush=True)

    # ---- the models ----------------------------------------------------------------------
    specs = {
        "W4 g128": (bnn.Recipe(bits=4, group_size=128), 0),
        "W4 g128 +h8": (bnn.Recipe(bits=4, group_size=128), 8),
        "W2 g64 +h8": (bnn.Recipe(bits=2, group_size=64), 8),
        "W4 g16 S50 +h8": (bnn.Recipe(bits=4, group_size=16, sparsity=0.5), 8),
    }
    models = {"fp32": base}
    for name, (recipe, hb) in specs.items():
        if want is None or any(w.startswith(name) for w in want) or f"HF {name}" in (want or ()):
            models[name] = packed(base, recipe, hb)
    for spec in args.ckpt:
        name, _, path = spec.partition("=")
        models[name] = bitpress.load(path).eval()

    def keep(name):
        return want is None or name in want

    runners: dict[str, dict[int, Callable]] = {}
    meta_rows: dict[str, dict] = {}
    for nt in threads:
        torch.set_num_threads(nt)
        for name, m in models.items():
            for mode in (["exact"] if name == "fp32" else modes):
                row = name if name == "fp32" else f"{name} [{mode}]"
                if not keep(row) and not keep(name):
                    continue
                r = engine_runner(m, mode, nt, max_len)
                runners.setdefault(row, {})[nt] = r
                meta_rows[row] = {"runtime": "bitpress engine", "kernel_mode": mode,
                                  "weight_MB": round(r.weight_mb, 1)}
        if "W4 g128" in models and keep("HF W4 g128"):
            runners.setdefault("HF W4 g128", {})[nt] = hf_runner(models["W4 g128"])
            meta_rows["HF W4 g128"] = {"runtime": "transformers eager generate",
                                       "kernel_mode": "exact"}
    peers = [] if args.peers == "none" else args.peers.split(",")
    peer_notes = {}
    exports = bitpress_exports(models.get("W4 g128"), tok, args.peer_dir, peers, peer_notes)
    if "llamacpp" in peers:
        try:
            import _llamacpp

            files = dict(_llamacpp.make_peer_ggufs(args.peer_dir))
            if "gguf" in exports:
                files["bitpress W4 g128 (Q4_1, F16 head)"] = exports["gguf"]
            for name, path in files.items():
                row = f"llama.cpp {name}"
                if keep(row):
                    for nt in threads:
                        runners.setdefault(row, {})[nt] = peer_runner(_llamacpp.time_llamacpp,
                                                                      str(path), nt)
                    meta_rows[row] = {"runtime": "llama.cpp (llama-cpp-python)",
                                      "kernel_mode": "int8 activations (Q8 blocks)",
                                      "file_MB": round(os.path.getsize(path) / 1e6, 1)}
        except Exception as e:  # noqa: BLE001 - a missing peer is reported, not fatal
            peer_notes["llamacpp"] = f"not run: {type(e).__name__}: {e}"
    for peer, fn_name in (("onnxruntime", "time_onnxruntime"), ("openvino", "time_openvino")):
        if peer not in peers or peer not in exports:
            continue
        try:
            import _onnx_peer

            row = f"{peer} bitpress W4 g128 (fp16 head)"
            if keep(row):
                for nt in threads:
                    runners.setdefault(row, {})[nt] = peer_runner(getattr(_onnx_peer, fn_name),
                                                                  exports[peer], nt)
                meta_rows[row] = {"runtime": peer, "kernel_mode": "exact (fp32 activations)"}
        except Exception as e:  # noqa: BLE001
            peer_notes[peer] = f"not run: {type(e).__name__}: {e}"
    for k, v in peer_notes.items():
        print(f"peer {k}: {v}", flush=True)

    # ---- timing ----------------------------------------------------------------------------
    results: dict[str, dict] = {}
    for nt in threads:
        torch.set_num_threads(nt)
        rows = [r for r in runners if nt in runners[r]]
        for r in rows:  # warm-up: repacks, allocator, peer caches
            runners[r][nt](ids[:, :32], 4)
        times = {r: [] for r in rows}
        toks = {}
        for rnd in range(args.rounds):
            for r in rows:
                times[r].append(runners[r][nt](ids, args.new_tokens))
                toks[r] = times[r][-1][2]
            print(f"[{nt} thread(s)] round {rnd + 1}/{args.rounds}: " + ", ".join(
                f"{r} {(args.new_tokens - 1) / times[r][-1][1]:.1f}" for r in rows), flush=True)
        res = {}
        for r in rows:
            pf = statistics.median(x[0] for x in times[r])
            dc = statistics.median(x[1] for x in times[r])
            res[r] = {**meta_rows.get(r, {}),
                      "prefill_tok_s": round(args.prompt_tokens / pf, 1),
                      "decode_tok_s": round((args.new_tokens - 1) / dc, 1),
                      "decode_tok_s_rounds": [round((args.new_tokens - 1) / x[1], 1)
                                              for x in times[r]],
                      "same_tokens_as_fp32": sum(a == b for a, b in zip(toks[r], toks.get("fp32", [])))}
        ref = [r for r in rows if r.startswith("llama.cpp Q4_0")]
        if ref:
            for r in rows:
                res[r]["decode_vs_llamacpp_q4_0"] = round(res[r]["decode_tok_s"]
                                                          / res[ref[0]]["decode_tok_s"], 3)
                res[r]["prefill_vs_llamacpp_q4_0"] = round(res[r]["prefill_tok_s"]
                                                           / res[ref[0]]["prefill_tok_s"], 3)
        results[str(nt)] = res
        print(f"\nSmolLM2-135M, prompt {args.prompt_tokens} (WikiText-2 test), {args.new_tokens} "
              f"new tokens, greedy, {nt} thread(s), median of {args.rounds} rounds")
        print(f"{'runner':<34}{'prefill tok/s':>14}{'decode tok/s':>13}{'vs Q4_0':>9}{'MB':>8}")
        for r, v in res.items():
            mb = v.get("weight_MB", v.get("file_MB", float("nan")))
            print(f"{r:<34}{v['prefill_tok_s']:>14.1f}{v['decode_tok_s']:>13.1f}"
                  f"{v.get('decode_vs_llamacpp_q4_0', float('nan')):>9.2f}{mb:>8.1f}")

    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"),
            "cpu": cpu_info(), "torch": torch.__version__, "isa": kcpu.get_isa(),
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "rounds": args.rounds, "threads": threads, "peers": peer_notes,
            "load_average_start": load_start, "load_average_end": os.getloadavg(),
            "rss_MB_end": round(rss_mb(), 1),
            "git": subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True).stdout.strip(),
            "command": "bench/decode.py " + " ".join(sys.argv[1:])}
    write_json(args.out, {"meta": meta, "results": results})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
