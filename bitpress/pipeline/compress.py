"""``bitpress compress``: source checkpoint → packed bitpress checkpoint."""
from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, OutputExistsError
from ..nn import Recipe, replace_linears, target_linears
from ..nn.recipe import rtn_quantize_linear
from .checkpoint import save
from .source import open_source

log = logging.getLogger(__name__)

#: data-free methods that need no calibration; calibrated methods are added by the
#: streaming pipeline
METHODS = ("rtn",)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def compress(src: str | os.PathLike, out: str | os.PathLike, recipe: Recipe,
             overwrite: bool = False, progress: bool = True,
             dtype: Optional[torch.dtype] = torch.float16) -> dict[str, Any]:
    """Compress ``src`` with ``recipe`` and write a bitpress checkpoint to ``out``.

    Everything that can be checked is checked before the model is loaded; the output is
    written atomically, so a failure leaves neither a partial ``out`` nor a changed ``src``.
    ``dtype`` is the storage dtype of the tensors left unquantized (embeddings, norms).
    """
    if recipe.method not in METHODS:
        raise ConfigError(f"unknown method {recipe.method!r}; available: {', '.join(METHODS)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {out} already exists; choose another path "
                                f"or pass --force to replace it")
    source = open_source(src)
    if source.kind == "bitpress":
        raise ConfigError(f"{src} is already a bitpress checkpoint; compress the original model")
    t0 = time.time()
    model = source.load_model(torch.float32)
    tokenizer = source.load_tokenizer()
    summary = compress_model(model, tokenizer, recipe, out, overwrite=overwrite,
                             progress=progress, dtype=dtype, source=str(source.path))
    summary["seconds_load"] = round(time.time() - t0 - summary["seconds_quantize"], 2)
    return summary


def compress_model(model, tokenizer, recipe: Recipe, out: str | os.PathLike,
                   overwrite: bool = False, progress: bool = True,
                   dtype: Optional[torch.dtype] = torch.float16,
                   source: Optional[str] = None) -> dict[str, Any]:
    """Compress an already loaded float model **in place** and save it to ``out``."""
    if recipe.method not in METHODS:
        raise ConfigError(f"unknown method {recipe.method!r}; available: {', '.join(METHODS)}")
    targets = [n for n, _ in target_linears(model, recipe)]
    if not targets:
        raise ConfigError("the recipe selects no linear layer of this model; check --targets / "
                          "--ignore")
    bar = tqdm(total=len(targets), desc=f"{recipe.method} W{recipe.bits}", unit="linear",
               disable=not progress)
    errors: dict[str, float] = {}

    def quantize(name: str, w: torch.Tensor):
        qw = rtn_quantize_linear(w, recipe)
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
