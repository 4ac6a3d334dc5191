"""The per-weight cache of kernel-specific repacked layouts (shared by every device's
kernels; the disk format never changes for them).

One entry per owning tensor (e.g. ``qweight``), keyed by ``id()`` plus a layout tag and
validated by a weak reference to the owner and a signature of every tensor the repack read
(storage pointer, version counter, shape, dtype, device): an in-place update or a recycled
``id`` triggers a fresh repack, and entries die with their tensor.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Hashable

import torch


def tensor_version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return 0


def tensor_sig(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tensor_version(t), tuple(t.shape), t.dtype, t.device)


class RepackCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, Hashable], tuple] = {}

    def get(self, owner: torch.Tensor, sig: tuple, build: Callable[[], Any],
            tag: Hashable = 0) -> Any:
        key = (id(owner), tag)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is owner and hit[1] == sig:
            return hit[2]
        value = build()
        # the callback binds what it needs: it may fire at interpreter shutdown, after the
        # module globals are gone
        ref = weakref.ref(owner, lambda r, k=key, lock=self._lock, entries=self._entries:
                          _drop(k, r, lock, entries))
        with self._lock:
            self._entries[key] = (ref, sig, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _drop(key, ref, lock, entries) -> None:
    with lock:
        hit = entries.get(key)
        if hit is not None and hit[0] is ref:
            del entries[key]
