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

from ..errors import ConfigError
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

#: block tuning (see :mod:`bitpress.quant.blocktune`) each method runs unless told otherwise
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
                     param_dtype=recipe.param_dtype, sparsity=recipe.sparsity, options=opts)

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
             tune_options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
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
    """
    from .stream import stream_quantize

    t0 = time.time()
    if recipe.method not in METHODS:
        raise ConfigError(f"unknown method {recipe.method!r}; available: {', '.join(METHODS)}")
    if batch_size < 1:
        raise ConfigError(f"calibration batch size must be positive, got {batch_size}")
    out = Path(out)
    check_output_path(out, [src, calib], overwrite)  # before anything is loaded
    solve = _solver(recipe)
    tuner = _block_tuner(recipe, block_tune, tune_epochs, tune_lr, tune_options, block_hook,
                         progress)
    if tuner is not None:
        block_hook = tuner
    if calibrate is None:
        calibrate = recipe.method in CALIBRATED or calib is not None or block_hook is not None
    source, model, store, tokenizer, ids, calib_desc = _open(
        src, recipe, calibrate, calib, nsamples, seqlen, seed)
    t_setup = time.time() - t0
    res = stream_quantize(model, store, recipe, solve, ids, batch_size=batch_size,
                          block_hook=block_hook, progress=progress)
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
        "block_tune_losses": [r.to_dict() for r in tuner.records] if tuner is not None
        else None,
        "sequential_groups": res.groups,
        "memory_bytes": res.memory, "tensors_read_per_block": res.reads_per_block,
        "error_metric": res.error_metric,
        "bits_per_weight": _bits_per_weight(res.model),
    }
    qcfg = {"method": recipe.method, "bits": recipe.bits, "group_size": recipe.group_size,
            "sparsity": recipe.sparsity, "ignore": recipe.ignore,
            "param_dtype": recipe.param_dtype}
    summary["peak_rss_bytes"] = peak_rss_bytes()
    summary["relative_weight_error"] = res.errors
    _save_with_summary(res.model, out, tokenizer, qcfg, overwrite, dtype, summary, t0)
    summary["out"] = str(out)
    return summary


def _open(src, recipe: Recipe, calibrate: bool, calib, nsamples: int, seqlen: int, seed: int):
    """The checked source, its meta-device skeleton and tensor store, the tokenizer and the
    calibration windows (``None`` without calibration) -- shared by compress and simulate."""
    from .calib import calibration_text, calibration_windows
    from .evaluate import model_context
    from .stream import GGUFStore, SafetensorsStore, build_skeleton

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
    tokenizer = source.load_tokenizer()
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
    """The :class:`~bitpress.quant.blocktune.BlockTuner` asked for (``None``: no tuning)."""
    from ..quant.blocktune import DEFAULT_EPOCHS, DEFAULT_LR, make_block_tuner

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
    return make_block_tuner(mode, epochs=epochs if epochs is not None else DEFAULT_EPOCHS,
                            lr=lr if lr is not None else DEFAULT_LR, **opts)


def _bits_per_weight(model) -> float:
    from .checkpoint import packed_modules

    from ..formats import keep_bits_bytes

    bits = weights = 0
    for m in packed_modules(model).values():  # as written: block-sparse index as a bitmask
        bits += 8 * sum(t.numel() * t.element_size() for n, t in m.named_buffers()
                        if n not in ("bias", "row_ptr", "col_idx"))
        if m.scheme()["format"] == "bsr":
            bits += 8 * m.out_features * keep_bits_bytes(m.n_groups)
        weights += m.in_features * m.out_features
    return round(bits / max(weights, 1), 4)


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
