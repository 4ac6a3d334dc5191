"""Canonical bit packing of integer codes into int32 words.

Layout (format_versions 1 to 3): signed codes ``c`` in ``[-2^(b-1), 2^(b-1)-1]`` are offset to
unsigned ``u = c + 2^(b-1)`` and packed little-endian along the last dimension: word ``j``
holds elements ``j*pf ... j*pf+pf-1`` with element ``i`` of the word at bits ``i*b``,
where ``pf = 32 // b`` (16 for 2-bit, 10 for 3-bit, 8 for 4-bit, 4 for 8-bit). The last
dimension is padded up to a multiple of ``pf`` with the signed code 0; readers must ignore
elements past the logical length.

For 2, 4 and 8 bits this is compressed-tensors' ``pack-quantized`` layout (bit-identical
when the row length is a multiple of ``pf``; the library pads with unsigned 0). For 3 bits it
is not: compressed-tensors (0.20) packs a dense bit stream in which a code may straddle two
words (32 codes in 3 words), while bitpress keeps 10 codes per word (2 bits unused). bitpress
keeps its layout because every kernel (C++, Triton, CUDA) decodes a 3-bit code from a single
word, and existing checkpoints need no conversion; the 3-bit cost is 3.2 bits per code
instead of 3.0. ``bitpress export --format compressed-tensors`` writes the library's layout
(:func:`bitpress.integrations.compressed_tensors.pack_bitstream`, verified against the
library's own unpacking in tests).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError, FormatError

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits={bits} is not supported; choose one of {SUPPORTED_BITS}")


def pack_factor(bits: int) -> int:
    """Codes per int32 word."""
    check_bits(bits)
    return 32 // bits


def packed_words(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` codes."""
    pf = pack_factor(bits)
    return (n + pf - 1) // pf


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed int8 codes ``[..., n]`` into int32 words ``[..., ceil(n / pf)]``."""
    check_bits(bits)
    if codes.dtype != torch.int8:
        raise FormatError(f"codes must be int8, got {codes.dtype}")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise FormatError(f"codes out of range for {bits}-bit: must lie in [{lo}, {hi}]")
    pf = 32 // bits
    n = codes.shape[-1]
    words = (n + pf - 1) // pf
    u = codes.to(torch.int64) + (1 << (bits - 1))
    pad = words * pf - n
    if pad:
        u = torch.nn.functional.pad(u, (0, pad), value=1 << (bits - 1))
    u = u.reshape(*codes.shape[:-1], words, pf)
    shifts = torch.arange(pf, dtype=torch.int64, device=codes.device) * bits
    packed = (u << shifts).sum(dim=-1)
    # two's-complement wrap into int32 (values with bit 31 set become negative)
    packed = torch.where(packed >= (1 << 31), packed - (1 << 32), packed)
    return packed.to(torch.int32).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 words ``[..., w]`` → int8 codes ``[..., n]``."""
    check_bits(bits)
    if packed.dtype != torch.int32:
        raise FormatError(f"packed codes must be int32, got {packed.dtype}")
    pf = 32 // bits
    if packed.shape[-1] * pf < n or packed.shape[-1] != (n + pf - 1) // pf:
        raise FormatError(
            f"packed tensor has {packed.shape[-1]} words per row; {n} codes at {bits}-bit "
            f"need {(n + pf - 1) // pf}")
    shifts = torch.arange(pf, dtype=torch.int32, device=packed.device) * bits
    mask = (1 << bits) - 1
    u = (packed.unsqueeze(-1) >> shifts) & mask
    u = u.reshape(*packed.shape[:-1], packed.shape[-1] * pf)[..., :n]
    return (u - (1 << (bits - 1))).to(torch.int8)
