"""The one logical weight format every pass emits and every kernel consumes.

``W[r, k] ≈ scale[r, g(k)] * codes[r, k] + zero[r, g(k)]`` with ``g(k) = k // group_size``.

* ``codes``: int8 ``[out, in]``, signed, in ``[-2^(b-1), 2^(b-1)-1]``.
* ``scale``, ``zero``: float32 ``[out, n_groups]``; a float offset covers symmetric
  (``zero = 0``) and integer-zero-point schemes alike.
* ``group_size``: 16..256 in steps of 16, or ``-1`` for one group per row (per-channel).
  When ``in`` is not a multiple of the group size the **last group of every row is
  shorter** (``n_groups = ceil(in / group_size)``): SmolLM2's 576 columns at group 128
  make four groups of 128 and one of 64. Nothing is padded in the logical format.
* ``keep``: optional bool ``[out, n_groups]`` (group sparsity, GQSA): pruned groups
  dequantise to exactly 0, whatever their codes and parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError, FormatError
from .packing import check_bits, pack_codes, packed_words, unpack_codes

MIN_GROUP, MAX_GROUP, GROUP_STEP = 16, 256, 16


def check_group_size(group_size: int) -> None:
    if group_size == -1:
        return
    if not (MIN_GROUP <= group_size <= MAX_GROUP) or group_size % GROUP_STEP:
        raise ConfigError(
            f"group size {group_size} is out of range: use a multiple of {GROUP_STEP} "
            f"between {MIN_GROUP} and {MAX_GROUP}, or -1 for per-channel")


def effective_group_size(group_size: int, in_features: int) -> int:
    """Columns per group (the row length for per-channel)."""
    return in_features if group_size == -1 else group_size


def num_groups(group_size: int, in_features: int) -> int:
    gs = effective_group_size(group_size, in_features)
    return (in_features + gs - 1) // gs


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Broadcast a per-group tensor ``[out, n_groups]`` to ``[out, in]``."""
    gs = effective_group_size(group_size, in_features)
    return t.repeat_interleave(gs, dim=-1)[..., :in_features]


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     group_size: int, in_features: int,
                     keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dequantizer: float32 ``W[r, k] = scale[r, g(k)]·codes[r, k] + zero[r, g(k)]``,
    times ``keep[r, g(k)]`` where a group keep mask is given (pruned groups are 0)."""
    s = expand_groups(scale.float(), group_size, in_features)
    z = expand_groups(zero.float(), group_size, in_features)
    w = s * codes.float() + z
    if keep is not None:
        w = w * expand_groups(keep.float(), group_size, in_features)
    return w


def dequantize_dense(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """Dequantised float32 ``[out, in]`` weight of the canonical dense packed layout
    (:meth:`QuantizedWeight.pack_dense`)."""
    return dequantize_codes(unpack_codes(qweight, bits, in_features), scales, zeros,
                            group_size, in_features)


def dequantize_bsr(row_ptr: torch.Tensor, col_idx: torch.Tensor, qvalues: torch.Tensor,
                   scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                   in_features: int) -> torch.Tensor:
    """Dequantised float32 ``[out, in]`` weight of the block-sparse-row layout
    (:meth:`QuantizedWeight.pack_bsr`; ``group_size`` effective); pruned groups are 0. Not
    validated: see :func:`validate_bsr`."""
    out = row_ptr.numel() - 1
    ng = (in_features + group_size - 1) // group_size
    vals = unpack_codes(qvalues, bits, group_size).float() * scales.float()[:, None] \
        + zeros.float()[:, None]
    w = torch.zeros(out, ng, group_size, dtype=torch.float32, device=qvalues.device)
    w[_bsr_rows(row_ptr).to(qvalues.device), col_idx.long()] = vals
    return w.reshape(out, ng * group_size)[:, :in_features]


class GroupedShape:
    """``gs`` (columns per group) and ``n_groups`` of anything with ``group_size`` and
    ``in_features``."""

    @property
    def gs(self) -> int:
        return effective_group_size(self.group_size, self.in_features)

    @property
    def n_groups(self) -> int:
        return num_groups(self.group_size, self.in_features)


@dataclass
class QuantizedWeight(GroupedShape):
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    keep: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        self.validate()

    # ---- shape helpers -------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def sparsity(self) -> float:
        if self.keep is None:
            return 0.0
        return 1.0 - float(self.keep.float().mean())

    def validate(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)
        if self.codes.dim() != 2 or self.codes.dtype != torch.int8:
            raise FormatError(f"codes must be a 2-D int8 tensor, got {tuple(self.codes.shape)} "
                              f"{self.codes.dtype}")
        if self.codes.shape[1] < 1:  # (per-channel groups would be 0 columns wide)
            raise FormatError("codes have no input columns; a weight needs at least one")
        lo, hi = -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        if self.codes.numel() and (int(self.codes.min()) < lo or int(self.codes.max()) > hi):
            raise FormatError(f"codes out of range for {self.bits}-bit: must lie in [{lo}, {hi}]")
        shape = (self.out_features, self.n_groups)
        for name in ("scale", "zero"):
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise FormatError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
            if not t.is_floating_point():
                raise FormatError(f"{name} must be floating point, got {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise FormatError(f"{name} contains non-finite values")
        if self.keep is not None:
            if tuple(self.keep.shape) != shape or self.keep.dtype != torch.bool:
                raise FormatError(f"keep must be bool {shape}, got {tuple(self.keep.shape)} "
                                  f"{self.keep.dtype}")
            if self.group_size == -1:
                raise ConfigError("group sparsity needs a group size; per-channel (-1) has one "
                                  "group per row")

    # ---- maths ---------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scale, self.zero, self.group_size,
                                self.in_features, self.keep).to(dtype)

    # ---- packed forms --------------------------------------------------------------
    def pack_dense(self, param_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """Canonical dense tensors: ``qweight`` int32 ``[out, ceil(in/pf)]``, ``scales``,
        ``zeros`` ``[out, n_groups]`` in ``param_dtype``. Pruned groups are stored with
        scale = zero = 0 so that the dense form dequantises them to 0 as well."""
        scale, zero = self.scale, self.zero
        if self.keep is not None:
            scale = scale * self.keep
            zero = zero * self.keep
        return {
            "qweight": pack_codes(self.codes, self.bits),
            "scales": _cast_params(scale, param_dtype, "scale"),
            "zeros": _cast_params(zero, param_dtype, "zero"),
        }

    @classmethod
    def from_dense(cls, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bits: int, group_size: int, in_features: int) -> "QuantizedWeight":
        check_group_size(group_size)
        if qweight.dim() != 2:
            raise FormatError(f"qweight must be 2-D, got shape {tuple(qweight.shape)}")
        codes = unpack_codes(qweight, bits, in_features)
        return cls(codes, scales.float(), zeros.float(), bits, group_size)

    def pack_bsr(self, param_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """Block-sparse-row form of the kept groups.

        * ``row_ptr`` int32 ``[out + 1]``: kept groups of row r are ``row_ptr[r]:row_ptr[r+1]``
        * ``col_idx`` int32 ``[nnz]``: group index of each kept group, ascending per row
        * ``qvalues`` int32 ``[nnz, ceil(gs/pf)]``: the group's codes, packed as a row of
          ``gs`` codes (a short last group is padded with code 0; readers ignore columns
          ``>= in_features``)
        * ``scales``, ``zeros`` ``[nnz]``
        """
        if self.group_size == -1:
            raise ConfigError("block-sparse storage needs a group size (got per-channel)")
        keep = self.keep if self.keep is not None else torch.ones(
            self.out_features, self.n_groups, dtype=torch.bool, device=self.codes.device)
        gs, ng = self.gs, self.n_groups
        pad = ng * gs - self.in_features
        codes = torch.nn.functional.pad(self.codes, (0, pad)) if pad else self.codes
        grouped = codes.reshape(self.out_features, ng, gs)
        rows, cols = keep.nonzero(as_tuple=True)  # row-major order: ascending per row
        row_ptr, col_idx = _bsr_index(keep)
        return {
            "row_ptr": row_ptr,
            "col_idx": col_idx,
            "qvalues": pack_codes(grouped[rows, cols].contiguous(), self.bits),
            "scales": _cast_params(self.scale[rows, cols], param_dtype, "scale"),
            "zeros": _cast_params(self.zero[rows, cols], param_dtype, "zero"),
        }

    @classmethod
    def from_bsr(cls, row_ptr: torch.Tensor, col_idx: torch.Tensor, qvalues: torch.Tensor,
                 scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                 in_features: int) -> "QuantizedWeight":
        check_bits(bits)
        check_group_size(group_size)
        if group_size == -1:
            raise ConfigError("block-sparse storage needs a group size (got per-channel)")
        validate_bsr(row_ptr, col_idx, qvalues, scales, zeros, bits, group_size, in_features)
        out = row_ptr.numel() - 1
        ng = num_groups(group_size, in_features)
        rows = _bsr_rows(row_ptr)
        cols = col_idx.long()
        group_codes = unpack_codes(qvalues, bits, group_size)
        codes = torch.zeros(out, ng, group_size, dtype=torch.int8, device=qvalues.device)
        codes[rows, cols] = group_codes
        scale = torch.zeros(out, ng, dtype=torch.float32, device=qvalues.device)
        zero = torch.zeros_like(scale)
        keep = torch.zeros(out, ng, dtype=torch.bool, device=qvalues.device)
        scale[rows, cols] = scales.float()
        zero[rows, cols] = zeros.float()
        keep[rows, cols] = True
        codes = codes.reshape(out, ng * group_size)[:, :in_features].contiguous()
        return cls(codes, scale, zero, bits, group_size, keep)


def _bsr_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_ptr, col_idx)`` int32 of a keep mask ``[out, n_groups]`` (row-major order:
    columns ascend within a row)."""
    row_ptr = torch.zeros(keep.shape[0] + 1, dtype=torch.int64, device=keep.device)
    row_ptr[1:] = keep.sum(dim=1).cumsum(0)
    cols = keep.nonzero(as_tuple=True)[1]
    return row_ptr.to(torch.int32), cols.to(torch.int32).contiguous()


def _bsr_rows(row_ptr: torch.Tensor) -> torch.Tensor:
    """The row (int64) of every kept group of block-sparse rows."""
    rp = row_ptr.long()
    return torch.repeat_interleave(torch.arange(rp.numel() - 1, device=rp.device),
                                   rp[1:] - rp[:-1])


def validate_bsr(row_ptr: torch.Tensor, col_idx: torch.Tensor, qvalues: torch.Tensor,
                 scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                 in_features: int) -> None:
    """Check a block-sparse-row weight; raise :class:`FormatError` on anything inconsistent."""
    ng = num_groups(group_size, in_features)
    if row_ptr.dim() != 1 or row_ptr.numel() < 1 or row_ptr.dtype != torch.int32:
        raise FormatError("row_ptr must be a 1-D int32 tensor of length out_features + 1")
    nnz = col_idx.numel()
    rp = row_ptr.long()
    if int(rp[0]) != 0 or int(rp[-1]) != nnz or bool((rp[1:] < rp[:-1]).any()):
        raise FormatError("row_ptr must start at 0, be non-decreasing and end at nnz")
    if col_idx.dtype != torch.int32 or col_idx.dim() != 1:
        raise FormatError("col_idx must be a 1-D int32 tensor")
    if nnz and (int(col_idx.min()) < 0 or int(col_idx.max()) >= ng):
        raise FormatError(f"col_idx out of range [0, {ng})")
    if nnz > 1:  # each row's groups once, in ascending order (what the writer emits)
        rows = _bsr_rows(row_ptr)
        same_row = rows[1:] == rows[:-1]
        if bool((same_row & (col_idx[1:] <= col_idx[:-1])).any()):
            raise FormatError("col_idx must list each row's kept groups once, in ascending "
                              "order")
    if tuple(qvalues.shape) != (nnz, packed_words(group_size, bits)):
        raise FormatError(f"qvalues has shape {tuple(qvalues.shape)}, expected "
                          f"{(nnz, packed_words(group_size, bits))}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (nnz,):
            raise FormatError(f"{name} has shape {tuple(t.shape)}, expected ({nnz},)")


def _cast_params(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConfigError(f"parameter dtype {dtype} not supported (float16, bfloat16, float32)")
    out = t.to(dtype).contiguous()
    if not bool(torch.isfinite(out).all()):
        raise FormatError(f"{name} overflows {dtype}; store parameters in float32 "
                          f"(--param-dtype float32)")
    return out


# ---------------------------------------------------------------------------------------
# the block-sparse index on disk (format_version 2): one bit per group
# ---------------------------------------------------------------------------------------
def keep_bits_bytes(n_groups: int) -> int:
    """Bytes per row of the on-disk keep bitmask."""
    return (n_groups + 7) // 8


def bsr_to_keep_bits(row_ptr: torch.Tensor, col_idx: torch.Tensor, n_groups: int
                     ) -> torch.Tensor:
    """The index of block-sparse rows as a bitmask, uint8 ``[out, ceil(n_groups/8)]``: bit
    ``g % 8`` of byte ``g // 8`` of row r is set when group g of row r is kept (trailing bits
    are 0). One bit per group instead of an int32 column index per kept group plus row
    pointers; :func:`keep_bits_to_bsr` inverts it exactly (``col_idx`` ascends per row)."""
    out = row_ptr.numel() - 1
    nb = keep_bits_bytes(n_groups)
    nnz = col_idx.numel()
    if nnz and (int(col_idx.min()) < 0 or int(col_idx.max()) >= n_groups):
        raise FormatError(f"col_idx out of range [0, {n_groups})")
    keep = torch.zeros(out, nb * 8, dtype=torch.bool, device=row_ptr.device)
    keep[_bsr_rows(row_ptr), col_idx.long()] = True
    if int(keep.sum()) != nnz:
        raise FormatError("col_idx lists a group of a row twice; a bitmask cannot hold it")
    w = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32, device=row_ptr.device)
    return (keep.view(out, nb, 8).to(torch.int32) * w).sum(-1).to(torch.uint8).contiguous()


def keep_bits_to_bsr(bits: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_ptr, col_idx)`` (int32) of a keep bitmask written by :func:`bsr_to_keep_bits`;
    a bitmask of the wrong dtype/shape or with bits set past ``n_groups`` is a
    :class:`FormatError`."""
    nb = keep_bits_bytes(n_groups)
    if bits.dtype != torch.uint8 or bits.dim() != 2 or bits.shape[1] != nb:
        raise FormatError(f"keep_bits must be uint8 [out, {nb}] for {n_groups} groups, got "
                          f"{bits.dtype} {tuple(bits.shape)}")
    out = bits.shape[0]
    sh = torch.arange(8, dtype=torch.int32, device=bits.device)
    keep = ((bits.to(torch.int32).unsqueeze(-1) >> sh) & 1).bool().reshape(out, nb * 8)
    if bool(keep[:, n_groups:].any()):
        raise FormatError(f"keep_bits has bits set past the {n_groups} groups of a row")
    return _bsr_index(keep[:, :n_groups])
