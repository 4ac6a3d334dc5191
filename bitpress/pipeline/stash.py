"""One forward per block: every calibration batch's forward runs in its own thread and is
paused at each group's input until the group is quantized (true-sequential compression
without re-running the block up to each group)."""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional

import torch
from torch import nn

from .capture import Hessian, _Stop
from .memory import _return_big_frees_to_os
from .skeleton import linear_weight

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
            accs[gi] = acc = None  # the float64 sum is freed before the solve (both names)
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


def stash_bytes_estimate(block: nn.Module, names: list[str], activation_bytes: int,
                         hidden_size: int) -> int:
    """Rough upper bound of what :func:`stash_forward` holds at once beyond the block
    inputs: per token the widest linear input + a residual + two more hidden-sized
    tensor, in float32 (``activation_bytes`` = the block inputs of all batches)."""
    widest = max((linear_weight(block.get_submodule(n)).shape[1] for n in names),
                 default=hidden_size)
    return int(activation_bytes * (widest + 3 * hidden_size) / max(hidden_size, 1))
