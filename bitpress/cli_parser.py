"""The argument parser of the ``bitpress`` command (kept free of torch: ``bitpress --help``
imports only this and :mod:`argparse`)."""
from __future__ import annotations

import argparse


def _group_size(v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer, got {v!r}") from None


#: ``bitpress.pipeline.finetune.SCHEDULES``, restated so that building the parser (``--help``)
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
    _add_compress(sub)
    _add_finetune(sub)
    _add_export(sub)
    _add_eval(sub)
    _add_inspect(sub)
    _add_generate(sub)
    _add_sample(sub)
    return p


def _add_compress(sub) -> None:
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
    k.add_argument("--sequential", choices=("auto", "stash", "recompute"), default="auto",
                   help="how each linear group's inputs are made once the earlier groups "
                        "are quantized: 'stash' runs each batch through the block once, "
                        "paused at every group (fastest, holds the paused activations), "
                        "'recompute' re-runs the block up to each group (~2.3x the forward "
                        "work, least memory), 'auto' stashes when that fits in a quarter of "
                        "the free memory. A resumed run keeps its first run's choice")
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


def _add_finetune(sub) -> None:
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


def _add_export(sub) -> None:
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


def _add_eval(sub) -> None:
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


def _add_inspect(sub) -> None:
    i = sub.add_parser("inspect", help="size, bits/weight and per-layer scheme of a checkpoint")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--histogram", action="store_true", help="also show code histograms")


def _add_generate(sub) -> None:
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


def _add_sample(sub) -> None:
    sm = sub.add_parser("sample", help="sample images from a cachequant directory")
    sm.add_argument("dir", help="directory written by compress --method cachequant")
    sm.add_argument("--n", type=int, default=64, help="images (default 64)")
    sm.add_argument("--out", required=True, help="PNG grid to write")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--force", action="store_true", help="replace an existing --out file")
