"""Block-wise minimisation of a quantized decoder block against the float block's outputs.

The streaming pipeline (:func:`bitpress.pipeline.stream.stream_quantize`) calls a *block
hook* once every target linear of a block has been solved; the hook sees the block (its
linears hold the dequantised weights), the quantized model's inputs to the block and the
outputs it is tuned towards (``ctx.targets``): the *float* block's outputs on the same inputs
(target ``"block"``) or the float model's own hidden states after the block (``"model"``,
the default of ``bqpo``). :func:`make_block_tuner`
builds such a hook. Two modes:

* ``"float_parts"`` (decoupleQ, issue 4 item 3): the integer codes are frozen; float32
  master copies of every linear's scale and zero (per row and group) and the block's norm
  weights are trained with Adam on the mean squared error of the block output.
* ``"bqpo"`` (GQSA's block-wise quantization-pruning optimisation, issue 6 item 2): the
  group mask is frozen; the kept weights are trained with straight-through rounding onto the
  current grid, together with ``s``, ``z`` and the norms. By default the kept weights are
  held in code units, ``V = s·U + z`` with ``U`` initialised at the codes and the forward
  using ``W = keep·(s·clamp(round_ste(U)) + z)``: with ``U`` fixed this is exactly
  ``float_parts``, and ``U`` crossing a half step changes a code. (``latent="weight"``
  holds ``V`` itself and re-rounds it onto the moving grid, ``round((V − z)/s)``: moving
  ``s``, ``z`` then re-rounds the same weights instead of moving them, which measured worse
  on SmolLM2 unless ``V`` is trained with a large learning rate.) Afterwards the codes are
  re-derived, ``clamp(round((V − z)/s)) = clamp(round(U))``, and stored with the trained
  (storage-rounded) ``s``, ``z``; pruned groups stay pruned (their codes and parameters are
  left as they were).

Per block the output loss on the calibration batches is measured before and after tuning,
with the weights exactly as the pipeline will use them (parameters rounded to the storage
dtype); a block whose loss did not drop keeps its untuned parameters and norms (logged), so
tuning never makes a block worse on the calibration data.

Norm weights are changed in place in ``ctx.block``, so the pipeline's packed model (and the
saved checkpoint) keeps them. Norm parameters are found generically: every parameter of a
non-linear sub-module whose class name contains ``Norm`` (``LayerNorm``, ``LlamaRMSNorm``,
GPT-2's ``ln_1``/``ln_2``, Qwen3's ``q_norm``...) or whose qualified name contains ``norm``.

Memory: the targets are the ones the pipeline already holds; training slices them (views,
no copies); the block's solved float weights are released while it trains (and set again
from the parameters after). The hook adds, per target linear, float32 codes and the trainable parameters
with their Adam state (``bqpo``: ``V`` and its two Adam moments, i.e. three float32 copies
of the block's linear weights), and the activations of one micro-batch's backward pass.

This module depends on the block only through ``BlockContext``'s fields and
``ctx.inputs.extra`` (the per-batch-size extra arguments of the block call), which it slices
along the batch dimension to run micro-batches smaller than a calibration batch.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from ..errors import ConfigError, FormatError
from ..formats import QuantizedWeight, zero_points

from ..quant.tunable import TunedLinear

if TYPE_CHECKING:  # the driver owns the context; nothing here imports it at run time
    from .stream import BlockContext

log = logging.getLogger(__name__)

MODES = ("float_parts", "bqpo")
#: Block-output losses: ``"mse"`` — mean squared error over every element; ``"token"`` — each
#: token's squared error divided by its target's squared norm, averaged over tokens (the error
#: as the next block's RMSNorm/LayerNorm sees it). See :func:`make_block_tuner`.
LOSSES = ("mse", "token")
#: Default loss per mode. ``bqpo``: ``"token"`` — on SmolLM2-135M GQSA W4 g16 S50 it let BQPO
#: improve 26 of 30 blocks (``"mse"``: 18) and took WikiText-2 perplexity from 102.85 to 90.79.
#: ``float_parts`` keeps ``"mse"``, with which decoupleQ's rows were measured.
DEFAULT_LOSS = {"float_parts": "mse", "bqpo": "token"}
#: What a block's output is trained towards (see :func:`make_block_tuner`, ``target``).
TARGETS = ("block", "model")
#: Default target per mode. ``bqpo``: ``"model"`` — on SmolLM2-135M GQSA W4 g16 it kept every
#: block (``"block"``: 26–29 of 30) and took WikiText-2 perplexity before E2E from 90.79 to
#: 66.08 at S50 (128 × 512 calibration, all steps) and from 58.20 to 49.69 at S30 (32 × 512,
#: 32 steps; 28.59 → 28.02 after the same E2E). ``float_parts`` keeps ``"block"`` (decoupleQ's
#: rows were measured with it; ``"model"`` is not measured there).
DEFAULT_TARGET = {"float_parts": "block", "bqpo": "model"}
#: Defaults, tuned on SmolLM2-135M (decoupleQ W2 g64 and GQSA W4 S50 g16, WikiText-2 valid
#: calibration windows of 512 tokens; block output MSE on a held-out calibration batch, blocks
#: 0-2). The paper's lr 1e-5 × 4 epochs recovers little here: held-out loss -13 % / -5 % /
#: -12 % on blocks 0/1/2 against -23 % / -15 % / -23 % at lr 1e-3 (1e-4: -19 % / -12 % / -23 %),
#: 96 steps each. One Adam step per sample beats one per calibration batch of 8 at the same
#: cost (-19 % vs -13 %, block 0, lr 1e-4). One epoch keeps a 128-sample calibration at 128
#: steps per block — the tuning costs about as much as the layer solver, four epochs would
#: quadruple it. BQPO's code-unit latent lr 5e-2 lets codes move within one epoch: GQSA block 0
#: held-out -48 % against -39 % for float parts only (latent lr 1e-2 moved no code in 40 steps).
DEFAULT_EPOCHS = 1
DEFAULT_LR = 1e-3
DEFAULT_MICRO_BATCH = 1
DEFAULT_CODE_LR = 5e-2


# ---------------------------------------------------------------------------------------
# generic helpers (linears, norms, slicing the block call)
# ---------------------------------------------------------------------------------------
def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _weight_of(m: nn.Module) -> torch.Tensor:
    """``[out, in]`` view of an ``nn.Linear`` or GPT-2 ``Conv1D`` weight (``[in, out]``)."""
    w = m.weight.detach()
    return w.t() if type(m).__name__ == "Conv1D" else w


def _set_weight(m: nn.Module, w: torch.Tensor) -> None:
    w = w.t().contiguous() if type(m).__name__ == "Conv1D" else w.contiguous()
    m.weight.data = w.to(m.weight.dtype)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def norm_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Qualified name → parameter of every normalisation weight/bias inside ``module``.

    A parameter counts when its owning module's class name contains ``Norm`` (LayerNorm,
    RMSNorm and their model-specific subclasses; GPT-2's ``ln_1``) or when its qualified name
    contains ``norm``; parameters of linear layers and of the packed modules never count."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for mname, m in module.named_modules():
        if _is_linear(m) or hasattr(m, "float_parts_trainable"):
            continue
        norm_mod = "norm" in type(m).__name__.lower()
        for pname, p in m.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if (norm_mod or "norm" in full.lower()) and id(p) not in seen \
                    and p.is_floating_point():
                seen.add(id(p))
                out[full] = p
    return out


def _slice_batch(obj: Any, B: int, j: int, mb: int) -> Any:
    """Slice every tensor of ``obj`` (nested tuples/lists/dicts) whose first dimension is the
    batch ``B`` (and that has at least 2 dimensions: 1-D tensors such as ``cache_position``
    are not batch-indexed) to ``[j:j+mb]``; broadcast tensors (first dim 1) stay."""
    if isinstance(obj, torch.Tensor):
        return obj[j:j + mb] if obj.dim() >= 2 and obj.shape[0] == B and B > 1 else obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_slice_batch(o, B, j, mb) for o in obj)
    if isinstance(obj, list):
        return [_slice_batch(o, B, j, mb) for o in obj]
    if isinstance(obj, dict):
        return {k: _slice_batch(v, B, j, mb) for k, v in obj.items()}
    return obj


def _call_block(ctx: "BlockContext", k: int, j: int = 0, mb: Optional[int] = None
                ) -> torch.Tensor:
    """The block's output on samples ``j:j+mb`` of calibration batch ``k``."""
    h = ctx.hidden[k]
    B = h.shape[0]
    if mb is None or (j == 0 and mb >= B):
        return ctx.inputs.call(ctx.block, ctx.index, h)
    args, kwargs = ctx.inputs.extra[ctx.index][B]
    out = ctx.block(h[j:j + mb], *_slice_batch(args, B, j, mb),
                    **_slice_batch(kwargs, B, j, mb))
    return out[0] if isinstance(out, (tuple, list)) else out


def _loss_terms(out: torch.Tensor, target: torch.Tensor, kind: str
                ) -> tuple[torch.Tensor, int]:
    """``(sum, count)`` of the block-output loss ``kind`` on one batch: the loss is
    ``sum / count``, and sums and counts of several batches add up to the whole-set loss.
    ``"mse"``: squared errors over elements; ``"token"``: per token (every index but the last
    dimension) ``‖e‖² / ‖y‖²`` over its channels."""
    e = (out.float() - target.float()).pow(2)
    if kind == "mse":
        return e.sum(), e.numel()
    y2 = target.float().pow(2).sum(-1).clamp_min(1e-12)
    r = e.sum(-1) / y2
    return r.sum(), r.numel()


@torch.no_grad()
def block_output_loss(ctx: "BlockContext", outputs: Optional[list[torch.Tensor]] = None,
                      keep: Optional[list[torch.Tensor]] = None, loss: str = "mse") -> float:
    """The block-output loss against ``ctx.targets`` over every calibration batch:
    ``loss="mse"`` the mean squared error (element-weighted), ``"token"`` the mean over tokens
    of ``‖out − target‖² / ‖target‖²``. ``outputs``: the block's outputs when already known
    (no forward is run); ``keep``: a list that receives the outputs."""
    if loss not in LOSSES:
        raise ConfigError(f"unknown block loss {loss!r}; choose one of {', '.join(LOSSES)}")
    total, count = 0.0, 0
    for k, t in enumerate(ctx.targets):
        out = outputs[k] if outputs is not None else _call_block(ctx, k)
        sm, n = _loss_terms(out, t, loss)
        total += float(sm)
        count += n
        if keep is not None:
            keep.append(out)
    if count == 0:
        raise ConfigError("block tuning needs calibration batches (ctx.targets is empty)")
    return total / count


# ---------------------------------------------------------------------------------------
# the hook
# ---------------------------------------------------------------------------------------
@dataclass
class BlockTuneRecord:
    """What tuning did to one block (losses: MSE of the block output vs the targets)."""
    block: int
    name: str
    loss_before: float
    loss_after: float
    accepted: bool
    steps: int
    seconds: float
    loss: str = "mse"

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block, "name": self.name, "loss_before": self.loss_before,
                "loss_after": self.loss_after, "accepted": self.accepted, "steps": self.steps,
                "seconds": round(self.seconds, 3), "loss": self.loss}


@dataclass
class BlockTuner:
    """A :data:`~bitpress.pipeline.stream.BlockHook` that tunes each block; build it with
    :func:`make_block_tuner`. ``records`` collects one :class:`BlockTuneRecord` per block."""
    mode: str = "float_parts"
    epochs: int = DEFAULT_EPOCHS
    lr: float = DEFAULT_LR
    norm_lr: Optional[float] = None
    latent_lr: Optional[float] = None
    latent: str = "code"
    micro_batch: Optional[int] = DEFAULT_MICRO_BATCH
    train_norms: bool = True
    param_dtype: Optional[torch.dtype] = torch.float16
    seed: int = 0
    progress: bool = True
    steps: Optional[int] = None
    relative: bool = False
    loss: str = "mse"
    target: str = "block"
    records: list[BlockTuneRecord] = field(default_factory=list)
    integer_zeros: bool = False

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def options(self) -> dict[str, Any]:
        return {"mode": self.mode, "epochs": self.epochs, "lr": self.lr,
                "norm_lr": self._norm_lr(), "relative": self.relative, "loss": self.loss,
                "latent": self.latent if self.mode == "bqpo" else None,
                "latent_lr": self._latent_lr() if self.mode == "bqpo" else None,
                "micro_batch": self.micro_batch, "steps": self.steps,
                "train_norms": self.train_norms, "target": self.target,
                **({"integer_zeros": True} if self.integer_zeros else {}),
                "param_dtype": str(self.param_dtype).replace("torch.", "")}

    def _norm_lr(self) -> float:
        if self.norm_lr is not None:
            return self.norm_lr
        return DEFAULT_LR if self.relative else self.lr  # a relative lr is no lr for norm weights

    def _latent_lr(self) -> float:
        if self.latent_lr is not None:
            return self.latent_lr
        return DEFAULT_CODE_LR if self.latent == "code" else self.lr

    def __call__(self, ctx: "BlockContext") -> Optional[dict[str, QuantizedWeight]]:
        with torch.enable_grad():
            return self._tune(ctx)

    # -----------------------------------------------------------------------------------
    def _tune(self, ctx: "BlockContext") -> Optional[dict[str, QuantizedWeight]]:
        t0 = time.time()
        if not ctx.targets or len(ctx.targets) != len(ctx.hidden):
            raise ConfigError("block tuning needs the float block's outputs on the "
                              "calibration batches (run with calibration data)")
        if not ctx.qweights:
            ctx.outputs_after = getattr(ctx, "outputs", None)
            return None
        block = ctx.block
        norms = norm_parameters(block) if self.train_norms else {}
        norm_backup = {n: p.detach().clone() for n, p in norms.items()}
        flags = {id(p): p.requires_grad for p in block.parameters()}
        before = getattr(ctx, "outputs", None)
        loss_before = block_output_loss(ctx, before, loss=self.loss)

        originals = {n: block.get_submodule(n) for n in ctx.qweights}
        tuned: dict[str, TunedLinear] = {}
        for n, qw in ctx.qweights.items():
            m = originals[n]
            bias = m.bias if getattr(m, "bias", None) is not None else None
            train_zero = bool((qw.zero != 0).any())  # a symmetric grid keeps zero = 0
            zp = zero_points(qw.scale, qw.zero, qw.bits) if self.integer_zeros and train_zero \
                else None
            tuned[n] = TunedLinear(qw, bias, self.mode, train_zero, self.latent, self.relative,
                                   zp)
        # the solved float weights are not read again (they are set from the tuned or the
        # solved parameters afterwards): release them while training holds its own copies
        # (1.27 GB for a 13B-shaped block)
        for m in originals.values():
            m.weight.data = m.weight.data.new_empty(0)
        steps = 0
        try:
            for p in block.parameters():
                p.requires_grad_(False)
            for n, t in tuned.items():
                _set_submodule(block, n, t)
            for p in norms.values():
                p.requires_grad_(True)
            steps = self._train(ctx, tuned, norms)
        finally:
            for n, m in originals.items():
                _set_submodule(block, n, m)
            for p in block.parameters():
                p.requires_grad_(flags.get(id(p), p.requires_grad))
            for p in norms.values():
                p.grad = None

        try:
            new = {n: t.result(ctx.qweights[n], self.param_dtype) for n, t in tuned.items()}
        except FormatError as e:  # training diverged (non-finite parameters): rejected below
            log.warning("block tune %s: %s; keeping the solved weights", ctx.name, e)
            new = dict(ctx.qweights)
        del tuned
        with torch.no_grad():
            for n, qw in new.items():
                _set_weight(originals[n], qw.dequantize())
            after: list[torch.Tensor] = []
            loss_after = block_output_loss(ctx, keep=after, loss=self.loss)
            accepted = math.isfinite(loss_after) and loss_after < loss_before
            if not accepted:
                for n, qw in ctx.qweights.items():
                    _set_weight(originals[n], qw.dequantize())
                for n, p in norms.items():
                    p.data.copy_(norm_backup[n])
            # the block's outputs as it now stands feed the next block (no re-run)
            ctx.outputs_after = after if accepted else before
            del after
        rec = BlockTuneRecord(ctx.index, ctx.name, loss_before, loss_after, accepted, steps,
                              time.time() - t0, self.loss)
        self.records.append(rec)
        if accepted:
            log.info("block tune %s (%s): loss %.4g -> %.4g (%.1f%%), %d steps, %.1f s",
                     ctx.name, self.mode, loss_before, loss_after,
                     100 * (loss_after / max(loss_before, 1e-30) - 1), steps, rec.seconds)
        else:
            log.info("block tune %s (%s): loss %.4g -> %.4g did not improve; kept the untuned "
                     "parameters (%.1f s)", ctx.name, self.mode, loss_before, loss_after,
                     rec.seconds)
        return new if accepted else None

    def _train(self, ctx: "BlockContext", tuned: dict[str, TunedLinear],
               norms: dict[str, nn.Parameter]) -> int:
        from tqdm.auto import tqdm

        groups: list[dict[str, Any]] = []
        sz = [p for t in tuned.values() for p in t.trainable_params()]
        groups.append({"params": sz, "lr": self.lr})
        latents = [t.latent for t in tuned.values() if t.latent is not None]
        if latents:
            groups.append({"params": latents, "lr": self._latent_lr()})
        if norms:
            groups.append({"params": list(norms.values()), "lr": self._norm_lr()})
        opt = torch.optim.Adam(groups)
        chunks = []
        for k, h in enumerate(ctx.hidden):
            B = h.shape[0]
            mb = B if self.micro_batch is None else min(self.micro_batch, B)
            chunks += [(k, j, min(mb, B - j)) for j in range(0, B, mb)]
        g = torch.Generator().manual_seed(self.seed)
        total = self.epochs * len(chunks)
        if self.steps is not None:
            total = min(total, self.steps)
        bar = tqdm(total=total, desc=f"tune {ctx.name}", unit="step", leave=False,
                   disable=not self.progress)
        steps = 0
        try:
            for _ in range(self.epochs):
                run, n_run = 0.0, 0
                for i in torch.randperm(len(chunks), generator=g, device="cpu").tolist():
                    if steps >= total:
                        break
                    k, j, mb = chunks[i]
                    out = _call_block(ctx, k, j, mb)
                    target = ctx.targets[k][j:j + mb]
                    sm, n = _loss_terms(out, target, self.loss)
                    loss = sm / n
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    for t in tuned.values():
                        t.after_step()
                    steps += 1
                    run, n_run = run + float(loss.detach()), n_run + 1
                    bar.update(1)
                    if n_run % 8 == 0:
                        bar.set_postfix(loss=f"{run / n_run:.4g}")
        finally:
            bar.close()
        return steps


def make_block_tuner(mode: str = "float_parts", *, epochs: int = DEFAULT_EPOCHS,
                     lr: float = DEFAULT_LR, norm_lr: Optional[float] = None,
                     latent_lr: Optional[float] = None, latent: str = "code",
                     micro_batch: Optional[int] = DEFAULT_MICRO_BATCH,
                     train_norms: bool = True,
                     param_dtype: Optional[torch.dtype | str] = torch.float16,
                     seed: int = 0, progress: bool = True,
                     steps: Optional[int] = None, relative: bool = False,
                     loss: Optional[str] = None, target: Optional[str] = None,
                     integer_zeros: bool = False) -> BlockTuner:
    """A block hook for :func:`~bitpress.pipeline.stream.stream_quantize` (``block_hook=``).

    ``mode``: ``"float_parts"`` (codes frozen; scales, zeros, norms trained) or ``"bqpo"``
    (mask frozen; kept weights by straight-through rounding, scales, zeros, norms trained;
    codes re-derived). ``epochs`` passes over the calibration samples, one Adam step per
    ``micro_batch`` samples (``None``: per calibration batch) at learning rate ``lr``
    (``norm_lr`` for norm weights defaults to ``lr``). ``bqpo``'s latent weights are
    ``latent="code"`` (default: ``V = s·U + z`` with ``U`` in code units, initialised at the
    codes, learning rate ``latent_lr`` in code units, default :data:`DEFAULT_CODE_LR`; with
    ``U`` fixed this is exactly ``float_parts``) or ``"weight"`` (``V`` itself, re-rounded onto
    the moving grid; ``latent_lr`` defaults to ``lr``). ``param_dtype``: storage dtype of scales/zeros; the result is rounded to it before
    the acceptance check. ``steps`` caps the Adam steps per block (the first ``steps`` of
    the shuffled micro-batches: a random subset of the calibration samples; ``None``: every
    sample ``epochs`` times). ``relative=True`` trains the scales and zeros as
    ``s = s0·(1 + δ)``, ``z = z0 + s0·ε`` (``δ``, ``ε`` start at 0), so ``lr`` is a step in
    units of each group's own scale rather than an absolute one (and ``norm_lr`` then defaults
    to :data:`DEFAULT_LR`, not to ``lr``). Measured on SmolLM2-135M GQSA W4 g16 S50, block 0:
    ``relative=True, lr=1e-2, norm_lr=1e-4`` output MSE 0.749 → 0.241 against 0.250 for the
    default and 0.262 for ``lr=1e-4``; opt-in for now, because it did not cure the divergence
    of block 11 (see bench/RESULTS.md, GQSA). ``loss`` is what both the training and the
    acceptance check minimise: ``"mse"`` (every output element alike) or ``"token"`` (each
    token's ``‖e‖² / ‖y‖²``, the error the next normalisation layer sees). In SmolLM2 the
    first token of every window carries massive activations (its target's mean square is
    ~10⁴× the other tokens'), so under ``"mse"`` that token is 70 % of a late block's loss
    and its oscillations decide acceptance; ``"token"`` weighs it like any other token.
    ``None`` takes :data:`DEFAULT_LOSS` of the mode (``bqpo``: token, ``float_parts``: mse).
    ``target`` is what the block output is trained towards (the pipeline reads it from the
    hook): ``"block"`` — the float block on the quantized model's inputs (each block matches
    its own float function); ``"model"`` — the float model's own hidden states after this
    block, so the block also learns to undo the error the quantized blocks before it left
    (one more float forward per block; the pipeline carries the float model's hidden states
    alongside the quantized ones). ``None`` takes :data:`DEFAULT_TARGET` of the mode
    (``bqpo``: model, ``float_parts``: block). ``integer_zeros``: keep every offset tied to its
    scale, ``z = -zp·s`` with the solver's integer zero point ``zp`` frozen (only ``s`` is
    trained), and store ``s`` with ``zp·s`` exact in ``param_dtype``, so the block stays
    exportable to compressed-tensors without rounding.
    The returned hook keeps per-block
    :class:`BlockTuneRecord`\\ s in ``.records``.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown block tuning mode {mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"block tuning epochs must be a positive integer, got {epochs!r}")
    if loss is None and mode in MODES:
        loss = DEFAULT_LOSS[mode]
    if loss not in LOSSES:
        raise ConfigError(f"block tuning loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if target is None and mode in MODES:
        target = DEFAULT_TARGET[mode]
    if target not in TARGETS:
        raise ConfigError(f"block tuning target must be one of {', '.join(TARGETS)}, got "
                          f"{target!r}")
    if latent not in ("code", "weight"):
        raise ConfigError(f"bqpo latent must be 'code' or 'weight', got {latent!r}")
    for name, v in (("lr", lr), ("norm_lr", norm_lr), ("latent_lr", latent_lr)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"block tuning {name} must be a positive number, got {v!r}")
    if micro_batch is not None and (not isinstance(micro_batch, int) or micro_batch < 1):
        raise ConfigError(f"block tuning micro batch must be a positive integer, got "
                          f"{micro_batch!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ConfigError(f"block tuning steps must be a positive integer, got {steps!r}")
    if isinstance(param_dtype, str):
        if param_dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"param dtype {param_dtype!r} not supported")
        param_dtype = getattr(torch, param_dtype)
    return BlockTuner(mode, epochs, float(lr), norm_lr, latent_lr, latent, micro_batch,
                      train_norms, param_dtype, seed, progress, steps, bool(relative), loss,
                      target, integer_zeros=bool(integer_zeros))
