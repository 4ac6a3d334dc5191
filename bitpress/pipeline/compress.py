"""``bitpress compress``: source checkpoint → packed bitpress checkpoint."""
from __future__ import annotations

import dataclasses
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, SourceError
from ..formats.checkpoint import check_output_path
from ..nn import Recipe, replace_linears, target_linears
from ..nn.recipe import rtn_quantize_linear
from .checkpoint import save
from .source import open_source
from .stream import BlockHook

log = logging.getLogger(__name__)

#: methods the streaming driver runs; calibrated ones need block inputs
METHODS = ("rtn", "gptq", "decoupleq", "gqsa")
CALIBRATED = ("gptq", "decoupleq", "gqsa")
#: group-sparse methods: ``--sparsity`` defaults to this share of pruned groups
SPARSE_METHODS = {"gqsa": 0.5}
#: comparison baselines that :func:`simulate` runs (element masks have no packed format):
#: SparseGPT-style 2:4 and unstructured pruning, each + group quantization
SIMULATED_METHODS = ("sparsegpt24", "unstructured")

#: block tuning (see :mod:`bitpress.pipeline.blocktune`) each method runs unless told otherwise
BLOCK_TUNE_MODES = ("none", "float_parts", "bqpo")
BLOCK_TUNE_DEFAULTS: dict[str, str] = {"decoupleq": "float_parts", "gqsa": "bqpo"}

#: GPTQ defaults: act-order (static groups) always, H-weighted clip search at <= 3 bits, as
#: the GPTQ work suggests; not yet re-measured here on the full protocol (bench/RESULTS.md)
GPTQ_DEFAULTS: dict[str, Any] = {"act_order": True, "damp": 0.01}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _solver(recipe: Recipe):
    """``solve(name, W, H) -> QuantizedWeight`` for the recipe's method."""
    from ..quant import PASSES, QuantSpec
    from ..sparse import SPARSE_PASSES

    if recipe.integer_zeros and recipe.method not in ("rtn", "gptq", "decoupleq"):
        raise ConfigError(f"integer zero points (--integer-zeros) are implemented for rtn, gptq "
                          f"and decoupleq, not {recipe.method!r} (group-sparse checkpoints do "
                          f"not export to compressed-tensors anyway)")
    if recipe.method == "rtn":
        return lambda name, W, H: rtn_quantize_linear(W, recipe, name)
    if recipe.method in SIMULATED_METHODS:
        if recipe.method == "sparsegpt24" and (recipe.sparsity not in (None, 0.5)
                                               or recipe.sparsity_rules):
            raise ConfigError("2:4 pruning removes exactly half the weights; drop --sparsity")
        opts = dict(recipe.options or {})
        fn = SPARSE_PASSES[recipe.method]
    elif recipe.method in SPARSE_METHODS:
        if not recipe.sparse:
            raise ConfigError(f"method {recipe.method!r} prunes groups: give --sparsity in (0, 1)")
        opts = dict(recipe.options or {})
        fn = SPARSE_PASSES[recipe.method]
    else:
        if recipe.sparse:
            raise ConfigError(f"method {recipe.method!r} does not prune groups; drop --sparsity")
        opts = dict(GPTQ_DEFAULTS, clip_search=recipe.bits <= 3) if recipe.method == "gptq" \
            else {}
        opts.update(recipe.options or {})
        fn = PASSES[recipe.method]
    spec = QuantSpec(bits=recipe.bits, group_size=recipe.group_size, sym=recipe.sym,
                     param_dtype=recipe.param_dtype, sparsity=recipe.sparsity, options=opts,
                     integer_zeros=recipe.integer_zeros)

    def solve(name: str, W: torch.Tensor, H: Optional[torch.Tensor]):
        if H is None:  # linears outside the block stack (e.g. a targeted head): data-free
            return rtn_quantize_linear(W, recipe, name)
        if recipe.sparsity_rules:
            return fn(W, H, dataclasses.replace(spec, sparsity=recipe.sparsity_for(name)))
        return fn(W, H, spec)
    solve.options = opts  # type: ignore[attr-defined]
    return solve


def compress(src: str | os.PathLike, out: str | os.PathLike, recipe: Recipe,
             overwrite: bool = False, progress: bool = True,
             dtype: Optional[torch.dtype] = torch.float16,
             calib: Optional[str | os.PathLike] = None, nsamples: int = 128,
             seqlen: int = 512, seed: int = 0, batch_size: int = 8,
             calibrate: Optional[bool] = None,
             block_hook: Optional[BlockHook] = None, block_tune: Optional[str] = None,
             tune_epochs: Optional[int] = None, tune_lr: Optional[float] = None,
             tune_options: Optional[dict[str, Any]] = None, resume: bool = False,
             blocks: Optional[str | tuple[int, int]] = None, device: str = "cpu",
             max_shard_bytes: Optional[int] = None, sequential: str = "auto"
             ) -> dict[str, Any]:
    """Compress ``src`` with ``recipe`` block by block and write a bitpress checkpoint.

    Only one decoder block's float weights are in memory at a time (see
    :mod:`bitpress.pipeline.stream`). Calibrated methods (``gptq``) draw ``nsamples``
    windows of ``seqlen`` tokens with ``seed`` from ``calib`` (a UTF-8 text file; default:
    :func:`bitpress.pipeline.data.builtin_text`). RTN is data-free unless ``calibrate``
    (or a ``calib`` file) asks for calibration, which then only serves the H-weighted error
    report. Everything that can be checked is checked before the long work; the output is
    written atomically, so a failure leaves neither a partial ``out`` nor a changed ``src``.
    ``dtype`` is the storage dtype of the tensors left unquantized (embeddings, norms).
    ``block_hook`` (see :class:`bitpress.pipeline.stream.BlockContext`) may re-solve a
    block's weights against the float block's outputs (block tuning).

    Scale (see ``docs/scale.md``): each block is written as it finishes and dropped from
    memory (:mod:`bitpress.pipeline.streamout`); ``resume`` continues a run that was
    killed, from its last finished block, to the same bytes; ``blocks`` ``"A:B"``
    compresses only blocks ``A <= i < B`` (the rest stay float); ``device`` runs every
    pass there (``"cuda"``, ``"cuda:1"``, ``"cpu"``); ``sequential`` (``"auto"``,
    ``"stash"``, ``"recompute"``) trades memory for forwards (see
    :func:`~bitpress.pipeline.stream.stream_quantize`; ``"recompute"`` holds the least).
    Started by ``torchrun`` with several
    processes, the calibration batches are split across them (:mod:`bitpress.pipeline.dist`).
    """
    from .stream import stream_quantize

    t0 = time.time()
    if recipe.method not in METHODS:
        raise ConfigError(f"unknown method {recipe.method!r}; available: {', '.join(METHODS)}")
    if batch_size < 1:
        raise ConfigError(f"calibration batch size must be positive, got {batch_size}")
    from .dist import init_from_env
    from .streamout import StreamOutput

    dev = resolve_device(device)
    block_range = parse_blocks(blocks)
    out = Path(out)
    check_output_path(out, [src, calib], overwrite)  # before anything is loaded
    solve = _solver(recipe)
    tuner = _block_tuner(recipe, block_tune, tune_epochs, tune_lr, tune_options, block_hook,
                         progress)
    if tuner is not None:
        block_hook = tuner
    if calibrate is None:
        calibrate = recipe.method in CALIBRATED or calib is not None or block_hook is not None
    dist = init_from_env(str(dev))
    source, model, store, tokenizer, ids, calib_desc = _open(
        src, recipe, calibrate, calib, nsamples, seqlen, seed)
    from ..formats import FORMAT_VERSION

    fingerprint = _fingerprint(source, recipe, solve, ids, calib_desc, nsamples, seqlen, seed,
                               batch_size, tuner, dtype, block_range, dist.world, dev)
    writer = StreamOutput(out, fingerprint, resume, overwrite, dtype, dist, FORMAT_VERSION,
                          **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}))
    t_setup = time.time() - t0
    try:
        res = stream_quantize(model, store, recipe, solve, ids, batch_size=batch_size,
                              block_hook=block_hook, progress=progress and dist.rank == 0,
                              writer=writer, block_range=block_range, device=dev, seed=seed,
                              dist=dist, sequential=sequential)
    except BaseException:
        if writer.work.exists():
            log.warning("the finished blocks are kept in %s: rerun the same command with "
                        "--resume to continue, or with --force to start over", writer.work)
        raise
    tune_records = [r for b in writer.state["blocks"] for r in b["tune"]]
    summary: dict[str, Any] = {
        "source": str(source.path), "method": recipe.method, "recipe": recipe.to_dict(),
        "options": getattr(solve, "options", {}),
        "layers": len(res.schemes),
        "calibration": _calib_record(calib_desc, nsamples, seqlen, seed, batch_size),
        "seconds_load": round(t_setup, 2), "seconds_quantize": round(res.seconds_quantize, 2),
        "seconds_solver": round(res.seconds_quantize - (tuner.seconds if tuner else 0.0), 2),
        "block_tune": tuner.options() if tuner is not None else None,
        "seconds_block_tune": round(tuner.seconds, 2) if tuner is not None else 0.0,
        "seconds_layer_solve": round(res.seconds_layer_solve, 2),
        "block_tune_losses": tune_records if tuner is not None else None,
        "sequential_groups": res.groups,
        "memory_bytes": res.memory, "tensors_read_per_block": res.reads_per_block,
        "error_metric": res.error_metric,
        "bits_per_weight": round(res.packed_bits[0] / max(res.packed_bits[1], 1), 4),
        "device": str(dev), "world_size": dist.world,
        "blocks": list(block_range) if block_range else None,
        "resumed_from_block": writer.resumed_from or None,
        "torch_threads": torch.get_num_threads(),
    }
    qcfg = {"method": recipe.method, "bits": recipe.bits, "group_size": recipe.group_size,
            "sparsity": recipe.sparsity, "ignore": recipe.ignore,
            "param_dtype": recipe.param_dtype}
    if recipe.integer_zeros:
        qcfg["integer_zeros"] = True
    summary["relative_weight_error"] = res.errors
    summary["peak_rss_bytes"] = peak_rss_bytes()
    summary["seconds_total"] = round(time.time() - t0, 2)
    writer.finalize(_out_config(model, res.schemes, qcfg, dtype), tokenizer,
                    getattr(model, "generation_config", None), summary, overwrite,
                    len(res.reads_per_block))
    summary["out"] = str(out)
    return summary


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` checked: a clear error when it is not there."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available to this torch "
                              "(torch.cuda.is_available() is False; a CPU-only build or no "
                              "GPU); run on a GPU machine with CUDA torch, or use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                              f"device(s) are visible")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type not in ("cpu",):
        raise ConfigError(f"--device {device}: compression runs on cpu or cuda")
    return dev


def parse_blocks(blocks: Optional[str | tuple[int, int]]) -> Optional[tuple[int, int]]:
    """``"A:B"`` → ``(A, B)`` (checked against the model later)."""
    if blocks is None or isinstance(blocks, tuple):
        return blocks
    a, sep, b = str(blocks).partition(":")
    try:
        if not sep:
            raise ValueError
        return int(a), int(b)
    except ValueError:
        raise ConfigError(f"--blocks expects A:B (blocks A to B-1, from 0), got {blocks!r}") \
            from None


def _fingerprint(source, recipe: Recipe, solve, ids, calib_desc, nsamples, seqlen, seed,
                 batch_size, tuner, dtype, block_range, world, dev) -> dict[str, Any]:
    """Everything the compressed bytes depend on: a resumed run must match it."""
    import hashlib

    files = [source.path] if source.path.is_file() else sorted(source.path.iterdir())
    return {
        "source": str(source.path.absolute()),
        "source_files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files
                         if f.is_file()],
        "recipe": recipe.to_dict(), "options": getattr(solve, "options", {}),
        "calibration": calib_desc, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
        "batch_size": batch_size,
        "calib_ids_sha256": hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()
        if ids is not None else None,
        "block_tune": tuner.options() if tuner is not None else None,
        "dtype": str(dtype), "blocks": list(block_range) if block_range else None,
        "world_size": world, "device": dev.type,
    }


def _out_config(model, schemes: dict[str, Any], qcfg: dict[str, Any],
                dtype: Optional[torch.dtype]) -> dict[str, Any]:
    """config.json of the compressed checkpoint (as :func:`~.checkpoint.save` writes it)."""
    from ..formats import make_quantization_config

    q = dict(qcfg)
    mods = {k: v for k, v in schemes.items()}
    qc = make_quantization_config(q.pop("method"), q.pop("bits"), q.pop("group_size"), mods,
                                  sparsity=q.pop("sparsity", None), ignore=q.pop("ignore", None),
                                  param_dtype=q.pop("param_dtype"), **q)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if dtype is not None:
        config["dtype"] = str(dtype).replace("torch.", "")
    config["quantization_config"] = qc
    return config


def _open(src, recipe: Recipe, calibrate: bool, calib, nsamples: int, seqlen: int, seed: int):
    """The checked source, its meta-device skeleton and tensor store, the tokenizer and the
    calibration windows (``None`` without calibration) -- shared by compress and simulate."""
    from .calib import calibration_text, calibration_windows
    from .evaluate import model_context
    from .skeleton import build_skeleton
    from .tensorstore import GGUFStore, SafetensorsStore

    source = open_source(src)
    if source.kind == "bitpress":
        raise ConfigError(f"{src} is already a bitpress checkpoint; compress the original model")
    if recipe.method in CALIBRATED + SIMULATED_METHODS and not calibrate:
        raise ConfigError(f"method {recipe.method!r} needs calibration data")
    text = calib_desc = None
    if calibrate:
        text, calib_desc = calibration_text(calib)  # a bad file fails before any loading
    config = source.load_config()
    model = build_skeleton(config)
    if source.kind == "hf":
        store = SafetensorsStore(source.path, list(model.state_dict().keys()))
    else:
        store = GGUFStore(source.path, model)
    try:
        tokenizer = source.load_tokenizer()
    except SourceError:
        if calibrate:
            raise
        log.warning("%s has no usable tokenizer; the output will have none either (data-free "
                    "compression needs none)", source.path)
        tokenizer = None
    ids = None
    if calibrate:
        ids = calibration_windows(tokenizer, text, nsamples, seqlen, seed,
                                  context=model_context(model))
    return source, model, store, tokenizer, ids, calib_desc


def _calib_record(calib_desc, nsamples: int, seqlen: int, seed: int, batch_size: int):
    if calib_desc is None:
        return None
    return {"text": calib_desc, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
            "batch_size": batch_size}


def simulate(src: str | os.PathLike, recipe: Recipe, progress: bool = True,
             calib: Optional[str | os.PathLike] = None, nsamples: int = 128, seqlen: int = 512,
             seed: int = 0, batch_size: int = 8) -> tuple[Any, Any, dict[str, Any]]:
    """Run a comparison baseline (:data:`SIMULATED_METHODS`) through the same streaming
    pipeline and calibration as :func:`compress`, and return ``(model, tokenizer, summary)``:
    a float model whose solved linears hold their pruned + fake-quantised weights.

    Element masks (2:4, unstructured) have no packed format or kernel here, so nothing is
    written; ``summary["bits_per_weight"]`` is the honest cost of a real storage format
    for them (codes, scales, zeros and mask/index bits; :mod:`bitpress.sparse.baselines`).
    """
    from ..sparse import bits_per_weight_24, bits_per_weight_unstructured
    from .stream import stream_quantize

    t0 = time.time()
    if recipe.method not in SIMULATED_METHODS:
        raise ConfigError(f"simulate runs the baselines {', '.join(SIMULATED_METHODS)}; use "
                          f"compress() for {recipe.method!r}")
    if recipe.group_size == -1:
        raise ConfigError("the baselines quantize kept weights group-wise; give a group size")
    if batch_size < 1:
        raise ConfigError(f"calibration batch size must be positive, got {batch_size}")
    solve = _solver(recipe)
    source, model, store, tokenizer, ids, calib_desc = _open(
        src, recipe, True, calib, nsamples, seqlen, seed)
    t_setup = time.time() - t0
    res = stream_quantize(model, store, recipe, solve, ids, batch_size=batch_size,
                          progress=progress, pack=False)
    pbits = 32 if recipe.param_dtype == "float32" else 16
    if recipe.method == "sparsegpt24":
        bpw = bits_per_weight_24(recipe.bits, recipe.group_size, pbits)
    else:
        bpw = bits_per_weight_unstructured(recipe.bits, recipe.group_size,
                                           recipe.sparsity or 0.5, pbits)
    summary = {
        "source": str(source.path), "method": recipe.method, "recipe": recipe.to_dict(),
        "simulated": True, "layers": len(res.schemes),
        "calibration": _calib_record(calib_desc, nsamples, seqlen, seed, batch_size),
        "seconds_load": round(t_setup, 2), "seconds_quantize": round(res.seconds_quantize, 2),
        "seconds_layer_solve": round(res.seconds_layer_solve, 2),
        "bits_per_weight": round(bpw, 4), "error_metric": res.error_metric,
        "relative_weight_error": res.errors, "peak_rss_bytes": peak_rss_bytes(),
        "seconds_total": round(time.time() - t0, 2),
    }
    return res.model, tokenizer, summary


def _block_tuner(recipe: Recipe, block_tune: Optional[str], epochs: Optional[int],
                 lr: Optional[float], options: Optional[dict[str, Any]],
                 block_hook: Optional[BlockHook], progress: bool):
    """The :class:`~bitpress.pipeline.blocktune.BlockTuner` asked for (``None``: no tuning)."""
    from .blocktune import DEFAULT_EPOCHS, DEFAULT_LR, make_block_tuner

    if block_tune is not None and block_tune not in BLOCK_TUNE_MODES:
        raise ConfigError(f"unknown block tuning {block_tune!r}; choose one of "
                          f"{', '.join(BLOCK_TUNE_MODES)}")
    explicit = block_tune is not None and block_tune != "none"
    if block_hook is not None:
        if explicit:
            raise ConfigError("give either a custom block_hook or block_tune, not both")
        mode = "none"
    else:
        mode = block_tune if block_tune is not None else \
            BLOCK_TUNE_DEFAULTS.get(recipe.method, "none")
    if mode == "none":
        if epochs is not None or lr is not None or options:
            raise ConfigError("--tune-epochs / --tune-steps / --tune-lr need block tuning; drop "
                              "them or pick "
                              "--block-tune float_parts|bqpo")
        return None
    opts = dict(options or {})
    opts.setdefault("param_dtype", recipe.torch_param_dtype)
    opts.setdefault("progress", progress)
    if recipe.integer_zeros:
        opts.setdefault("integer_zeros", True)
    return make_block_tuner(mode, epochs=epochs if epochs is not None else DEFAULT_EPOCHS,
                            lr=lr if lr is not None else DEFAULT_LR, **opts)


def _bits_per_weight(model) -> float:
    bits, weights = packed_bits(model)
    return round(bits / max(weights, 1), 4)


def packed_bits(model) -> tuple[int, int]:
    """(bits as written, weights) of the packed modules in ``model``."""
    from .checkpoint import packed_modules

    from ..formats import keep_bits_bytes

    bits = weights = 0
    for m in packed_modules(model).values():  # as written: block-sparse index as a bitmask
        bits += 8 * sum(t.numel() * t.element_size() for n, t in m.named_buffers()
                        if n not in ("bias", "row_ptr", "col_idx"))
        if m.scheme()["format"] == "bsr":
            bits += 8 * m.out_features * keep_bits_bytes(m.n_groups)
        weights += m.in_features * m.out_features
    return bits, weights


def _save_with_summary(model, out: Path, tokenizer, qcfg, overwrite, dtype, summary, t0) -> None:
    """Save atomically; the summary inside carries the size on disk (every file but the
    summary itself, so that it is reproducible) and total time, which are only known once
    the shards are written (patched in the temp dir before the rename)."""
    from ..formats import atomic_output_dir
    from ..formats.checkpoint import write_json

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        inner = tmp / "model"
        save(model, inner, tokenizer, qcfg, overwrite=False,
             extra_files={"bitpress_summary.json": summary}, dtype=dtype)
        size = sum(f.stat().st_size for f in inner.iterdir()
                   if f.is_file() and f.name != "bitpress_summary.json")
        summary["size_on_disk_bytes"] = size
        summary["peak_rss_bytes"] = peak_rss_bytes()
        summary["seconds_total"] = round(time.time() - t0, 2)
        write_json(inner / "bitpress_summary.json", summary)
        for f in inner.iterdir():
            os.replace(f, tmp / f.name)
        inner.rmdir()


def compress_model(model, tokenizer, recipe: Recipe, out: str | os.PathLike,
                   overwrite: bool = False, progress: bool = True,
                   dtype: Optional[torch.dtype] = torch.float16,
                   source: Optional[str] = None) -> dict[str, Any]:
    """Compress an already loaded float model **in place** and save it to ``out``."""
    if recipe.method != "rtn":
        raise ConfigError(f"compress_model runs only the data-free method 'rtn'; use "
                          f"compress() for {recipe.method!r}")
    targets = [n for n, _ in target_linears(model, recipe)]
    if not targets:
        raise ConfigError("the recipe selects no linear layer of this model; check --targets / "
                          "--ignore")
    bar = tqdm(total=len(targets), desc=f"{recipe.method} W{recipe.bits}", unit="linear",
               disable=not progress)
    errors: dict[str, float] = {}

    def quantize(name: str, w: torch.Tensor):
        qw = rtn_quantize_linear(w, recipe, name)
        errors[name] = float((qw.dequantize() - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))
        bar.set_postfix_str(f"{name.split('.', 2)[-1]} rel.err {errors[name]:.2e}")
        bar.update(1)
        return qw

    t1 = time.time()
    schemes = replace_linears(model, recipe, quantize)
    bar.close()
    t_quant = time.time() - t1
    summary = {
        "source": source, "method": recipe.method, "recipe": recipe.to_dict(),
        "layers": len(schemes), "seconds_quantize": round(t_quant, 2),
        "peak_rss_bytes": peak_rss_bytes(), "relative_weight_error": errors,
    }
    qcfg = {"method": recipe.method, "bits": recipe.bits, "group_size": recipe.group_size,
            "sparsity": recipe.sparsity, "ignore": recipe.ignore,
            "param_dtype": recipe.param_dtype}
    save(model, out, tokenizer, qcfg, overwrite=overwrite,
         extra_files={"bitpress_summary.json": summary}, dtype=dtype)
    summary["out"] = str(out)
    return summary
