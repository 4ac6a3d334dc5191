"""Block-streaming compression of causal LMs made of a stack of decoder blocks.

Memory: the model skeleton is built on the meta device; the tensors outside the block
list (embeddings, final norm, head, position tables) are materialised once; then one block
at a time is read from the lazy tensor store (safetensors shards or a memory-mapped GGUF),
compressed, turned into packed modules and its float weights dropped. Peak memory is
therefore about one block's float weights + the calibration activations (block inputs and
outputs, ``2 · nsamples · seqlen · hidden · 4`` bytes) + the paused forwards' live
activations (single-forward mode, :func:`stash_bytes_estimate`) + the non-block tensors +
the packed output so far; the run's ``memory`` record states each term and the peak.

Everything here is architecture-generic:

* :func:`find_blocks`: the decoder block list is the outermost ``nn.ModuleList`` of
  identical modules that contain linears (preferring one whose length is the config's
  layer count) — ``model.layers`` (Llama, Qwen2, Gemma, Mistral), ``transformer.h``
  (GPT-2), ``gpt_neox.layers``, ``model.decoder.layers`` (OPT), … without naming any;
* block inputs and the keyword arguments each block receives (attention mask, position
  ids / rotary embeddings, cache position) are captured by replacing the blocks' forward
  for one embedding pass, so per-layer differences (sliding-window masks) are kept;
* :func:`sequential_groups`: one probe forward records the order in which the block's
  linears are called; consecutive calls on the *same* input tensor form a group (q/k/v,
  gate/up, GPT-2's ``c_attn`` alone, …). Groups are compressed in forward order and
  every group's Hessian is measured on the outputs of the already-quantized earlier
  groups (true sequential): by default each calibration batch runs through the block
  **once**, paused at each group's input until the group is quantized
  (:func:`stash_forward`; threads as resumable frames), or — when the paused
  activations would not fit in memory — the block is re-run up to each group.

GGUF sources are streamed tensor by tensor with the ``gguf`` package's memory-mapped
``GGUFReader``: each tensor is dequantised on demand and passed through transformers'
own GGUF name map and tensor processor (which undoes llama.cpp's q/k row permutation),
so a tensor read here equals the one ``from_pretrained(gguf_file=...)`` would produce —
without converting the file or holding the whole float model.
"""
from __future__ import annotations

import abc
import os
import queue
import threading

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import ConfigError, FormatError, SourceError
from ..formats import QuantizedWeight, SafetensorsDir
from ..formats.checkpoint import check_finite
from ..nn.recipe import is_linear

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early."""


# ---------------------------------------------------------------------------------------
# lazy tensor stores
# ---------------------------------------------------------------------------------------
class TensorStore(abc.ABC):
    """Lazy access to a source checkpoint's tensors under the model's state-dict names.

    ``reads`` counts tensors read and ``log`` lists their names in read order (tests use
    them to prove that blocks are read lazily, one at a time)."""

    def __init__(self) -> None:
        self.reads = 0
        self.log: list[str] = []

    @abc.abstractmethod
    def __contains__(self, name: str) -> bool:
        """Whether the source holds ``name``."""

    @abc.abstractmethod
    def _read(self, name: str) -> torch.Tensor:
        """Read one tensor (counted by :meth:`get`)."""

    def shape(self, name: str) -> Optional[tuple[int, ...]]:
        """The stored shape when known without reading the tensor."""
        return None

    def get(self, name: str) -> torch.Tensor:
        t = self._read(name)
        check_finite(t, name, getattr(self, "where", "the source checkpoint"))
        self.reads += 1
        self.log.append(name)
        return t


class SafetensorsStore(TensorStore):
    """Tensors of an HF safetensors directory; file names may lack or add the base-model
    prefix (``transformer.``, ``model.``) relative to the model's state-dict names."""

    def __init__(self, directory: str | Path, model_keys: list[str]):
        super().__init__()
        self.files = SafetensorsDir(directory)
        self.where = self.files.dir
        self._headers: dict[str, tuple[int, dict]] = {}
        self._map: dict[str, str] = {}
        for k in model_keys:
            for cand in _name_variants(k):
                if cand in self.files:
                    self._map[k] = cand
                    break

    def __contains__(self, name: str) -> bool:
        return name in self._map

    def shape(self, name: str) -> Optional[tuple[int, ...]]:
        return tuple(self.files.shapes[self._map[name]])

    def _read(self, name: str) -> torch.Tensor:
        """One tensor read with ``pread`` into fresh memory — no memory map, so the pages
        of tensors already used are not counted in (and do not pile up in) this process's
        resident set while a checkpoint larger than RAM streams through."""
        from ..formats.checkpoint import read_safetensors_header
        from ..formats.stwriter import header_base, read_tensor

        key = self._map[name]
        f = self.files._where[key]
        if f not in self._headers:
            path = self.files.dir / f
            self._headers[f] = (header_base(path), read_safetensors_header(path))
        base, header = self._headers[f]
        t = read_tensor(self.files.dir / f, base, header[key])
        return t if t is not None else self.files.get(key)  # an unusual dtype


def _name_variants(k: str) -> list[str]:
    out = [k]
    for pre in ("model.", "transformer."):
        if k.startswith(pre):
            out.append(k[len(pre):])
        else:
            out.append(pre + k)
    return out


class GGUFStore(TensorStore):
    """Tensors of a ``.gguf`` file, memory-mapped and dequantised one at a time."""

    def __init__(self, path: str | Path, skeleton: nn.Module):
        super().__init__()
        try:
            from gguf import GGUFReader
            from gguf.quants import dequantize
            from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS,
                                                                  TensorProcessor,
                                                                  get_gguf_hf_weights_map)
        except ImportError:
            raise SourceError("reading GGUF files needs the gguf package: pip install gguf") \
                from None
        self._dequantize, self.where = dequantize, path
        try:
            self.reader = GGUFReader(str(path))
        except Exception as e:  # noqa: BLE001 - gguf raises plain errors
            raise FormatError(f"cannot read GGUF {path}: {e}") from None
        arch_field = self.reader.fields.get("general.architecture")
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else ""
        cls = TENSOR_PROCESSORS.get(arch, TensorProcessor)
        self.processor = cls(config=skeleton.config.to_dict())
        try:
            g2h = get_gguf_hf_weights_map(skeleton, self.processor)
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"cannot map the tensors of {path} to a {arch} model: {e}") from None
        self._tensors = {t.name: t for t in self.reader.tensors}
        self._map = {hf: gg for gg, hf in g2h.items() if gg in self._tensors}

    def __contains__(self, name: str) -> bool:
        return name in self._map

    def _read(self, name: str) -> torch.Tensor:
        import numpy as np

        t = self._tensors[self._map[name]]
        w = self._dequantize(t.data, t.tensor_type)
        parsed: dict[str, Any] = {"tensors": {}, "config": {}}
        res = self.processor.process(weights=w, name=t.name, tensor_key_mapping={},
                                     parsed_parameters=parsed)
        if res.name is None and len(parsed["tensors"]) == 1:  # stored aside by the processor
            return next(iter(parsed["tensors"].values())).clone()
        return torch.from_numpy(np.ascontiguousarray(res.weights).copy())


# ---------------------------------------------------------------------------------------
# model skeleton and block discovery
# ---------------------------------------------------------------------------------------
def build_skeleton(config) -> nn.Module:
    """The causal LM of ``config`` with every parameter on the meta device (buffers such
    as rotary frequencies are real: they are computed, not stored)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            # float32 whatever the config's dtype: the calibration forwards and the passes
            # compute in float32 (an fp16 config would otherwise make fp16 parameters)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError/KeyError/...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"unsupported architecture {getattr(config, 'model_type', '?')!r}: "
                          f"transformers cannot build it as a causal LM ({msg})") from None
    return model.eval()


def _num_layers(config) -> Optional[int]:
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(config, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, module list) of the decoder blocks of ``model``."""
    cands: list[tuple[str, nn.ModuleList]] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if len({type(c) for c in m}) != 1:
            continue
        if not any(is_linear(x) for x in m[0].modules()):
            continue
        cands.append((name, m))
    # outermost only (expert lists inside a block are not the block list)
    cands = [(n, m) for n, m in cands
             if not any(n != o and n.startswith(o + ".") for o, _ in cands)]
    if not cands:
        raise ConfigError(f"unsupported architecture {type(model).__name__}: no list of "
                          f"decoder blocks with linear layers was found")
    nl = _num_layers(model.config)
    exact = [c for c in cands if len(c[1]) == nl]
    return max(exact or cands, key=lambda c: len(c[1]))


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Relative name → linear (``nn.Linear`` or GPT-2 ``Conv1D``) inside one block."""
    return {n: m for n, m in block.named_modules() if is_linear(m)}


def linear_weight(m: nn.Module) -> torch.Tensor:
    """Float32 ``[out, in]`` view of a linear's weight (Conv1D stores ``[in, out]``)."""
    w = m.weight.detach()
    return (w.t() if type(m).__name__ == "Conv1D" else w).float()


def set_linear_weight(m: nn.Module, w: torch.Tensor) -> None:
    w = w.t().contiguous() if type(m).__name__ == "Conv1D" else w.contiguous()
    m.weight.data = w.to(m.weight.dtype)


def materialize(model: nn.Module, names: list[str], store: TensorStore,
                dtype: Optional[torch.dtype] = torch.float32,
                device: torch.device | str = "cpu") -> None:
    """Read ``names`` (state-dict keys) from ``store`` into ``model`` (floats as ``dtype``;
    ``None``: as stored)."""
    from accelerate.utils import set_module_tensor_to_device

    sd = model.state_dict(keep_vars=True)
    for k in names:
        ref = sd[k]
        t = store.get(k)
        if tuple(t.shape) != tuple(ref.shape):
            raise FormatError(f"tensor {k!r} has shape {tuple(t.shape)} in the source, the "
                              f"model expects {tuple(ref.shape)}; the weights and the config "
                              f"do not belong together")
        if t.is_floating_point() and dtype is not None:
            t = t.to(dtype)
        set_module_tensor_to_device(model, k, device, value=t,
                                    dtype=t.dtype if t.is_floating_point() else None)


# ---------------------------------------------------------------------------------------
# capturing block inputs
# ---------------------------------------------------------------------------------------
@dataclass
class BlockInputs:
    """Calibration activations entering one block: a list of ``[b, seqlen, hidden]``
    batches and, per block, the extra positional/keyword arguments the model passes
    (keyed by batch size; identical for every batch of that size)."""
    hidden: list[torch.Tensor]
    extra: list[dict[int, tuple[tuple, dict]]]  # per block: batch size -> (args, kwargs)
    tuple_out: Optional[bool] = None   # the blocks return tuples
    batch_sizes: list[int] = field(default_factory=list)  # every rank's batches, in order

    def call(self, block: nn.Module, index: int, h: torch.Tensor):
        args, kwargs = self.extra[index][h.shape[0]]
        out = block(h, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _hidden_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    if "hidden_states" in kwargs:
        kw = dict(kwargs)
        return kw.pop("hidden_states"), (), kw
    raise ConfigError("cannot find the hidden states among the decoder block's arguments")


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor,
                   batch_size: int, tuple_out: bool) -> BlockInputs:
    """Run the model's embedding part on ``ids`` ``[n, seqlen]`` in batches, record the
    first block's input and every block's extra arguments (blocks replaced by identities
    for one batch of each size). ``tuple_out``: the blocks return tuples."""
    hidden: list[torch.Tensor] = []
    extra: list[dict[int, tuple[tuple, dict]]] = [dict() for _ in blocks]
    n_blocks = len(blocks)
    originals = [b.forward for b in blocks]

    def make(i: int):
        def fwd(*args, **kwargs):
            h, rest, kw = _hidden_of(args, kwargs)
            kw.pop("past_key_value", None)
            kw.pop("past_key_values", None)
            kw.pop("layer_past", None)
            if "use_cache" in kw:
                kw["use_cache"] = False
            if i == 0:
                hidden.append(h.detach().clone())
            bs = h.shape[0]
            if bs not in extra[i]:
                extra[i][bs] = (rest, kw)
            if i == n_blocks - 1 or (i == 0 and all(bs in e for e in extra)):
                raise _Stop
            return (h,) if tuple_out else h
        return fwd

    try:
        for i, b in enumerate(blocks):
            b.forward = make(i)
        for s in range(0, ids.shape[0], batch_size):
            batch = ids[s:s + batch_size]
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        for b, f in zip(blocks, originals):
            b.forward = f
            if "forward" in b.__dict__:
                del b.__dict__["forward"]
    if len(hidden) != (ids.shape[0] + batch_size - 1) // batch_size:
        raise ConfigError("the model did not call its first decoder block once per batch; "
                          "this architecture is not supported by the streaming pipeline")
    return BlockInputs(hidden, extra)


# ---------------------------------------------------------------------------------------
# Hessians and the sequential order
# ---------------------------------------------------------------------------------------
class Hessian:
    """Running ``H = XᵀX / n`` of a linear's inputs (float32 products, float64 sum).

    XᵀX is symmetric: with SciPy present each batch goes through BLAS ``ssyrk``, which
    computes one triangle — half the flops of a full matmul (1.85× faster measured on
    1536-wide inputs here; the Hessian of ``down_proj`` is a third of GPTQ's time)."""

    def __init__(self, n_in: int, device: torch.device | str | None = None):
        self.sum = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)
        self.n = 0
        self._upper = False  # self.sum holds only the upper triangle (syrk path)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.device.type == "cpu" and _ssyrk is not None and x.shape[0] >= 64:
            x = x.contiguous()
            # row-major X [n, d] is column-major Xᵀ [d, n]: syrk(trans=0) gives XᵀX
            c = _ssyrk(1.0, x.numpy().T, trans=0, lower=0)
            if not self._upper:
                self.sum = torch.triu(self.sum)
                self._upper = True
            self.sum += torch.from_numpy(c)  # upper valid, lower zero; promoted per element
        else:
            xx = x.T @ x
            self.sum += torch.triu(xx) if self._upper else xx
        self.n += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        if self.n == 0:
            raise ConfigError("no calibration inputs reached this layer")
        S = self.sum
        n, step = S.shape[0], 1024
        if self._upper:  # mirror the upper triangle in place, in row chunks (no n² temporary)
            for i in range(0, n, step):
                S[i:i + step, :i] = S[:i, i:i + step].T
                D = S[i:i + step, i:i + step]
                D.copy_(D + torch.triu(D, 1).T)  # lower part of the diagonal block is zero
            self._upper = False  # the full matrix: still a valid state for add()
        out = torch.empty(n, n, dtype=torch.float32, device=S.device)
        for i in range(0, n, step):
            out[i:i + step] = (S[i:i + step] / self.n).float()
        return out


def _find_ssyrk():
    try:
        from scipy.linalg.blas import ssyrk
    except ImportError:  # SciPy is optional (the `solver` extra): fall back to matmul
        return None
    return ssyrk


_ssyrk = _find_ssyrk()


@torch.no_grad()
def sequential_groups(block: nn.Module, names: list[str], run: Callable[[], Any]
                      ) -> list[list[str]]:
    """Groups of ``names`` (relative linear names) in forward order: one probe forward
    (``run()``) records the call order; consecutive calls on the same input tensor form a
    group. Linears the forward never calls come last, one group each."""
    mods = {n: block.get_submodule(n) for n in names}
    calls: list[tuple[str, bool]] = []
    state: dict[str, Any] = {"last": None}

    def make(n: str):
        def hook(_m, args):
            x = args[0] if args else None
            calls.append((n, x is not None and x is state["last"]))
            state["last"] = x
        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in mods.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
        state["last"] = None
    groups: list[list[str]] = []
    seen: set[str] = set()
    for n, same in calls:
        if n in seen:
            continue
        seen.add(n)
        if same and groups:
            groups[-1].append(n)
        else:
            groups.append([n])
    groups += [[n] for n in names if n not in seen]
    return groups


# ---------------------------------------------------------------------------------------
# block hook interface
# ---------------------------------------------------------------------------------------
@dataclass
class BlockContext:
    """What a block-level hook (decoupleQ / GQSA block tuning) is given.

    ``block`` holds fake-quantized float linears (weights = dequantised ``qweights``);
    ``inputs`` calls the block on one calibration batch (``inputs.call(block, index, h)``);
    ``hidden`` are the (quantized-model) inputs of this block; ``targets`` the outputs of
    the *float* block on the same inputs -- or, when the hook has ``target = "model"``, the
    float model's own hidden states after this block (the float block on the float model's
    inputs). The hook returns updated QuantizedWeights (or
    ``None`` to keep them).

    ``outputs``: the block's outputs on ``hidden`` as the block stands when the hook is
    called (``None`` when the pipeline did not keep them). ``outputs_after``: a hook may set
    it to the block's outputs on ``hidden`` as it leaves the block (it usually computed them
    anyway, to check its loss); they then feed the next block. Left ``None``, the pipeline
    re-runs the block."""
    index: int
    name: str
    block: nn.Module
    inputs: BlockInputs
    hidden: list[torch.Tensor]
    targets: list[torch.Tensor]
    qweights: dict[str, QuantizedWeight]
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: Optional[list[torch.Tensor]] = None
    outputs_after: Optional[list[torch.Tensor]] = None


BlockHook = Callable[[BlockContext], Optional[dict[str, QuantizedWeight]]]


# ---------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------
def _prefix_keys(keys: list[str], prefix: str) -> list[str]:
    return [k for k in keys if k.startswith(prefix)]


def _hessian_rel_error(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> float:
    from ..quant.gptq import hessian_error_terms  # chunked: no n² float64 copy of H

    num, den = hessian_error_terms(W, What, H)
    return float(num / den.clamp_min(1e-300))


def _weight_rel_error(W: torch.Tensor, What: torch.Tensor) -> float:
    return float((What - W).pow(2).sum() / W.pow(2).sum().clamp_min(1e-30))


def _tensor_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())
               if t.device.type != "meta")


@dataclass
class StreamResult:
    model: nn.Module
    schemes: dict[str, dict[str, Any]]
    errors: dict[str, float]
    error_metric: str
    groups: list[list[str]]
    memory: dict[str, int]
    seconds_quantize: float
    reads_per_block: list[int]
    seconds_layer_solve: float = 0.0   # the pass's (W, H) -> QuantizedWeight calls alone
    packed_bits: tuple[int, int] = (0, 0)  # (bits, weights) written (streamed output only)


def stream_quantize(model: nn.Module, store: TensorStore, recipe, solve: Callable[
        [str, torch.Tensor, Optional[torch.Tensor]], QuantizedWeight],
        calib_ids: Optional[torch.Tensor] = None, batch_size: int = 8,
        block_hook: Optional[BlockHook] = None, progress: bool = True,
        solver_threads: Optional[int] = 1, sequential: str = "auto",
        pack: bool = True, writer=None, block_range: Optional[tuple[int, int]] = None,
        device: torch.device | str = "cpu", seed: int = 0, dist=None) -> StreamResult:
    """Compress the meta-device ``model`` block by block from ``store``.

    ``solve(name, W, H)`` returns the QuantizedWeight of one linear (``H`` is ``None``
    without calibration). Returns the model with packed modules in every block and all
    other tensors materialised, ready for :func:`bitpress.pipeline.checkpoint.save`.

    ``solver_threads``: torch threads while a pass solves one matrix (default 1: GPTQ's
    column loop is thousands of tiny ops, which run faster without OpenMP barriers,
    especially on a shared machine); the block forwards use the process setting.

    ``sequential``: how each group's inputs are produced with the earlier groups already
    quantized — ``"stash"`` runs every calibration batch through the block once, pausing
    at each group (:func:`stash_forward`; one forward per block, more memory),
    ``"recompute"`` re-runs the block up to each group (about 2.3 forwards per block,
    memory = the block inputs), ``"auto"`` stashes when :func:`stash_bytes_estimate` is
    under a quarter of the available memory.

    ``pack=False`` leaves every solved linear a float ``nn.Linear`` holding its
    dequantised weight (``solve`` may then return any object with ``dequantize()``, such
    as the masked baselines of :mod:`bitpress.sparse.baselines`): a simulated model for
    comparisons, never a checkpoint. Block tuning needs packed weights.

    ``writer`` (:class:`bitpress.pipeline.streamout.StreamOutput`): each finished block is
    written to disk and dropped from memory, the tensors outside the blocks are copied from
    the store by the writer (never held), and a run killed at any point resumes from the
    last finished block (the writer holds the state). ``block_range`` ``(a, b)``: only
    blocks ``a <= i < b`` are compressed; the others are kept in float (blocks before ``a``
    still run to produce the calibration inputs). ``device``: where every tensor of the
    passes lives. ``seed``: the global RNG is re-seeded with ``(seed, block)`` before each
    block, so a block's result does not depend on what ran before it in the process.
    ``dist`` (:class:`bitpress.pipeline.dist.Dist`): calibration batches split across
    ranks, Hessians summed across them, the linears of a group solved on different ranks."""
    if not pack and block_hook is not None:
        raise ConfigError("block tuning needs packed weights; pack=False runs without it")
    if sequential not in ("auto", "stash", "recompute"):
        raise ConfigError(f"sequential must be 'auto', 'stash' or 'recompute', not "
                          f"{sequential!r}")
    from tqdm.auto import tqdm

    from ..nn.recipe import packed_module, set_submodule

    from accelerate.utils import set_module_tensor_to_device

    from .dist import Dist

    dist = dist if dist is not None else Dist()
    device = torch.device(device)
    if writer is not None:
        _return_big_frees_to_os()  # block-sized temporaries must not pile up in the heap
    rss_at_start = _rss_now()
    blocks_name, blocks = find_blocks(model)
    sd = model.state_dict(keep_vars=True)
    keys = list(sd)
    block_prefix = blocks_name + "."
    tie = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [k for k in keys if sd[k].device.type == "meta" and k not in store
               and not (tie and k.endswith("lm_head.weight"))]
    if missing:
        raise FormatError(f"the source has no tensor for {', '.join(missing[:3])}"
                          + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                          + "; the weights and the config do not belong together")
    for k in keys:  # shapes from the headers: a mismatch fails before any long work
        shp = store.shape(k) if k in store else None
        if shp is not None and tuple(shp) != tuple(sd[k].shape):
            raise FormatError(f"tensor {k!r} has shape {tuple(shp)} in the source, the model "
                              f"in config.json expects {tuple(sd[k].shape)}; the weights and "
                              f"the config do not belong together")
    outer = [k for k in keys if not k.startswith(block_prefix) and sd[k].device.type == "meta"
             and k in store]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_w = getattr(head, "weight", None)
    if writer is not None:
        # the writer copies the tensors outside the blocks from the store; the forward
        # needs only the input side (embeddings, position tables), and only to calibrate
        outer = [k for k in outer if calib_ids is not None and sd[k] is not head_w]
    materialize(model, outer, store, device=device)
    if tie and hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in model.state_dict(keep_vars=True).items()
            if not n.startswith(block_prefix) and t.device.type == "meta"
            and (writer is None or n in outer)]
    if left:
        raise FormatError(f"tensors {left[:3]} could not be read from the source")
    for mod in model.modules():  # computed buffers (rotary tables) follow the device
        for bn, buf in list(mod.named_buffers(recurse=False)):
            if buf.device.type not in ("meta", device.type):
                mod._buffers[bn] = buf.to(device)
    if calib_ids is not None:
        calib_ids = calib_ids.to(device)
    memory = {"rss_at_start_bytes": rss_at_start, "nonblock_bytes": _tensor_bytes(model),
              "block_float_bytes": 0, "activation_bytes": 0, "stash_estimate_bytes": 0}

    targets_by_block = []
    for i, b in enumerate(blocks):
        pre = f"{blocks_name}.{i}."
        targets_by_block.append([n for n in block_linears(b) if recipe.matches(pre + n)])
    if block_range is not None:
        a, b = block_range
        if not (0 <= a < b <= len(blocks)):
            raise ConfigError(f"--blocks {a}:{b} is outside the model's {len(blocks)} blocks; "
                              f"give A:B with 0 <= A < B <= {len(blocks)}")
        targets_by_block = [t if a <= i < b else [] for i, t in enumerate(targets_by_block)]
    if not any(targets_by_block):
        raise ConfigError("the recipe selects no linear layer inside the decoder blocks; check "
                          "--targets / --ignore")
    last_target = max(i for i, t in enumerate(targets_by_block) if t)

    schemes: dict[str, dict[str, Any]] = {}
    errors: dict[str, float] = {}
    all_groups: list[list[str]] = []
    reads_per_block: list[int] = []
    solve_seconds = [0.0]
    t0 = time.time()
    inputs: Optional[BlockInputs] = None
    # the float model's hidden states, carried beside the quantized ones when the hook
    # trains towards them (target "model")
    float_path = block_hook is not None and getattr(block_hook, "target", "block") == "model"
    fhid: Optional[list[torch.Tensor]] = None
    order_cache: dict[tuple, list[list[str]]] = {}
    stash: Optional[bool] = None
    start = 0
    packed_bits = [0, 0]  # bits as written, weights (for bits/weight)
    if writer is not None:
        st = writer.begin(model, store, keys, block_prefix)
        start = st["done"]
        for rec in st["blocks"]:
            schemes.update(rec["schemes"])
            errors.update(rec["errors"])
            reads_per_block.append(rec["reads"])
            packed_bits[0] += rec["bits"]
            packed_bits[1] += rec["weights"]
        all_groups = st.get("groups") or []
        stash = st.get("stash")
    bar = tqdm(total=len(blocks), initial=start, desc=f"{recipe.method} W{recipe.bits}",
               unit="block", disable=not progress)
    for i, block in enumerate(blocks):
        if i < start:
            continue
        tb = time.time()
        pre = f"{blocks_name}.{i}."
        names = targets_by_block[i]
        torch.manual_seed((seed * 1_000_003 + i) & ((1 << 63) - 1))
        if writer is not None and not names and (calib_ids is None or i > last_target):
            # nothing to compress here and no later block needs this one's outputs: copied
            # from the source tensor by tensor, never materialised
            reads_per_block.append(writer.copy_block(i, _prefix_keys(keys, pre)))
            writer.block_done(i, None, {"schemes": {}, "errors": {}, "reads": 0, "bits": 0,
                                      "weights": 0, "tune": []}, None, None,
                              all_groups, stash)
            bar.update(1)
            continue
        r0 = store.reads
        # data-free: no forward, so the weights stay as stored (RTN reads them as float32,
        # and the output casts the rest exactly as before): half the memory of an fp16 block
        materialize(model, _prefix_keys(keys, pre), store, device=device,
                    dtype=torch.float32 if calib_ids is not None else None)
        reads_per_block.append(store.reads - r0)
        memory["block_float_bytes"] = max(memory["block_float_bytes"], _tensor_bytes(block))
        qweights: dict[str, QuantizedWeight] = {}
        hessians: dict[str, torch.Tensor] = {}
        if calib_ids is not None and inputs is None:
            inputs = _first_inputs(model, blocks, calib_ids, batch_size, block_index=i,
                                   tuple_out=writer.tuple_out if writer is not None else None)
            if writer is not None:
                writer.tuple_out = inputs.tuple_out
            local = dist.local(len(inputs.hidden))
            if i > 0 or dist.world > 1:  # resumed: the saved inputs of block i
                saved = writer.load_acts(i) if (writer is not None and i > 0) else None
                if saved is not None:
                    inputs.hidden, fhid = saved
                else:
                    inputs.hidden = [inputs.hidden[j] for j in local]
            inputs.hidden = [h.to(device) for h in inputs.hidden]
            if fhid is not None:
                fhid = [h.to(device) for h in fhid]
            inputs.batch_sizes = [int(x.shape[0]) for x in
                                  torch.split(calib_ids, batch_size)]
            memory["activation_bytes"] = sum(h.numel() * h.element_size()
                                              for h in inputs.hidden)
            if writer is not None:  # the input side is needed no more
                for k in outer:
                    set_module_tensor_to_device(model, k, "meta")
        if inputs is None:
            for n in names:
                m = block.get_submodule(n)
                W = linear_weight(m)
                qw = solve(pre + n, W, None)
                errors[pre + n] = _weight_rel_error(W, qw.dequantize())
                qweights[n] = qw
                if not pack:
                    set_linear_weight(m, qw.dequantize())
        else:
            hid = inputs.hidden
            with torch.no_grad():
                if float_path:
                    if fhid is None:
                        fhid = [h.clone() for h in hid]
                    fhid = [inputs.call(block, i, h) for h in fhid]  # block still float
                    targets = fhid if names else []
                else:
                    targets = ([inputs.call(block, i, h) for h in hid] if block_hook and names
                               else [])
                # blocks of one class with the same targets call their linears in the same
                # order: probe once per (class, targets), not once per block
                key = (type(block), tuple(names))
                if key not in order_cache:
                    order_cache[key] = sequential_groups(
                        block, names, lambda: inputs.call(block, i, hid[0]))
                groups = order_cache[key]
                if i == 0:
                    all_groups = groups

                def solve_group(group: list[str], H: Optional[torch.Tensor]) -> None:
                    mine: dict[str, QuantizedWeight] = {}
                    for j, n in enumerate(group):  # each rank solves its share of the group
                        if dist.owner(j) != dist.rank:
                            continue
                        W = linear_weight(block.get_submodule(n))
                        if H is None:
                            log.warning("%s is never called on calibration data; quantizing "
                                        "it without a Hessian", pre + n)
                        ts = time.perf_counter()
                        with _threads(solver_threads):
                            mine[n] = solve(pre + n, W, H)
                        solve_seconds[0] += time.perf_counter() - ts
                    for j, n in enumerate(group):
                        m = block.get_submodule(n)
                        W = linear_weight(m)
                        qw = dist.share_qweight(mine.get(n), dist.owner(j), W)
                        What = qw.dequantize()
                        errors[pre + n] = (_hessian_rel_error(W, What, H) if H is not None
                                           else _weight_rel_error(W, What))
                        set_linear_weight(m, What)
                        qweights[n] = qw
                        if H is not None and block_hook is not None:  # only hooks read them
                            hessians[n] = H

                if stash is None and dist.world > 1:
                    stash = sequential != "recompute"  # same on every rank
                if stash is None:
                    hidden_size = hid[0].shape[-1]
                    est = stash_bytes_estimate(block, names, memory["activation_bytes"],
                                               hidden_size)
                    avail = _mem_available()
                    stash = sequential == "stash" or (
                        sequential == "auto" and avail is not None and est < avail // 4)
                    memory["stash_estimate_bytes"] = est if stash else 0
                    log.info("true-sequential inputs by %s (stash estimate %.0f MiB, "
                             "available %s MiB)", "one paused forward" if stash else
                             "re-running the block", est / 2**20,
                             f"{avail / 2**20:.0f}" if avail else "?")
                outs: Optional[list[torch.Tensor]] = None
                if stash:
                    outs = stash_forward(block, groups, hid,
                                         lambda h: inputs.call(block, i, h), solve_group,
                                         device=device, reduce=dist.reduce_hessian)
                else:
                    for group in groups:
                        solve_group(group, _group_hessian(
                            block, group[0], lambda h: inputs.call(block, i, h), hid,
                            device=device, reduce=dist.reduce_hessian))
                if block_hook is not None and names:
                    sizes = inputs.batch_sizes
                    g_hid = dist.gather(hid, sizes)  # the hook sees every batch, in order
                    g_tgt = dist.gather(targets, sizes)
                    g_out = dist.gather(outs, sizes) if outs is not None else None
                    ctx = BlockContext(i, pre[:-1], block, inputs, g_hid, g_tgt, qweights,
                                       hessians, g_out)
                    outs = g_out = None
                    new = block_hook(ctx)
                    if new:
                        qweights.update(new)
                        for n, qw in new.items():
                            set_linear_weight(block.get_submodule(n), qw.dequantize())
                    outs = dist.scatter(ctx.outputs_after)  # None: re-run the block
                    del targets, ctx, g_hid, g_tgt
                for j, h in enumerate(hid):  # the quantized block's outputs feed the next
                    hid[j] = outs[j] if outs is not None else inputs.call(block, i, h)
                del outs
        for n in names if pack else ():
            m = block.get_submodule(n)
            bias = m.bias.detach().float() if getattr(m, "bias", None) is not None else None
            new_m = packed_module(qweights[n], bias, recipe.torch_param_dtype)
            set_submodule(block, n, new_m)
            schemes[pre + n] = new_m.scheme()
        if not pack:
            schemes.update({pre + n: {"simulated": type(qweights[n]).__name__} for n in names})
        # anything float left in the block but the small tensors (norms) is dropped
        qweights, hessians = {}, {}
        if writer is not None:
            from .compress import packed_bits as _pbits

            bits_w = _pbits(block)
            packed_bits[0] += bits_w[0]
            packed_bits[1] += bits_w[1]
            tune = [r.to_dict() for r in getattr(block_hook, "records", [])
                    if getattr(r, "block", None) == i]
            hid_next = inputs.hidden if (inputs is not None and i < last_target) else None
            writer.block_done(i, block, {"schemes": {pre + n: schemes[pre + n] for n in names},
                                         "errors": {pre + n: errors[pre + n] for n in names},
                                         "reads": reads_per_block[-1], "bits": bits_w[0],
                                         "weights": bits_w[1], "tune": tune},
                              hid_next, fhid if hid_next is not None else None, all_groups,
                              stash)
            block.to("meta")  # its packed tensors are on disk now
            _trim_heap()
        short = " ".join(f"{n.rsplit('.', 1)[-1]} {errors[pre + n]:.1e}" for n in names)
        bar.set_postfix_str(f"{short} | {time.time() - tb:.1f}s")
        log.info("block %d: %s (%.1f s)", i, short, time.time() - tb)
        bar.update(1)
    bar.close()
    memory["packed_bytes"] = sum(_tensor_bytes(b) for b in blocks)
    # what the process should need at most: what it held on entry (libraries, tokenizer,
    # calibration ids) + the tensors outside the blocks + one block's float weights + the
    # block inputs and outputs + the paused forwards + the packed output
    memory["accounted_bytes"] = (memory["rss_at_start_bytes"] + memory["nonblock_bytes"]
                                 + memory["block_float_bytes"]
                                 + (3 if float_path else 2) * memory["activation_bytes"]
                                 + memory["stash_estimate_bytes"] + memory["packed_bytes"])
    memory["peak_rss_bytes"] = _peak_rss()
    return StreamResult(model, schemes, errors, "hessian" if calib_ids is not None else "weight",
                        all_groups, memory, time.time() - t0, reads_per_block,
                        solve_seconds[0], tuple(packed_bits))


class _threads:
    """Temporarily set torch's intra-op thread count (``None``: unchanged)."""

    def __init__(self, n: Optional[int]):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.n:
            torch.set_num_threads(self.old)


def _first_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor,
                  batch_size: int, block_index: int = 0,
                  tuple_out: Optional[bool] = None) -> BlockInputs:
    """Probe whether blocks return tuples (block ``block_index`` must be materialised;
    skipped when ``tuple_out`` is known), then capture."""
    if tuple_out is not None:
        res = capture_inputs(model, blocks, ids, batch_size, tuple_out)
        res.tuple_out = tuple_out
        return res
    probe: dict[str, Any] = {}

    def pre(_m, args, kwargs):
        probe["in"] = _hidden_of(args, kwargs)
        raise _Stop

    h = blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids[:1], use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    if "in" not in probe:
        raise ConfigError("the model never called its first decoder block; this architecture "
                          "is not supported by the streaming pipeline")
    x, rest, kw = probe["in"]
    kw = {k: v for k, v in kw.items() if k not in ("past_key_value", "past_key_values",
                                                    "layer_past")}
    with torch.no_grad():
        out = blocks[block_index](x, *rest, **kw)
    res = capture_inputs(model, blocks, ids, batch_size, isinstance(out, (tuple, list)))
    res.tuple_out = isinstance(out, (tuple, list))
    return res


def _group_hessian(block: nn.Module, first: str, call: Callable[[torch.Tensor], Any],
                   hid: list[torch.Tensor], device=None, reduce=None) -> Optional[torch.Tensor]:
    """Run the block on every batch up to ``first``'s input, accumulating its Hessian
    (``reduce(acc)`` sums it across ranks)."""
    m = block.get_submodule(first)
    n_in = linear_weight(m).shape[1]
    acc = Hessian(n_in, device=device)

    def hook(_m, args):
        acc.add(args[0])
        raise _Stop

    handle = m.register_forward_pre_hook(hook)
    try:
        for h in hid:
            try:
                call(h)
            except _Stop:
                pass
    finally:
        handle.remove()
    if reduce is not None:
        reduce(acc)
    return acc.H if acc.n else None


# ---------------------------------------------------------------------------------------
# one forward per block: every batch's forward paused at each group's input
# ---------------------------------------------------------------------------------------
_DONE = 1 << 30


class _Worker:
    """One calibration batch's block forward, run in its own thread and paused (holding
    its live activations) at the input of each group until that group is quantized."""

    def __init__(self, index: int, h: torch.Tensor):
        self.index, self.h = index, h
        self.go = threading.Event()
        self.at = -1          # group index it is parked at; _DONE when finished
        self.out: Any = None
        self.error: Optional[BaseException] = None
        self.thread: Optional[threading.Thread] = None


def stash_forward(block: nn.Module, groups: list[list[str]], hid: list[torch.Tensor],
                  call: Callable[[torch.Tensor], Any],
                  solve_group: Callable[[list[str], Optional[torch.Tensor]], None],
                  device=None, reduce=None) -> list[torch.Tensor]:
    """True-sequential compression of one block with **one** forward per batch.

    Each batch's forward runs in a worker thread (one at a time — a baton is passed, so
    the intra-op thread pool is never shared) and stops at the pre-hook of each group's
    first linear after adding its input to that group's Hessian. When every batch has
    stopped there (or finished), ``solve_group(group, H)`` quantizes the group and sets
    its weights, then the batches resume through the quantized linears. The block outputs
    of the same forwards are returned: they are the quantized block's outputs.

    Cost: the paused batches' live activations (at the MLP output projection: the wide
    intermediate plus the residual) are held at once — more memory than re-running the
    block up to each group (:func:`_group_hessian`), in exchange for ~2.3× less compute.
    """
    _return_big_frees_to_os()
    n_in = {g[0]: linear_weight(block.get_submodule(g[0])).shape[1] for g in groups}
    accs: list[Optional[Hessian]] = [None] * len(groups)  # made when reached: one at a time

    def acc_of(gi: int) -> Hessian:
        if accs[gi] is None:
            accs[gi] = Hessian(n_in[groups[gi][0]], device=device)
        return accs[gi]
    done_groups: set[int] = set()
    report: "queue.Queue[_Worker]" = queue.Queue()
    state = {"abort": False}
    local = threading.local()
    grad = torch.is_grad_enabled()

    def make_hook(gi: int):
        def hook(_m, args):
            w: Optional[_Worker] = getattr(local, "worker", None)
            if w is None or gi in done_groups:
                return None  # main thread, or a linear called again after its group
            acc_of(gi).add(args[0])
            w.at = gi
            w.go.clear()
            report.put(w)
            w.go.wait()
            if state["abort"]:
                raise _Stop
            return None
        return hook

    def run(w: _Worker) -> None:
        local.worker = w
        try:
            w.go.wait()
            if state["abort"]:
                raise _Stop
            with torch.set_grad_enabled(grad):
                w.out = call(w.h)
        except BaseException as e:  # noqa: BLE001 — handed to the main thread
            w.error = None if isinstance(e, _Stop) else e
        w.at = _DONE
        report.put(w)

    def step(w: _Worker) -> None:
        """Let one worker run until it parks again or finishes (one runs at a time)."""
        w.go.set()
        got = report.get()
        assert got is w
        if w.error is not None:
            raise w.error

    handles = [block.get_submodule(g[0]).register_forward_pre_hook(make_hook(gi))
               for gi, g in enumerate(groups)]
    workers = [_Worker(j, h) for j, h in enumerate(hid)]
    try:
        for w in workers:
            w.thread = threading.Thread(target=run, args=(w,), daemon=True,
                                        name=f"bitpress-calib-{w.index}")
            w.thread.start()
        for gi, group in enumerate(groups):
            for w in workers:
                # run every batch that is behind this group up to it (or to its end)
                while w.at < gi:
                    step(w)
            acc = acc_of(gi)
            if reduce is not None:
                reduce(acc)
            H = acc.H if acc.n else None
            accs[gi] = acc = None  # the float64 sum is freed before the solve
            solve_group(group, H)
            del H
            done_groups.add(gi)
        for w in workers:
            while w.at != _DONE:
                step(w)
    finally:
        if any(w.at != _DONE for w in workers):
            state["abort"] = True
            for w in workers:
                w.go.set()
        for w in workers:
            if w.thread is not None:
                w.thread.join()
        for h in handles:
            h.remove()
    return [w.out for w in workers]


_MALLOC_TUNED = False


def _return_big_frees_to_os() -> None:
    """glibc raises its mmap threshold after the first large free (up to 32 MB), so the
    activation-sized temporaries of every paused thread are then carved from per-thread
    arenas that keep their high-water mark: 4.1 GB RSS instead of 1.9 GB for SmolLM2's
    block at 128×512 calibration tokens. A fixed 1 MiB threshold makes large tensors mmap
    chunks that go back to the OS when freed (measured: no slowdown). Process-wide and
    permanent — harmless for a compression job; a no-op off glibc."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def stash_bytes_estimate(block: nn.Module, names: list[str], activation_bytes: int,
                         hidden_size: int) -> int:
    """Rough upper bound of what :func:`stash_forward` holds at once beyond the block
    inputs: per token the widest linear input + a residual + two more hidden-sized
    tensor, in float32 (``activation_bytes`` = the block inputs of all batches)."""
    widest = max((linear_weight(block.get_submodule(n)).shape[1] for n in names),
                 default=hidden_size)
    return int(activation_bytes * (widest + 3 * hidden_size) / max(hidden_size, 1))


def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss_now() -> int:
    """Resident set size of this process now (bytes; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
