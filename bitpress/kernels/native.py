"""Loader for the native CPU extension ``bitpress._C`` (built from csrc/ by setup.py).

``available()`` says whether it was built; callers fall back to pure torch when not.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from ..formats.packing import check_bits, packed_words, unpack_codes as unpack_codes_torch


@functools.lru_cache(maxsize=None)
def _module() -> Optional[Any]:
    try:
        from .. import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def available() -> bool:
    return _module() is not None


def cpu_features() -> dict[str, bool]:
    m = _module()
    return dict(m.cpu_features()) if m is not None else {}


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Fast unpack of canonical int32 words ``[rows, w]`` to int8 codes ``[rows, n]`` on CPU
    (multi-threaded C++); same result as :func:`bitpress.formats.unpack_codes`, which it
    falls back to without the extension or for non-CPU tensors."""
    m = _module()
    if m is None or packed.device.type != "cpu" or packed.dim() != 2:
        return unpack_codes_torch(packed, bits, n)
    check_bits(bits)
    if packed.dtype != torch.int32 or packed.shape[1] != packed_words(n, bits):
        return unpack_codes_torch(packed, bits, n)  # raises the canonical error
    packed = packed.contiguous()
    out = torch.empty(packed.shape[0], n, dtype=torch.int8)
    m.unpack_codes(packed.data_ptr(), out.data_ptr(), packed.shape[0], packed.shape[1], n, bits,
                   torch.get_num_threads())
    return out
