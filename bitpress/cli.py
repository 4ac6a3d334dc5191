"""The ``bitpress`` command: ``compress``, ``finetune``, ``export``, ``eval``, ``inspect``,
``generate``, ``sample`` (diffusion: runs a ``compress --method cachequant`` directory).

User mistakes print one line (``bitpress: error: ...``) and exit with status 2; no
traceback, and no output directory is left behind.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

from .errors import BitpressError

_log = logging.getLogger("bitpress.cli")


def _group_size(v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer, got {v!r}") from None


#: ``bitpress.quant.finetune.SCHEDULES``, restated so that building the parser (``--help``)
#: does not import torch; tests/test_finetune.py keeps the two equal
_SCHEDULES = ("constant", "cosine")


#: `bitpress export --format` choices (restated here so --help needs no torch)
_EXPORT_FORMATS = {
    "hf": "float HF directory (default)",
    "gguf": "one llama.cpp file (--out FILE.gguf), exact block types where the grid maps "
            "(docs/gguf.md)",
    "onnx": "MatMulNBits graph with a KV cache (docs/npu.md)",
    "openvino": "OpenVINO IR with u4/u8 weights (docs/npu.md)",
    "compressed-tensors": "pack-quantized directory for vLLM and transformers "
                          "(docs/interop.md)",
}
#: activation modes of the CPU kernels (bitpress.kernels.cpu; restated so --help needs no torch)
_KERNEL_MODES = ("exact", "int8", "lut", "lut63")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitpress", description="Press trained models into few-bit "
                                "packed weights and run them.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a checkpoint (HF dir or .gguf; a diffusers "
                       "directory with --method cachequant)")
    c.add_argument("src", help="Hugging Face model directory (safetensors) or .gguf file; for "
                   "cachequant a diffusers pipeline or UNet2DModel directory")
    c.add_argument("--out", required=True, help="output directory (must not exist)")
    c.add_argument("--method", default="rtn",
                   help="compression method: rtn (data-free; magnitude group pruning with "
                        "--sparsity), gptq, decoupleq (layer solver), gqsa (group-sparse; "
                        "calibrated), cachequant (diffusion U-Net: cache plan + int8); "
                        "default rtn")
    c.add_argument("--bits", type=int, default=4, help="code bits: 2, 3, 4 or 8 (default 4)")
    c.add_argument("--group-size", type=_group_size, default=None,
                   help="weights per group, 16..256 step 16, or -1 per-channel (default 128; "
                        "16 for gqsa)")
    c.add_argument("--sparsity", type=float, default=None,
                   help="share of weight groups to prune (group-sparse formats; default 0.5 "
                        "for gqsa)")
    c.add_argument("--sparsity-rule", action="append", default=None, metavar="PATTERN=S",
                   help="give the linears matching PATTERN their own sparsity S, e.g. "
                        "'*.down_proj=0.2' (repeatable; the first match wins, the rest take "
                        "--sparsity)")
    c.add_argument("--sym", action="store_true", help="symmetric grid (zero point 0)")
    c.add_argument("--integer-zeros", action="store_true", help="zeros on the integer grid "
                   "(-zp·scale, integer zp in the code range): exports to compressed-tensors "
                   "exactly (rtn, gptq, decoupleq and its tuning; docs/interop.md)")
    c.add_argument("--param-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of scales/zeros on disk (default float16)")
    c.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of the tensors left unquantized (default float16)")
    c.add_argument("--ignore", action="append", default=None,
                   help="module name pattern to leave in full precision (repeatable; default: "
                        "lm_head and embeddings)")
    c.add_argument("--targets", action="append", default=None,
                   help="module name pattern to compress (repeatable; default: all linears)")
    c.add_argument("--recipe", help="recipe JSON file (overrides the options above)")
    c.add_argument("--force", action="store_true", help="replace an existing output directory")
    c.add_argument("--blocks", default=None, metavar="A:B", help="compress only decoder blocks "
                   "A..B-1 (from 0); the others stay float (docs/scale.md)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run of the "
                   "same command from its last finished block (same bytes as an uninterrupted run)")
    c.add_argument("--device", default="cpu", help="where the passes run: cpu, cuda, cuda:N")
    k = c.add_argument_group("calibration (gptq; optional for rtn, where it only measures "
                             "the H-weighted error)")
    k.add_argument("--calib", default=None,
                   help="UTF-8 text file to draw calibration windows from (default: the "
                        "built-in offline text, CPython's documentation topics)")
    k.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    k.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    k.add_argument("--seed", type=int, default=0, help="seed of the window positions (default 0)")
    k.add_argument("--calib-batch-size", type=int, default=8,
                   help="windows per block forward (default 8)")
    k.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: quantize columns by decreasing Hessian diagonal, static groups "
                        "(default on)")
    k.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: H-weighted search of each group's clipping range (default: on at "
                        "<= 3 bits)")
    k.add_argument("--damp", type=float, default=None,
                   help="GPTQ: damping, relative to the mean Hessian diagonal (default 0.01)")

    t = c.add_argument_group("block tuning (against the float block's outputs, after each "
                             "block's linears are solved)")
    t.add_argument("--block-tune", default=None, choices=["none", "float_parts", "bqpo"],
                   help="float_parts: train scales/zeros and norms, codes frozen (decoupleQ); "
                        "bqpo: also the kept weights by straight-through rounding, mask "
                        "frozen (GQSA). Default: float_parts for decoupleq, bqpo for gqsa, "
                        "none otherwise")
    t.add_argument("--tune-epochs", type=int, default=None,
                   help="passes over the calibration samples per block, one Adam step per "
                        "sample (default 1)")
    t.add_argument("--tune-steps", type=int, default=None,
                   help="at most this many Adam steps per block (a random subset of the "
                        "calibration samples; default: all of them, --tune-epochs times)")
    t.add_argument("--tune-lr", type=float, default=None,
                   help="Adam learning rate of scales, zeros and norms (default 1e-3)")
    t.add_argument("--tune-loss", default=None, choices=["mse", "token"],
                   help="block-output loss of the tuning and of its acceptance check: mse "
                        "(every element alike) or token (each token's squared error relative "
                        "to its squared norm); default: token for bqpo, mse for float_parts")
    t.add_argument("--tune-target", default=None, choices=["block", "model"],
                   help="what each block's output is trained towards: block (the float block "
                        "on the quantized model's inputs) or model (the float model's own "
                        "hidden states, so a block also undoes the error of the blocks before "
                        "it; one more block forward); default: model for bqpo, block for "
                        "float_parts")

    d = c.add_argument_group("diffusion (--method cachequant)")
    d.add_argument("--steps", type=int, default=100, help="denoising steps (default 100)")
    d.add_argument("--interval", type=int, default=5,
                   help="cache interval N: ceil(steps/N) full U-Net refreshes (default 5)")
    d.add_argument("--schedule", default="dps", choices=["dps", "uniform", "deepcache"],
                   help="refresh schedule (default dps, the dynamic programme)")
    d.add_argument("--scheduler", default="ddim", choices=["ddim", "ddpm", "pndm"],
                   help="sampler (default ddim)")
    d.add_argument("--wbits", type=int, default=8, help="U-Net weight bits: 8, 4, or 32 for "
                   "none (default 8)")
    d.add_argument("--abits", type=int, default=8, help="activation bits (8)")
    d.add_argument("--float-layers", default=None, metavar="NAMES",
                   help="comma-separated U-Net convs/linears (fnmatch patterns) kept in float; "
                        "'' quantizes all (default: bitpress.cache.quant.DEFAULT_FLOAT_LAYERS)")
    d.add_argument("--calib-samples", type=int, default=32,
                   help="calibration trajectories (default 32)")
    d.add_argument("--no-dec", action="store_true", help="no decoupled error correction")

    f = sub.add_parser("finetune", help="fine-tune the scales/zeros (and norms) of a packed "
                       "checkpoint end to end on a text; codes untouched")
    f.add_argument("dir", help="bitpress checkpoint directory (rewritten atomically unless --out)")
    f.add_argument("--text", required=True, help="UTF-8 text file to train on")
    f.add_argument("--out", default=None, help="write the result here instead of into DIR")
    f.add_argument("--force", action="store_true", help="replace an existing --out directory")
    f.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: --epochs passes over the windows)")
    f.add_argument("--epochs", type=int, default=1, help="passes over the windows (default 1)")
    f.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate of scales/zeros (default 1e-4)")
    f.add_argument("--norm-lr", type=float, default=None,
                   help="learning rate of the norm weights (default: --lr)")
    f.add_argument("--batch-size", type=int, default=1, help="windows per step (default 1)")
    f.add_argument("--nsamples", type=int, default=128, help="training windows (default 128)")
    f.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    f.add_argument("--seed", type=int, default=0, help="seed of windows and order (default 0)")
    f.add_argument("--no-norms", action="store_true", help="train only scales/zeros")
    f.add_argument("--integer-zeros", action="store_true", help="keep zeros on the integer "
                   "grid, tied to the scales (default: as the checkpoint was compressed)")
    f.add_argument("--schedule", choices=list(_SCHEDULES), default="constant",
                   help="learning-rate schedule: constant (default) or cosine decay to 0")
    f.add_argument("--teacher", default=None,
                   help="full-precision model (HF dir or .gguf, usually the compress source) to "
                   "distil from: the loss becomes the KL divergence from its next-token "
                   "distribution instead of the cross-entropy on the text (loaded in float32)")

    x = sub.add_parser("export", help="dequantize a bitpress checkpoint into a plain Hugging "
                       "Face model directory (loads without bitpress; a source for compress)")
    x.add_argument("dir", help="bitpress checkpoint directory (only read)")
    x.add_argument("--out", required=True, help="output directory (must not exist)")
    x.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the written weights (default float32)")
    x.add_argument("--force", action="store_true", help="replace an existing output directory")
    x.add_argument("--format", default="hf", choices=list(_EXPORT_FORMATS), help="; ".join(
        f"{k}: {v}" for k, v in _EXPORT_FORMATS.items()))
    x.add_argument("--gguf-type", default="auto", choices=["auto", "q4_0", "q4_1", "q8_0", "f16",
                   "f32"], help="GGUF type of the packed linears (default auto: the exact one)")
    x.add_argument("--allow-requant", action="store_true", help="GGUF: re-quantize linears "
                   "with no exact block type (their measured error is reported)")
    x.add_argument("--allow-rounding", action="store_true", help="compressed-tensors: round "
                   "zeros that are off the integer grid (the error is printed)")

    e = sub.add_parser("eval", help="perplexity of a model (HF dir, .gguf or bitpress checkpoint)")
    e.add_argument("model")
    e.add_argument("--text", required=True, help="UTF-8 text file to score")
    e.add_argument("--seqlen", type=int, default=1024)
    e.add_argument("--windows", type=int, default=None, help="score only the first N windows")
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--kernel-mode", choices=_KERNEL_MODES, default=None,
                   help="score the CPU decode kernels in this activation mode at every window "
                        "size (what `generate` runs with the same --kernel-mode); default: "
                        "exact kernels, with the exact GEMM path for long windows")

    i = sub.add_parser("inspect", help="size, bits/weight and per-layer scheme of a checkpoint")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--histogram", action="store_true", help="also show code histograms")

    g = sub.add_parser("generate", help="generate text from a prompt (KV cache on)")
    g.add_argument("model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--kernel-mode", choices=_KERNEL_MODES, default=None,
                   help="activation mode of the packed CPU kernels: exact (default, what the "
                        "reference computes) or the faster approximate int8 / lut / lut63")
    g.add_argument("--no-engine", action="store_true",
                   help="decode with transformers' generate instead of the C++ decode engine")
    g.add_argument("--fast", action="store_true",
                   help="batch-1 decode helpers that keep the model's numbers: q/k/v and "
                        "gate/up as one packed call each, fused RMSNorm, and the output head "
                        "in fp16 (rounding only; the input embedding stays as stored)")
    sm = sub.add_parser("sample", help="sample images from a cachequant directory")
    sm.add_argument("dir", help="directory written by compress --method cachequant")
    sm.add_argument("--n", type=int, default=64, help="images (default 64)")
    sm.add_argument("--out", required=True, help="PNG grid to write")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--force", action="store_true", help="replace an existing --out file")
    return p


def _tune_options(args):
    """The block tuner's options given on the command line (``None``: none given)."""
    opts = {k: v for k, v in (("steps", args.tune_steps), ("loss", args.tune_loss),
                              ("target", args.tune_target)) if v is not None}
    return opts or None


def _recipe(args):
    from .nn import Recipe

    if args.recipe:
        return Recipe.from_json(args.recipe)
    opts = {k: v for k, v in (("act_order", args.act_order), ("clip_search", args.clip_search),
                              ("damp", args.damp)) if v is not None}
    from .pipeline.compress import SPARSE_METHODS

    sparse_default = SPARSE_METHODS.get(args.method)
    group = args.group_size if args.group_size is not None else (16 if sparse_default else 128)
    sparsity = args.sparsity if args.sparsity is not None else sparse_default
    kw = dict(method=args.method, bits=args.bits, group_size=group, sparsity=sparsity,
              sym=args.sym, param_dtype=args.param_dtype, options=opts,
              integer_zeros=args.integer_zeros)
    if args.ignore is not None:
        kw["ignore"] = args.ignore
    if args.targets is not None:
        kw["targets"] = args.targets
    if args.sparsity_rule:
        kw["sparsity_rules"] = _sparsity_rules(args.sparsity_rule)
    return Recipe(**kw)


def _sparsity_rules(items: list[str]) -> dict[str, float]:
    from .errors import ConfigError

    rules: dict[str, float] = {}
    for it in items:
        pat, sep, val = it.rpartition("=")
        try:
            if not sep or not pat:
                raise ValueError
            rules[pat] = float(val)
        except ValueError:
            raise ConfigError(f"--sparsity-rule expects PATTERN=SPARSITY, got {it!r}") from None
    return rules


def _load_any(path: str):
    from .pipeline.checkpoint import load, load_tokenizer
    from .pipeline.source import open_source

    src = open_source(path)
    if src.kind == "bitpress":
        return load(src.path), load_tokenizer(src.path)
    return src.load_model(), src.load_tokenizer()


def _finetune(args) -> dict:
    """``bitpress finetune``: everything checkable is checked before the model is loaded;
    the checkpoint is rewritten (or ``--out`` written) atomically only after training."""
    from pathlib import Path

    from .errors import ConfigError
    from .formats.checkpoint import check_output_path
    from .pipeline.calib import calibration_windows
    from .pipeline.checkpoint import load, load_hf_config, load_tokenizer
    from .pipeline.evaluate import model_context, read_text
    from .quant.finetune import DEFAULT_LR, finetune_float_parts, write_float_parts

    d = Path(args.dir)
    if args.out is not None:
        if Path(args.out).resolve() == d.resolve():
            raise ConfigError(f"--out {args.out} is DIR itself; omit --out to rewrite the "
                              f"checkpoint in place")
        check_output_path(args.out, [d, args.text, args.teacher], args.force)
    for name in ("steps", "nsamples", "batch_size", "epochs"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {v}")
    lr = args.lr if args.lr is not None else DEFAULT_LR
    if not lr > 0 or (args.norm_lr is not None and not args.norm_lr > 0):
        raise ConfigError("--lr / --norm-lr must be positive")
    text = read_text(args.text)
    teacher = None
    if args.teacher is not None:  # checked from the configs, before the (slower) loads
        from .pipeline.checkpoint import load_hf_config
        from .pipeline.source import open_source

        tsrc = open_source(args.teacher)
        if tsrc.kind == "bitpress":
            raise ConfigError(f"--teacher {args.teacher} is a bitpress checkpoint; distil from "
                              f"the full-precision source model")
        tv = getattr(tsrc.load_config(), "vocab_size", None)
        mv = getattr(load_hf_config(d)[0], "vocab_size", None)
        if tv != mv:
            raise ConfigError(f"--teacher has a vocabulary of {tv} tokens, the checkpoint "
                              f"{mv}: distil from the model it was compressed from")
    model = load(d)
    tok = load_tokenizer(d)
    if args.teacher is not None:
        teacher = tsrc.load_model()  # float32: 4 bytes per parameter beside the packed model
    ids = calibration_windows(tok, text, args.nsamples, args.seqlen, args.seed,
                              context=model_context(model))
    res = finetune_float_parts(model, ids, steps=args.steps, epochs=args.epochs, lr=lr,
                               norm_lr=args.norm_lr, batch_size=args.batch_size,
                               train_norms=not args.no_norms, seed=args.seed,
                               schedule=args.schedule, teacher=teacher, progress=True,
                               integer_zeros=args.integer_zeros or bool(
                                   load_hf_config(d)[1].get("integer_zeros")))
    res.update({"source": str(d), "text": str(args.text), "nsamples": args.nsamples,
                "seed": args.seed, "teacher": args.teacher})
    out = write_float_parts(model, d, args.out, overwrite=args.force, norms=not args.no_norms,
                            record=res)
    res["out"] = str(out)
    return res


def run(args) -> int:
    if args.command == "compress" and args.method == "cachequant":
        from .cache.cli import compress_cachequant

        print(json.dumps(compress_cachequant(args), indent=2))
    elif args.command == "sample":
        from .cache.cli import sample

        print(json.dumps(sample(args)))
    elif args.command == "compress":
        from .pipeline.compress import compress

        import torch

        summary = compress(args.src, args.out, _recipe(args), overwrite=args.force,
                           dtype=getattr(torch, args.dtype), calib=args.calib,
                           nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                           batch_size=args.calib_batch_size, block_tune=args.block_tune,
                           tune_epochs=args.tune_epochs, tune_lr=args.tune_lr,
                           tune_options=_tune_options(args), resume=args.resume,
                           blocks=args.blocks, device=args.device)
        if summary.get("world_size", 1) > 1 and int(os.environ.get("RANK", "0")) != 0:
            return 0  # one report per distributed run
        print(json.dumps({k: v for k, v in summary.items()
                          if k not in ("relative_weight_error", "tensors_read_per_block")},
                         indent=2))
    elif args.command == "finetune":
        res = _finetune(args)
        print(json.dumps({k: v for k, v in res.items() if k != "losses"}, indent=2))
    elif args.command == "export" and args.format in ("onnx", "openvino"):
        from .integrations.onnx_export import export_runtime

        print(json.dumps(export_runtime(args.dir, args.out, args.format, args.force), indent=2))
    elif args.command == "export" and args.format == "gguf":
        from .integrations.gguf_export import export_gguf

        print(json.dumps(export_gguf(args.dir, args.out, args.gguf_type, args.allow_requant,
                                     overwrite=args.force), indent=2))
    elif args.command == "export" and args.format == "compressed-tensors":
        from .integrations.compressed_tensors import export_compressed_tensors

        print(json.dumps(export_compressed_tensors(args.dir, args.out, overwrite=args.force,
                                                   allow_rounding=args.allow_rounding), indent=2))
    elif args.command == "export":
        from .pipeline.export import DTYPES, export_float

        print(json.dumps(export_float(args.dir, args.out, DTYPES[args.dtype],
                                      overwrite=args.force), indent=2))
    elif args.command == "inspect":
        from .pipeline.inspect import format_report, inspect_checkpoint

        rep = inspect_checkpoint(args.dir, histogram=args.histogram)
        print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    elif args.command == "eval":
        from .pipeline.evaluate import perplexity, read_text

        from .kernels import cpu as kcpu

        text = read_text(args.text)
        model, tok = _load_any(args.model)
        with kcpu.kernel_mode(args.kernel_mode):
            res = perplexity(model, tok, text, seqlen=args.seqlen, windows=args.windows,
                             batch_size=args.batch_size)
            res["kernel_mode"] = kcpu.describe_mode()
        print(json.dumps({"model": args.model, "text": args.text, **res}))
    elif args.command == "generate":
        from .pipeline.evaluate import generate

        from .kernels import cpu as kcpu

        model, tok = _load_any(args.model)
        if args.fast:
            _decode_helpers(model)
        with kcpu.kernel_mode(args.kernel_mode):
            res = generate(model, tok, args.prompt, args.max_new_tokens, args.sample,
                           engine=not args.no_engine)
        print(json.dumps(res))
    return 0


def _decode_helpers(model) -> None:
    """``generate --fast``: the opt-in helpers of :mod:`bitpress.nn.fuse` that leave the
    numbers as they are (exact, or a 16-bit rounding of the head)."""
    import torch

    from .nn.fuse import fuse_linears, fuse_norms, pack_output_head

    n_lin, n_norm = fuse_linears(model), fuse_norms(model)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    fp32_head = isinstance(head, torch.nn.Linear) and head.weight.dtype == torch.float32
    if fp32_head:
        pack_output_head(model, bits=16)
    _log.info("generate --fast: %d fused linear groups, %d fused norms, output head %s",
              n_lin, n_norm, "in fp16" if fp32_head else "left as it is")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        try:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        except ImportError:
            pass
    from .guard import broken_pipe_exit, sigterm_as_exception, Terminated

    try:
        with sigterm_as_exception():
            return run(args)
    except BitpressError as e:
        print(f"bitpress: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitpress: interrupted; no output was written", file=sys.stderr)
        return 130
    except Terminated:
        print("bitpress: terminated (SIGTERM); no output was written", file=sys.stderr)
        return 143
    except BrokenPipeError:  # `bitpress inspect ... | head`: the reader left; stop quietly
        return broken_pipe_exit()
    except OSError as e:  # the system refused (disk full, permissions, ...): no traceback
        _log.debug("OSError", exc_info=True)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"bitpress: error: {e.strerror or e}{where}; nothing was written (-vv shows "
              f"where it happened)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
