"""End-to-end fine-tuning of the float parts of a packed model (decoupleQ's float-part
fine-tuning, issue 4 item 4; GQSA's E2E-OQP, issue 6 item 3).

Only the scales and zeros of every :class:`~bitpress.nn.QuantLinear` /
:class:`~bitpress.nn.GroupSparseLinear` (and, optionally, the normalisation weights) are
trained, on the causal-LM loss (next-token cross-entropy, or distillation from the
full-precision model: the KL divergence from its next-token distribution); codes, group
masks, embeddings, the head and every other tensor stay frozen. The packed modules run
through the ``bitpress`` ops, whose autograd formulas give the gradients of ``x``,
``scales`` and ``zeros`` directly, so no float copy of any weight matrix is made.
Scales/zeros are trained as float32 master copies and cast back to their storage dtype at
the end.

:func:`write_float_parts` writes the tuned values back into a packed checkpoint directory
atomically: every safetensors shard is rewritten with only the float-part tensors replaced
(cast to their stored dtype), so codes, indices and every other tensor are byte-identical,
and the other files (config, tokenizer, summary) are copied unchanged.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConfigError, FormatError
from .blocktune import norm_parameters
from .evaluate import next_token_loss

log = logging.getLogger(__name__)

#: learning-rate schedules of :func:`finetune_float_parts`
SCHEDULES = ("constant", "cosine")
#: training losses of :func:`finetune_float_parts`: next-token cross-entropy, or
#: distillation (KL divergence from a full-precision teacher's next-token distribution)
LOSSES = ("ce", "kd")
# Adam lr of scales/zeros (and norms). Measured on SmolLM2-135M, one epoch of 128 x 512 tokens
# of WikiText-2 valid (bench/RESULTS.md "E2E-OQP"): GQSA W4 g16 S50 WikiText-2 test 90.79 ->
# 60.46 (1e-5), 43.26 (1e-4), 55.15 (3e-4); decoupleQ W2 g64 43.71 -> 25.68 (1e-4).
DEFAULT_LR = 1e-4
FINETUNE_RECORD = "bitpress_finetune.json"


def _packed_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "float_parts_trainable")}


def _windows(data: Any, seqlen: Optional[int]) -> torch.Tensor:
    """``[n, L]`` long windows from a 2-D tensor (as given) or a 1-D token stream (cut into
    non-overlapping windows of ``seqlen``; a trailing partial window is dropped)."""
    if not isinstance(data, torch.Tensor):
        try:
            data = torch.as_tensor(data, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError("fine-tuning data must be token ids: a [n, seqlen] or 1-D "
                              "integer tensor") from None
    if data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
        raise ConfigError(f"fine-tuning data must be integer token ids, got {data.dtype}")
    data = data.long()
    if data.dim() == 1:
        if seqlen is None:
            raise ConfigError("give seqlen to cut a 1-D token stream into windows")
        if seqlen < 2:
            raise ConfigError(f"seqlen must be at least 2, got {seqlen}")
        n = data.numel() // seqlen
        data = data[: n * seqlen].view(n, seqlen)
    elif data.dim() == 2:
        if seqlen is not None and data.shape[1] != seqlen:
            if data.shape[1] < seqlen:
                raise ConfigError(f"data windows have {data.shape[1]} tokens, fewer than "
                                  f"seqlen {seqlen}")
            data = data[:, :seqlen]
    else:
        raise ConfigError(f"fine-tuning data must be 1-D or 2-D token ids, got shape "
                          f"{tuple(data.shape)}")
    if data.shape[0] == 0 or data.shape[1] < 2:
        raise ConfigError("fine-tuning data is empty: need at least one window of 2 or more "
                          "tokens")
    return data


def _lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return next_token_loss(model, batch)[0]


def _vocab(model: nn.Module) -> Optional[int]:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w = getattr(out, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _kd_loss(model: nn.Module, teacher: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions (terms
    where the teacher's probability is 0, e.g. logits masked to -inf, count 0)."""
    with torch.no_grad():
        t = teacher(input_ids=batch, use_cache=False).logits.float()
        t = torch.log_softmax(t.reshape(-1, t.shape[-1]), dim=-1)
        p = t.exp()
    s = model(input_ids=batch, use_cache=False).logits.float()
    s = torch.log_softmax(s.reshape(-1, s.shape[-1]), dim=-1)
    return torch.where(p > 0, p * (t - s), 0.0).sum(-1).mean()


@torch.no_grad()
def lm_loss(model: nn.Module, data: torch.Tensor, batch_size: int = 1) -> float:
    """Mean next-token cross-entropy of ``model`` over windows ``data`` ``[n, L]``."""
    total, count = 0.0, 0
    for i in range(0, data.shape[0], batch_size):
        b = data[i:i + batch_size]
        n = b[:, 1:].numel()
        total += float(_lm_loss(model, b)) * n
        count += n
    return total / max(count, 1)


def finetune_float_parts(model: nn.Module, data: Any, *, steps: Optional[int] = None,
                         epochs: int = 1, lr: float = DEFAULT_LR, batch_size: int = 1,
                         seqlen: Optional[int] = None, train_norms: bool = True,
                         norm_lr: Optional[float] = None, seed: int = 0,
                         schedule: str = "constant", loss: Optional[str] = None,
                         teacher: Optional[nn.Module] = None,
                         evaluate: bool = False, progress: bool = True,
                         integer_zeros: bool = False) -> dict[str, Any]:
    """Train only the scales/zeros of every packed module of ``model`` (and its norm weights
    when ``train_norms``) with Adam on the causal-LM loss of ``data`` (cross-entropy, or
    distillation from ``teacher``); in place.

    ``data``: token ids, ``[n, L]`` windows or a 1-D stream (cut into ``seqlen`` windows).
    ``steps``: optimizer steps (cycling over shuffled windows, ``batch_size`` per step);
    default ``epochs`` passes. ``norm_lr`` defaults to ``lr``. ``schedule``: ``"constant"``
    learning rates, or ``"cosine"`` (each decays from its value to 0 along a half cosine over
    the run's steps). ``loss``: ``"ce"`` (next-token cross-entropy on ``data``) or ``"kd"``
    (distillation: KL divergence from ``teacher``'s next-token distribution at every position
    of ``data``; ``teacher`` is the full-precision model, run without gradients); default
    ``"kd"`` when a teacher is given, else ``"ce"``. ``evaluate``: also measure the
    cross-entropy over all of ``data`` before and after (two extra forward passes).
    ``integer_zeros``: every offset stays tied to its scale, ``z = -zp·s`` with the integer
    zero point ``zp = clamp(round(-z/s))`` of the loaded model frozen (the gradient of ``z``
    flows into ``s``); at the end ``s`` is snapped so that ``zp·s`` is exact in the storage
    dtype, and the model stays exportable to compressed-tensors without rounding (a model
    whose zeros were off the grid is moved onto it first).

    Codes and masks never change; scales/zeros end in their original storage dtype (the
    model is ready for :func:`write_float_parts`). Returns a JSON-able summary (losses per
    step, first/last averages, seconds, counts). Raises :class:`ConfigError` on bad input
    before anything is changed."""
    from tqdm.auto import tqdm

    mods = _packed_modules(model)
    if not mods:
        raise ConfigError("the model has no packed (QuantLinear / GroupSparseLinear) modules; "
                          "float-part fine-tuning needs a compressed model (bitpress.load)")
    win = _windows(data, seqlen)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
    for name, v in (("lr", lr), ("norm_lr", norm_lr)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{name} must be a positive number, got {v!r}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if loss is None:
        loss = "kd" if teacher is not None else "ce"
    if loss not in LOSSES:
        raise ConfigError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "kd" and teacher is None:
        raise ConfigError("the distillation loss needs a teacher model (the full-precision "
                          "source)")
    if loss == "ce" and teacher is not None:
        raise ConfigError("a teacher is only used by the distillation loss (loss='kd')")
    if teacher is not None:
        if not isinstance(teacher, nn.Module):
            raise ConfigError(f"the teacher must be a torch model, got {type(teacher).__name__}")
        if _packed_modules(teacher):
            raise ConfigError("the teacher is a packed (compressed) model; distil from the "
                              "full-precision source")
        if {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}:
            raise ConfigError("the teacher shares tensors with the model being fine-tuned; "
                              "give a separate full-precision model")
        tv, mv = _vocab(teacher), _vocab(model)
        if tv != mv:
            raise ConfigError(f"the teacher has {tv} output logits, the model {mv}: "
                              f"distillation needs the same vocabulary")
    per_epoch = math.ceil(win.shape[0] / batch_size)
    total = steps if steps is not None else epochs * per_epoch

    t0 = time.time()
    was_training = model.training
    model.eval()  # no dropout: the float parts are fitted to the deterministic model
    flags = {id(p): p.requires_grad for p in model.parameters()}
    norms = norm_parameters(model) if train_norms else {}
    result: dict[str, Any] = {"lr": lr, "norm_lr": norm_lr if norm_lr is not None else lr,
                              "schedule": schedule, "loss": loss,
                              "batch_size": batch_size, "seqlen": int(win.shape[1]),
                              "windows": int(win.shape[0]), "steps": total,
                              "epochs": round(total / per_epoch, 3), "train_norms": train_norms,
                              "packed_modules": len(mods), "norm_tensors": len(norms)}
    if integer_zeros:
        result["integer_zeros"] = True
    tied: dict[str, torch.Tensor] = {}  # module name -> frozen integer zero points
    if evaluate:
        result["loss_before"] = lm_loss(model, win, batch_size)
    sz: list[nn.Parameter] = []
    losses: list[float] = []
    t_training = teacher.training if teacher is not None else False
    try:
        if teacher is not None:
            teacher.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for m in mods.values():
            for p in m.float_parts_trainable(True):
                p.requires_grad_(False)
            sz += [m.scales, m.zeros]
        if integer_zeros:
            for name, m in mods.items():
                zp = _integer_zero_points(m)
                if zp is not None:
                    tied[name] = zp
                    m.zeros.data.copy_(-zp * m.scales.data)
                    sz = [p for p in sz if p is not m.zeros]  # z follows s: not trained
        for p in sz:
            p.requires_grad_(True)
        for name in tied:
            mods[name].zeros.requires_grad_(True)  # its gradient is chained into s
        for p in norms.values():
            p.requires_grad_(True)
        result["trainable_parameters"] = sum(p.numel() for p in sz) + \
            sum(p.numel() for p in norms.values())
        groups = [{"params": sz, "lr": lr}]
        if norms:
            groups.append({"params": list(norms.values()),
                           "lr": norm_lr if norm_lr is not None else lr})
        opt = torch.optim.Adam(groups)
        sched = None
        if schedule == "cosine":
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * min(i, total) / total)))
        g = torch.Generator().manual_seed(seed)
        order: list[int] = []
        bar = tqdm(total=total, desc="finetune float parts", unit="step", disable=not progress)
        with torch.enable_grad():
            for _ in range(total):
                if len(order) < batch_size:
                    order += torch.randperm(win.shape[0], generator=g).tolist()
                idx, order = order[:batch_size], order[batch_size:]
                if loss == "kd":
                    value = _kd_loss(model, teacher, win[idx])
                else:
                    value = _lm_loss(model, win[idx])
                if not torch.isfinite(value):
                    raise FloatingPointError("the fine-tuning loss is not finite; lower --lr")
                opt.zero_grad(set_to_none=True)
                value.backward()
                _tie_gradients(mods, tied)
                opt.step()
                _tie_zeros(mods, tied)
                if sched is not None:
                    sched.step()
                losses.append(float(value.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
        bar.close()
    finally:
        _snap_tied(mods, tied)
        for m in mods.values():
            m.float_parts_trainable(False)  # back to buffers in their storage dtype
            m.__dict__.pop("_impl_cache", None)
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
            p.grad = None
        model.train(was_training)
        if teacher is not None:
            teacher.train(t_training)
    k = min(10, len(losses))
    result.update({"losses": [round(x, 5) for x in losses],
                   "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
                   "seconds": round(time.time() - t0, 2)})
    if evaluate:
        result["loss_after"] = lm_loss(model, win, batch_size)
    log.info("float-part fine-tuning: %d steps, loss %.4f -> %.4f (%.1f s)", total,
             result["loss_first"], result["loss_last"], result["seconds"])
    return result


def _integer_zero_points(m: nn.Module) -> Optional[torch.Tensor]:
    """Frozen integer zero points of a packed module (float32), ``None`` if symmetric."""
    from ..formats import zero_points

    if not bool((m.zeros != 0).any()):
        return None
    return zero_points(m.scales, m.zeros, m.bits).float()


@torch.no_grad()
def _tie_gradients(mods: dict[str, nn.Module], tied: dict[str, torch.Tensor]) -> None:
    """``z = -zp·s``: ``dL/ds += -zp·dL/dz`` (the chain rule of the tied offsets)."""
    for name, zp in tied.items():
        m = mods[name]
        if m.zeros.grad is not None:
            if m.scales.grad is None:
                m.scales.grad = torch.zeros_like(m.scales)
            m.scales.grad.add_(-zp * m.zeros.grad)
            m.zeros.grad = None


@torch.no_grad()
def _tie_zeros(mods: dict[str, nn.Module], tied: dict[str, torch.Tensor]) -> None:
    for name, zp in tied.items():
        m = mods[name]
        m.zeros.copy_(-zp * m.scales)


@torch.no_grad()
def _snap_tied(mods: dict[str, nn.Module], tied: dict[str, torch.Tensor]) -> None:
    """Scales with ``s`` and ``zp·s`` exact in the storage dtype, zeros ``-zp·s``."""
    from ..formats import integer_zero_params

    for name, zp in tied.items():
        m = mods[name]
        dt = getattr(m, "_orig_dtypes", {}).get("scales", m.scales.dtype)
        s, z = integer_zero_params(m.scales, m.zeros, m.bits, dt, zp=zp)
        m.scales.copy_(s)
        m.zeros.copy_(z)


def float_part_names(model: nn.Module, norms: bool = True) -> list[str]:
    """State-dict names of the tensors :func:`finetune_float_parts` may change."""
    names = [f"{n}.{t}" for n in _packed_modules(model) for t in ("scales", "zeros")]
    if norms:
        names += list(norm_parameters(model))
    return names


def write_float_parts(model: nn.Module, directory: str | os.PathLike,
                      out: Optional[str | os.PathLike] = None, *, overwrite: bool = False,
                      norms: bool = True, record: Optional[dict[str, Any]] = None) -> Path:
    """Write ``model``'s scales/zeros (and norm weights) into the packed checkpoint
    ``directory`` — in place (``out=None``) or as a new checkpoint ``out`` — atomically.

    Every shard is rewritten with only those tensors replaced, cast to their stored dtype;
    codes, indices and every other tensor stay byte-identical, other files are copied. The
    model's norm weights are rounded to the stored dtype in memory as well, so the model and
    the written checkpoint give the same outputs. ``record`` (e.g. the summary returned by
    :func:`finetune_float_parts`) is appended to ``bitpress_finetune.json``."""
    from safetensors import safe_open

    from ..formats import SafetensorsDir, atomic_output_dir
    from ..formats.checkpoint import save_safetensors, write_json

    src = Path(directory)
    files = SafetensorsDir(src)
    if not (src / "config.json").is_file():
        raise FormatError(f"{src} has no config.json; is it a bitpress checkpoint?")
    if not _packed_modules(model):
        raise ConfigError("the model has no packed modules; nothing to write")
    sd = model.state_dict()
    updates: dict[str, torch.Tensor] = {}
    for name in float_part_names(model, norms):
        if name not in files:
            raise FormatError(f"{src} has no tensor {name!r}; is it the checkpoint this model "
                              f"was loaded from?")
        t = sd[name].detach()
        if tuple(t.shape) != tuple(files.shapes[name]):
            raise FormatError(f"tensor {name!r}: the model has shape {tuple(t.shape)}, {src} "
                              f"has {tuple(files.shapes[name])}")
        if not bool(torch.isfinite(t).all()):
            raise FormatError(f"tensor {name!r} has non-finite values; not written")
        updates[name] = t
    target = Path(out) if out is not None else src
    in_place = target.absolute() == src.absolute()
    written: dict[str, torch.Tensor] = {}
    with atomic_output_dir(target, overwrite=overwrite or in_place) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)
        for fname in files.files:
            with safe_open(str(src / fname), framework="pt") as fh:
                meta = fh.metadata()
                tensors = {}
                for k in fh.keys():
                    t = fh.get_tensor(k)
                    if k in updates:
                        new = updates[k].to(t.dtype).contiguous()
                        if not bool(torch.isfinite(new).all()):
                            raise FormatError(f"tensor {k!r} overflows {t.dtype}; not written")
                        written[k] = new
                        t = new
                    tensors[k] = t
            save_safetensors(tensors, tmp / fname, metadata=meta)
        if record is not None:
            prev = tmp / FINETUNE_RECORD
            runs = []
            if prev.is_file():
                import json

                try:
                    runs = list(json.loads(prev.read_text()).get("runs", []))
                except (ValueError, AttributeError):
                    runs = []
            write_json(prev, {"runs": runs + [record]})
    with torch.no_grad():  # the model now equals the checkpoint (storage-dtype rounding)
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for k, t in written.items():
            ref = params.get(k, buffers.get(k))
            if ref is not None:
                ref.copy_(t.to(ref.dtype))
    return target
