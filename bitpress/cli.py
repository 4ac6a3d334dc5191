"""The ``bitpress`` command: ``compress``, ``finetune``, ``export``, ``eval``, ``inspect``,
``generate``, ``sample`` (diffusion: runs a ``compress --method cachequant`` directory).

User mistakes print one line (``bitpress: error: ...``) and exit with status 2; no
traceback, and no output directory is left behind.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional, Sequence

from .cli_parser import _EXPORT_FORMATS, _KERNEL_MODES, _SCHEDULES, build_parser  # noqa: F401
from .errors import BitpressError

_log = logging.getLogger("bitpress.cli")


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
    d, lr, text, teacher_src = _finetune_check(args)
    model, tok, teacher = _finetune_load(d, teacher_src)
    res = _finetune_train(args, d, model, tok, text, teacher, lr)
    return _finetune_write(args, d, model, res)


def _finetune_check(args):
    """The options, the output path, the text and the teacher's vocabulary, checked before
    any load; returns the checkpoint directory, the learning rate, the text and the teacher's
    source (``None``: no teacher)."""
    from pathlib import Path

    from .errors import ConfigError
    from .formats.checkpoint import check_output_path
    from .pipeline.evaluate import read_text
    from .pipeline.finetune import DEFAULT_LR

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
    tsrc = None
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
    return d, lr, text, tsrc


def _finetune_load(d, tsrc):
    """The packed model, its tokenizer and the teacher (float32; ``None`` without one)."""
    from .pipeline.checkpoint import load, load_tokenizer

    model = load(d)
    tok = load_tokenizer(d)
    # float32: 4 bytes per parameter beside the packed model
    teacher = tsrc.load_model() if tsrc is not None else None
    return model, tok, teacher


def _finetune_train(args, d, model, tok, text: str, teacher, lr: float) -> dict:
    """Train on windows of ``text``; returns the run's record."""
    from .pipeline.calib import calibration_windows
    from .pipeline.checkpoint import load_hf_config
    from .pipeline.evaluate import model_context
    from .pipeline.finetune import finetune_float_parts

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
    return res


def _finetune_write(args, d, model, res: dict) -> dict:
    """Write the trained float parts (atomically) and add the output to the record."""
    from .pipeline.finetune import write_float_parts

    out = write_float_parts(model, d, args.out, overwrite=args.force,
                            norms=not args.no_norms, record=res)
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
                           blocks=args.blocks, device=args.device,
                           sequential=args.sequential)
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

        from .kernels import native as kcpu  # the CPU kernels' mode, or the fallback

        text = read_text(args.text)
        model, tok = _load_any(args.model)
        with kcpu.kernel_mode(args.kernel_mode):
            res = perplexity(model, tok, text, seqlen=args.seqlen, windows=args.windows,
                             batch_size=args.batch_size)
            res["kernel_mode"] = kcpu.describe_mode()
        print(json.dumps({"model": args.model, "text": args.text, **res}))
    elif args.command == "generate":
        from .pipeline.evaluate import generate

        from .kernels import native as kcpu  # the CPU kernels' mode, or the fallback

        model, tok = _load_any(args.model)
        if args.fast:
            _decode_helpers(model)
        with kcpu.kernel_mode(args.kernel_mode):
            res = generate(model, tok, args.prompt, args.max_new_tokens, args.sample,
                           engine=not args.no_engine)
        print(f"bitpress: {kcpu.describe(res['kernels'])}", file=sys.stderr)
        print(json.dumps(res))
    return 0


def _decode_helpers(model) -> None:
    """``generate --fast``: the opt-in helpers of :mod:`bitpress.nn.fuse` that leave the
    numbers as they are (exact, or a 16-bit rounding of the head)."""
    import torch

    from .nn.fuse import fuse_linears, fuse_norms, pack_output_head
    from .pipeline.arch import fused_projections

    n_lin, n_norm = fuse_linears(model, fused_projections(model)), fuse_norms(model)
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
    except ImportError as e:  # an optional dependency is not installed: name its extra
        from .deps import from_import_error

        if (err := from_import_error(e)) is None:
            raise
        print(f"bitpress: error: {err}", file=sys.stderr)
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
