"""Run a model directory written by ``bitpress export --format onnx|openvino``: greedy
generation with the KV cache and perplexity, in ONNX Runtime (CPU execution provider) or
OpenVINO (CPU plugin).

Named ``onnx_runtime`` so that it never shadows the ``onnxruntime`` package.

Both runtimes are run in float32 and, by default, exactly: OpenVINO is told not to lower
the inference precision to bf16 and not to quantize activations dynamically
(``exact=False`` lets it do both, as it does by default on CPUs that support it). ORT's
MatMulNBits runs with ``accuracy_level=0`` (float32 arithmetic), fixed at export.

Perplexity follows :mod:`bitpress.pipeline.evaluate`'s protocol (the text tokenised in one
pass without special tokens, non-overlapping windows each scored on its own), so the numbers
compare with ``bitpress eval``::

    python -m bitpress.integrations.onnx_runtime eval OUT_DIR --text wiki.test.raw \\
        --seqlen 512 --windows 8
    python -m bitpress.integrations.onnx_runtime generate OUT_DIR --prompt "Hello" -n 32
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import BitpressError, ConfigError, SourceError
from .onnx_export import ONNX_FILE, OV_FILE, _require


class ExportedDecoder:
    """The exported decoder in one runtime. ``backend``: ``"onnxruntime"`` or
    ``"openvino"`` (default: the one the directory was exported for)."""

    def __init__(self, model_dir: str | os.PathLike, backend: Optional[str] = None,
                 threads: int = 1, exact: bool = True) -> None:
        d = Path(model_dir)
        cfg_path = d / "config.json"
        if not cfg_path.is_file():
            raise SourceError(f"{d} has no config.json; is it a `bitpress export --format "
                              f"onnx|openvino` directory?")
        cfg = json.loads(cfg_path.read_text())
        if backend is None:
            backend = "openvino" if (d / OV_FILE).is_file() else "onnxruntime"
        if threads < 1:
            raise ConfigError(f"threads must be positive, got {threads}")
        self.dir, self.backend, self.threads = d, backend, threads
        self.layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        self.kv_heads = int(cfg.get("num_key_value_heads") or heads)
        self.head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        self.context = int(cfg.get("max_position_embeddings") or 2048)
        if backend == "onnxruntime":
            if not (d / ONNX_FILE).is_file():
                raise SourceError(f"{d} has no {ONNX_FILE}; export with --format onnx")
            ort = _require("onnxruntime")
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._sess = ort.InferenceSession(str(d / ONNX_FILE), so,
                                              providers=["CPUExecutionProvider"])
            self._names = [o.name for o in self._sess.get_outputs()]
        elif backend == "openvino":
            if not (d / OV_FILE).is_file():
                raise SourceError(f"{d} has no {OV_FILE}; export with --format openvino")
            ov = _require("openvino")
            props: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                     "PERFORMANCE_HINT": "LATENCY"}
            if exact:
                props.update({"INFERENCE_PRECISION_HINT": "f32",
                              "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0})
            core = ov.Core()
            self._compiled = core.compile_model(str(d / OV_FILE), "CPU", props)
            self._req = self._compiled.create_infer_request()
            self._outs = {o.get_any_name(): o for o in self._compiled.outputs}
        else:
            raise ConfigError(f"backend must be onnxruntime or openvino, got {backend!r}")

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return [z] * (2 * self.layers)

    def forward(self, ids: np.ndarray, past: Optional[list[np.ndarray]] = None,
                attention_mask: Optional[np.ndarray] = None,
                position_ids: Optional[np.ndarray] = None
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call of the graph: ``(logits [B, S, V], present)`` for ``ids`` [B, S] after
        ``past`` (a list of 2·layers arrays, key then value per layer)."""
        ids = np.asarray(ids, dtype=np.int64)
        b, s = ids.shape
        past = past if past is not None else self.empty_past(b)
        p = past[0].shape[2]
        if attention_mask is None:
            attention_mask = np.ones((b, p + s), np.int64)
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy()
        feeds = {"input_ids": ids, "attention_mask": np.asarray(attention_mask, np.int64),
                 "position_ids": np.asarray(position_ids, np.int64)}
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        names = ["logits"] + [f"present.{i}.{k}" for i in range(self.layers)
                              for k in ("key", "value")]
        if self.backend == "onnxruntime":
            res = self._sess.run(names, feeds)
        else:
            r = self._req.infer(feeds)
            res = [np.array(r[self._outs[n]]) for n in names]
        return res[0], list(res[1:])

    def generate(self, prompt_ids: Sequence[int], n_new: int,
                 eos_token_id: Optional[int] = None) -> dict[str, Any]:
        """Greedy continuation (batch 1, KV cache): new token ids and the prefill / decode
        seconds (decode = the steps after the first new token, which the prefill makes)."""
        if n_new <= 0:
            raise ConfigError("the number of new tokens must be positive")
        ids = np.asarray([list(prompt_ids)], np.int64)
        if ids.shape[1] + n_new > self.context:
            raise ConfigError(f"prompt + new tokens ({ids.shape[1] + n_new}) exceed the "
                              f"model's context of {self.context}")
        t0 = time.perf_counter()
        logits, past = self.forward(ids)
        nxt = int(logits[0, -1].argmax())
        toks = [nxt]
        t1 = time.perf_counter()
        while len(toks) < n_new and (eos_token_id is None or nxt != eos_token_id):
            logits, past = self.forward(np.asarray([[nxt]], np.int64), past)
            nxt = int(logits[0, -1].argmax())
            toks.append(nxt)
        t2 = time.perf_counter()
        return {"ids": toks, "prefill_s": t1 - t0, "decode_s": t2 - t1,
                "prompt_tokens": int(ids.shape[1])}


def perplexity(dec: ExportedDecoder, tokenizer, text: str, seqlen: int = 1024,
               windows: Optional[int] = None, progress: bool = True) -> dict[str, Any]:
    """WikiText-style perplexity through the exported graph (bitpress's protocol)."""
    from tqdm.auto import tqdm

    from ..pipeline.evaluate import make_windows, tokenize_text

    if seqlen > dec.context:
        raise ConfigError(f"seqlen {seqlen} exceeds the model's context of {dec.context}")
    ids = tokenize_text(tokenizer, text)
    win = make_windows(ids, seqlen, windows)
    nll, count = 0.0, 0
    t0 = time.time()
    bar = tqdm(range(win.shape[0]), desc=f"perplexity ({dec.backend})", unit="window",
               disable=not progress, leave=False)
    for i in bar:
        batch = win[i:i + 1]
        logits, _ = dec.forward(batch.numpy())
        lg = torch.from_numpy(logits).float()
        loss = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]),
                                                 batch[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += batch[:, 1:].numel()
        bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}")
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens_scored": count,
            "windows": int(win.shape[0]), "seqlen": seqlen, "text_tokens": int(ids.numel()),
            "backend": dec.backend, "threads": dec.threads,
            "seconds": round(time.time() - t0, 2)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..pipeline.checkpoint import load_tokenizer
    from ..pipeline.evaluate import read_text

    p = argparse.ArgumentParser(prog="python -m bitpress.integrations.onnx_runtime",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("eval", "generate"):
        s = sub.add_parser(name)
        s.add_argument("dir", help="directory written by bitpress export --format onnx|openvino")
        s.add_argument("--backend", choices=["onnxruntime", "openvino"], default=None)
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--fast", action="store_true",
                       help="OpenVINO: allow bf16 / dynamic int8 activations (not exact)")
        if name == "eval":
            s.add_argument("--text", required=True)
            s.add_argument("--seqlen", type=int, default=1024)
            s.add_argument("--windows", type=int, default=None)
        else:
            s.add_argument("--prompt", required=True)
            s.add_argument("-n", "--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    try:
        dec = ExportedDecoder(args.dir, args.backend, args.threads, exact=not args.fast)
        tok = load_tokenizer(args.dir)
        if args.command == "eval":
            res = perplexity(dec, tok, read_text(args.text), args.seqlen, args.windows)
            print(json.dumps({"model": args.dir, "text": args.text, **res}))
        else:
            ids = tok(args.prompt)["input_ids"]
            r = dec.generate(ids, args.max_new_tokens, tok.eos_token_id)
            print(json.dumps({"prompt": args.prompt, "backend": dec.backend,
                              "text": tok.decode(r["ids"], skip_special_tokens=True),
                              "new_tokens": len(r["ids"]),
                              "seconds": round(r["prefill_s"] + r["decode_s"], 3)}))
    except BitpressError as e:
        print(f"bitpress: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
