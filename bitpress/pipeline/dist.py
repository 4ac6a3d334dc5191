"""Compression on several processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Data parallel over calibration batches: global batch ``b`` lives on rank ``b % world``;
every rank streams the same blocks from the (shared) checkpoint, runs its own batches
through each block, and the Hessian sums are all-reduced (float64) before each group is
solved. The linears of a group (q/k/v, gate/up) are solved on different ranks
(``j % world``) and broadcast, so the solves run in parallel too. A block hook (decoupleQ /
GQSA block tuning) sees every batch: hidden states, targets and outputs are gathered to
all ranks and the (deterministic) tuning runs on each, so the result equals the
single-process one; its compute is not split.

Why not blocks pipelined across ranks: block ``i + 1``'s Hessians need block ``i``'s
*quantized* outputs, so ranks holding consecutive blocks would wait on each other for
every block; splitting batches keeps every rank busy on the same block, and its only
communication is one ``n x n`` float64 all-reduce per group plus the packed results.

Equality with one process: each rank's per-batch products are float32 values summed in
float64; the sum in a different order is exact unless the addends' exponents differ by
more than ~29 bits, so the float32 Hessian (sum / n, rounded) is identical in practice —
the tests check bit-identical packed weights; the docs state it as the expected case, not
a guarantee.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..errors import ConfigError
from ..formats import QuantizedWeight, num_groups


class Dist:
    """The process group as the pipeline needs it (one process: every method is trivial)."""

    def __init__(self) -> None:
        import torch.distributed as td

        self.td = td
        self.on = td.is_available() and td.is_initialized()
        self.rank = td.get_rank() if self.on else 0
        self.world = td.get_world_size() if self.on else 1
        self.backend = td.get_backend() if self.on else None
        # NCCL moves CUDA tensors only
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) \
            if self.backend == "nccl" else torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.on and self.world > 1

    def local(self, n: int) -> list[int]:
        """Global batch indices held by this rank."""
        return list(range(self.rank, n, self.world))

    def owner(self, j: int) -> int:
        return j % self.world

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.comm_device)

    def barrier(self) -> None:
        if self.active:
            self.td.barrier()

    def reduce_hessian(self, acc) -> None:
        """Sum a :class:`~bitpress.pipeline.capture.Hessian` over the ranks (in place)."""
        if not self.active:
            return
        flag = self._dev(torch.tensor([1 if acc._upper else 0], dtype=torch.int64))
        self.td.all_reduce(flag, op=self.td.ReduceOp.MAX)
        n = self._dev(torch.tensor([acc.n], dtype=torch.int64))
        self.td.all_reduce(n)
        if int(flag[0]) and not acc._upper:  # same representation on every rank
            acc.sum = torch.triu(acc.sum)
            acc._upper = True
        s = self._dev(acc.sum)
        self.td.all_reduce(s)
        acc.sum = s.to(acc.sum.device)
        acc.n = int(n[0])

    def share_qweight(self, qw: Optional[QuantizedWeight], src: int,
                      W: torch.Tensor) -> QuantizedWeight:
        """``qw`` solved on rank ``src`` (``None`` elsewhere), on every rank."""
        if not self.active:
            assert qw is not None
            return qw
        dev = W.device
        out, inp = W.shape
        head = torch.zeros(4, dtype=torch.int64)
        if self.rank == src:
            assert qw is not None
            head = torch.tensor([qw.bits, qw.group_size, int(qw.keep is not None),
                                 int(qw.scale.dtype == torch.float64)], dtype=torch.int64)
        head = self._dev(head)
        self.td.broadcast(head, src)
        bits, gs, has_keep, f64 = (int(x) for x in head.tolist())
        ng = num_groups(gs, inp)
        pdt = torch.float64 if f64 else torch.float32
        if self.rank == src:
            codes, scale, zero = qw.codes, qw.scale.to(pdt), qw.zero.to(pdt)
            keep = qw.keep.to(torch.uint8) if has_keep else None
        else:
            codes = torch.empty(out, inp, dtype=torch.int8)
            scale = torch.empty(out, ng, dtype=pdt)
            zero = torch.empty(out, ng, dtype=pdt)
            keep = torch.empty(out, ng, dtype=torch.uint8) if has_keep else None
        res = []
        for t in (codes, scale, zero) + ((keep,) if has_keep else ()):
            c = self._dev(t.contiguous())
            self.td.broadcast(c, src)
            res.append(c.to(dev))
        if self.rank == src:
            return qw
        return QuantizedWeight(res[0], res[1], res[2], bits, gs,
                               res[3].bool() if has_keep else None)

    def gather(self, local: Optional[list[torch.Tensor]], sizes: list[int]
               ) -> Optional[list[torch.Tensor]]:
        """Every rank's batches in global order (``sizes``: each global batch's size; the
        other dimensions are those of the local tensors)."""
        if not self.active or local is None:
            return local
        if not local:
            raise ConfigError("every rank needs at least one calibration batch: use more "
                              "--nsamples or a smaller --calib-batch-size")
        like = local[0]
        out = []
        for b, bs in enumerate(sizes):
            src = self.owner(b)
            t = local[b // self.world] if src == self.rank else \
                torch.empty((bs,) + tuple(like.shape[1:]), dtype=like.dtype)
            c = self._dev(t.contiguous())
            self.td.broadcast(c, src)
            out.append(c.to(like.device))
        return out

    def scatter(self, full: Optional[list[torch.Tensor]]) -> Optional[list[torch.Tensor]]:
        """This rank's share of a list over every global batch."""
        if not self.active or full is None:
            return full
        return [full[b] for b in self.local(len(full))]


def init_from_env(device: str = "cpu") -> Dist:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); gloo for CPU,
    NCCL for CUDA. One process: nothing to join."""
    import torch.distributed as td

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group(backend)
    return Dist()
