"""Calibration activations of the decoder blocks: capturing each block's inputs and extra
arguments, the running Hessians ``XᵀX / n`` of a linear's inputs, and the sequential order
of a block's linears.

* block inputs and the keyword arguments each block receives (attention mask, position
  ids / rotary embeddings, cache position) are captured by replacing the blocks' forward
  for one embedding pass, so per-layer differences (sliding-window masks) are kept;
* :func:`sequential_groups`: one probe forward records the order in which the block's
  linears are called; consecutive calls on the *same* input tensor form a group (q/k/v,
  gate/up, GPT-2's ``c_attn`` alone, …);
* :func:`_group_hessian` measures one group's Hessian by re-running the block up to its
  input (the paused single forward is in :mod:`bitpress.pipeline.stash`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import ConfigError
from .skeleton import linear_weight


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early."""


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


class Hessian:
    """Running ``H = XᵀX / n`` of a linear's inputs (float32 products, float64 sum).

    XᵀX is symmetric: only its upper triangle is accumulated, one slab of ``_SLAB``
    columns at a time (``X[:, :j1]ᵀ · X[:, j0:j1]`` into ``sum[:j1, j0:j1]``), so a batch
    costs about half a full matmul's flops (as BLAS ``syrk`` would) and no ``n × n``
    float32 temporary (0.76 GB for a 13824-wide input; one ``n × _SLAB`` slab instead)."""

    _SLAB = 1024

    def __init__(self, n_in: int, device: torch.device | str | None = None):
        self.sum = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)
        self.n = 0
        # self.sum holds only the upper triangle, the lower part zero (a zero matrix is one);
        # False once .H has mirrored it into the full matrix
        self._upper = True

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        S, n, step = self.sum, self.sum.shape[0], self._SLAB
        if x.shape[1] != n:
            raise ConfigError(f"Hessian of {n} inputs got activations of width {x.shape[1]}")
        if not self._upper:  # the full matrix (after .H was read): drop its lower part
            for i in range(0, n, step):
                S[i:i + step, :i].zero_()
                S[i:i + step, i:i + step].triu_()
            self._upper = True
        x = x.contiguous()
        for j in range(0, n, step):
            j1 = min(j + step, n)
            blk = x[:, :j1].T @ x[:, j:j1]  # rows :j1 of columns j:j1 (float32)
            blk[j:j1].triu_()  # the diagonal block's lower part belongs to the lower triangle
            S[:j1, j:j1] += blk  # promoted to float64 per element
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
