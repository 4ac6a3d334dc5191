"""Block-streaming compression of causal LMs made of a stack of decoder blocks.

Memory: the model skeleton is built on the meta device; the tensors outside the block
list (embeddings, final norm, head, position tables) are materialised once; then one block
at a time is read from the lazy tensor store (safetensors shards or a memory-mapped GGUF),
compressed, turned into packed modules and its float weights dropped. Peak memory is
therefore about one block's float weights + the calibration activations (block inputs and
outputs, ``2 · nsamples · seqlen · hidden · 4`` bytes) + the paused forwards' live
activations (single-forward mode, :func:`stash_bytes_estimate`) + the non-block tensors +
the packed output so far; the run's ``memory`` record states each term and the peak.

Everything here is architecture-generic; the rooms of the pipeline:

* :mod:`~bitpress.pipeline.tensorstore`: lazy tensor stores (safetensors shards, GGUF);
* :mod:`~bitpress.pipeline.skeleton`: the meta-device model and :func:`find_blocks` (the
  decoder block list is found without naming any architecture);
* :mod:`~bitpress.pipeline.capture`: block inputs and the keyword arguments each block
  receives (attention mask, position ids / rotary embeddings, cache position) are captured
  by replacing the blocks' forward for one embedding pass, so per-layer differences
  (sliding-window masks) are kept; Hessians; :func:`sequential_groups`: one probe forward
  records the order in which the block's linears are called; consecutive calls on the
  *same* input tensor form a group (q/k/v, gate/up, GPT-2's ``c_attn`` alone, …);
* :mod:`~bitpress.pipeline.stash`: groups are compressed in forward order and every
  group's Hessian is measured on the outputs of the already-quantized earlier groups (true
  sequential): by default each calibration batch runs through the block **once**, paused
  at each group's input until the group is quantized (:func:`stash_forward`; threads as
  resumable frames), or — when the paused activations would not fit in memory — the
  block is re-run up to each group;
* :mod:`~bitpress.pipeline.memory`: memory accounting and heap settings;
* this module: the block-hook interface (:class:`BlockContext`) and the driver
  :func:`stream_quantize`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import ConfigError, FormatError
from ..formats import QuantizedWeight
# the rooms of the pipeline, re-exported here (their names were once all in this module)
from .capture import (BlockInputs, Hessian, _first_inputs, _group_hessian,  # noqa: F401
                      capture_inputs, sequential_groups)
from .memory import (_mem_available, _peak_rss, _return_big_frees_to_os,  # noqa: F401
                     _rss_now, _tensor_bytes, _trim_heap, accounted_bytes)
from .skeleton import (block_linears, build_skeleton, find_blocks, linear_weight,  # noqa: F401
                       materialize, set_linear_weight)
from .stash import stash_bytes_estimate, stash_forward  # noqa: F401
from .tensorstore import GGUFStore, SafetensorsStore, TensorStore  # noqa: F401

log = logging.getLogger(__name__)


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


def _check_source(sd: dict[str, torch.Tensor], keys: list[str], store: TensorStore,
                  tie: bool) -> None:
    """Every tensor the model needs is in the source, with the shape the config expects
    (read from the headers: a mismatch fails before any long work)."""
    missing = [k for k in keys if sd[k].device.type == "meta" and k not in store
               and not (tie and k.endswith("lm_head.weight"))]
    if missing:
        raise FormatError(f"the source has no tensor for {', '.join(missing[:3])}"
                          + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                          + "; the weights and the config do not belong together")
    for k in keys:
        shp = store.shape(k) if k in store else None
        if shp is not None and tuple(shp) != tuple(sd[k].shape):
            raise FormatError(f"tensor {k!r} has shape {tuple(shp)} in the source, the model "
                              f"in config.json expects {tuple(sd[k].shape)}; the weights and "
                              f"the config do not belong together")


def _materialize_outside(model: nn.Module, sd: dict[str, torch.Tensor], keys: list[str],
                         store: TensorStore, block_prefix: str, tie: bool,
                         device: torch.device, streamed: bool, calibrated: bool) -> list[str]:
    """Read the tensors outside the blocks (with a streamed output only the input side, and
    only to calibrate: the writer copies the rest from the store) and move computed buffers
    to ``device``; returns the names read."""
    outer = [k for k in keys if not k.startswith(block_prefix) and sd[k].device.type == "meta"
             and k in store]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_w = getattr(head, "weight", None)
    if streamed:
        # the writer copies the tensors outside the blocks from the store; the forward
        # needs only the input side (embeddings, position tables), and only to calibrate
        outer = [k for k in outer if calibrated and sd[k] is not head_w]
    materialize(model, outer, store, device=device)
    if tie and hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in model.state_dict(keep_vars=True).items()
            if not n.startswith(block_prefix) and t.device.type == "meta"
            and (not streamed or n in outer)]
    if left:
        raise FormatError(f"tensors {left[:3]} could not be read from the source")
    for mod in model.modules():  # computed buffers (rotary tables) follow the device
        for bn, buf in list(mod.named_buffers(recurse=False)):
            if buf.device.type not in ("meta", device.type):
                mod._buffers[bn] = buf.to(device)
    return outer


def _block_targets(blocks: nn.ModuleList, blocks_name: str, recipe,
                   block_range: Optional[tuple[int, int]]) -> list[list[str]]:
    """Per block, the relative names of the linears the recipe compresses (none outside
    ``block_range``)."""
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
    return targets_by_block


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
    _check_source(sd, keys, store, tie)
    outer = _materialize_outside(model, sd, keys, store, block_prefix, tie, device,
                                 writer is not None, calib_ids is not None)
    if calib_ids is not None:
        calib_ids = calib_ids.to(device)
    memory = {"rss_at_start_bytes": rss_at_start, "nonblock_bytes": _tensor_bytes(model),
              "block_float_bytes": 0, "activation_bytes": 0, "stash_estimate_bytes": 0}

    targets_by_block = _block_targets(blocks, blocks_name, recipe, block_range)
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
    memory["accounted_bytes"] = accounted_bytes(memory, float_path)
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
