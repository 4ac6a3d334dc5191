"""Load-time repack of the canonical packed tensors into the fragment-ordered GPU layout the
tensor-core kernels (``bitpress/csrc/cuda/qmma.cu``) read, and its exact inverse (for saving).

The canonical format (see :mod:`bitpress.formats.packing`) packs unsigned codes
``u = c + 2^(b-1)`` little-endian along the input dim into int32 words; this layout instead
stores, for every tile of 16 output rows and every K *chunk*, one 16-byte vector per lane of
a warp that already holds that lane's ``mma.m16n8k16`` A-operand codes, bit-ordered so that
``lop3(w >> shift, mask, magic)`` yields the register pairs directly.

mma.m16n8k16 A fragment (row-major 16×16): lane ``l`` (``g = l // 4``, ``t = l % 4``) holds
eight values ``a0..a7`` at (row, mma-k) =
``(g, 2t) (g, 2t+1) (g+8, 2t) (g+8, 2t+1) (g, 2t+8) (g, 2t+9) (g+8, 2t+8) (g+8, 2t+9)``;
register ``r`` (0..3) is the pair ``(a_{2r}, a_{2r+1})``. Inside each k16 step the layout
permutes k (the same permutation for A and B leaves the product unchanged): mma-k
``2t, 2t+1, 2t+8, 2t+9`` is input ``4t, 4t+1, 4t+2, 4t+3``, so the lane's B values (x) are
four consecutive inputs, one 8-byte load. The lane's values thus sit at input columns
``4t + (0, 1, 0, 1, 2, 3, 2, 3)`` of rows ``g + (0, 0, 8, 8, 0, 0, 8, 8)``.

Per bit width (``C`` = K chunk, one 16-byte lane vector per (tile, chunk)):

* **W4** (``C = 64``, 4 k16 steps): word ``s`` of the vector is step ``s``; register ``r``'s
  low half at nibble ``r``, high half at nibble ``r + 4``, so
  ``lop3(w >> 4r, 0x000f000f, 0x64006400)`` is register ``r`` (as ``1024 + u`` in fp16).
* **W2** (``C = 128``, 8 steps): word ``w`` holds steps ``2w, 2w+1``; pair ``j`` (0..7:
  step ``2w + j // 4``, register ``j % 4``) low half at 2-bit slot ``j``, high half at slot
  ``8 + j``: ``lop3(w >> 2j, 0x00030003, 0x64006400)``.
* **W3** (``C = 128``): the low two bits of ``u`` as a W2 plane (16 bytes per lane) plus a
  1-bit plane of two words per lane (8 bytes): word ``v`` holds steps ``4v .. 4v+3``; pair
  ``j`` (0..15: step ``4v + j // 4``, register ``j % 4``) has its low half's bit at bit ``j``
  and its high half's bit at bit ``16 + j``; ``((p >> j) << 2) & 0x00040004`` ORed in gives
  ``u``. Exactly 3 bits per code.

Tiles are ordered stripe-major, chunk-minor: ``qw[tile, chunk, lane, word]``, so a tile's
whole K range is one contiguous byte range. Scale and zero are interleaved per group:
``sz[tile, group, row16, 2]`` (fp16 when the canonical parameters are fp16, else fp32), so
one 32-bit (or 64-bit) load gives a lane both values of one row. ``N`` is padded to 16
(padded rows: code 0, scale = zero = 0) and ``K`` to the chunk (code 0; the kernel also
zeroes x past ``K``). Groups must start on a k16 step: ``group_size % 16 == 0`` or
per-channel; ragged last groups are fine.

Group-sparse (:func:`sparse_to_gpu`): tiles of up to 16 kept rows that share one group
column, inside blocks of :data:`SPARSE_ROW_BLOCK` output rows, ordered (block, column); each
tile holds the same fragment-ordered codes for a ``[16, gs]`` matrix (``gs`` padded to the
chunk), its (s, z) pairs and its 16 row indices (``-1`` for padding rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError
from ..formats.packing import pack_codes, unpack_codes

TILE_N = 16
SPARSE_ROW_BLOCK = 128
CHUNK = {2: 128, 3: 128, 4: 64}

# lane -> (row, k) of the 8 A-fragment values, in register order a0..a7
_A_ROW = [0, 0, 8, 8, 0, 0, 8, 8]
_A_COL = [0, 1, 0, 1, 2, 3, 2, 3]     # + 4t: input columns after the per-step k permutation


def a_fragment_index() -> tuple[torch.Tensor, torch.Tensor]:
    """``rows, cols`` int64 ``[32, 8]``: the (row, input column) inside a 16×16 tile of each
    lane's A-fragment values ``a0..a7`` (the PTX m16n8k16 A layout with the per-step k
    permutation of the module docstring)."""
    lane = torch.arange(32)
    g, t = (lane // 4)[:, None], (lane % 4)[:, None]
    rows = g + torch.tensor(_A_ROW)[None, :]
    cols = 4 * t + torch.tensor(_A_COL)[None, :]
    return rows, cols


def supports_group_size(gs: int, k: int) -> bool:
    return gs >= k or gs % 16 == 0


def _chunk_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[T, 16, Kp]`` → lane fragment values ``[T, nc, 32, S, 8]``."""
    t_, _, kp = u.shape
    c = CHUNK[bits]
    nc, steps = kp // c, c // 16
    rows, cols = (t.to(u.device) for t in a_fragment_index())
    blk = u.reshape(t_, 16, nc, steps, 16).permute(0, 2, 3, 1, 4)   # [T, nc, S, 16r, 16k]
    v = blk[:, :, :, rows, cols]                                     # [T, nc, S, 32, 8]
    return v.permute(0, 1, 3, 2, 4)                                  # [T, nc, 32, S, 8]


def _to_i32(w: torch.Tensor) -> torch.Tensor:
    w = w & 0xFFFFFFFF
    return torch.where(w >= (1 << 31), w - (1 << 32), w).to(torch.int32)


def _pack_fragments(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Lane fragment values ``[T, nc, 32, S, 8]`` (unsigned, int64) → the lane vectors:
    ``[T, nc, 32, 4]`` int32 (plus the W3 1-bit plane ``[T, nc, 32, 2]``)."""
    t_, nc = v.shape[:2]
    if bits == 4:
        lo, hi = v[..., 0::2], v[..., 1::2]                     # [T,nc,32,4 steps,4 regs]
        sh = 4 * torch.arange(4, device=v.device)
        w = ((lo << sh) | (hi << (sh + 16))).sum(-1)            # disjoint bits: sum == or
        return _to_i32(w), None
    lo2, hi2 = (v & 3)[..., 0::2], (v & 3)[..., 1::2]           # [T,nc,32,8 steps,4 regs]
    # W2 plane: word w = steps 2w, 2w+1; pair j = 4*(step % 2) + reg
    lo2 = lo2.reshape(t_, nc, 32, 4, 8)
    hi2 = hi2.reshape(t_, nc, 32, 4, 8)
    sh = 2 * torch.arange(8, device=v.device)
    w2 = _to_i32(((lo2 << sh) | (hi2 << (sh + 16))).sum(-1))
    if bits == 2:
        return w2, None
    lo1, hi1 = (v >> 2)[..., 0::2], (v >> 2)[..., 1::2]
    lo1 = lo1.reshape(t_, nc, 32, 2, 16)
    hi1 = hi1.reshape(t_, nc, 32, 2, 16)
    sh1 = torch.arange(16, device=v.device)
    w1 = _to_i32(((lo1 << sh1) | (hi1 << (sh1 + 16))).sum(-1))
    return w2, w1


def _unpack_fragments(qw: torch.Tensor, q1: Optional[torch.Tensor], bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_fragments` → ``[T, nc, 32, S, 8]`` int64 unsigned codes."""
    w = qw.to(torch.int64) & 0xFFFFFFFF
    t_, nc = w.shape[:2]
    if bits == 4:
        sh = 4 * torch.arange(4)
        lo = (w[..., None] >> sh) & 15
        hi = (w[..., None] >> (sh + 16)) & 15
        return torch.stack([lo, hi], -1).reshape(t_, nc, 32, 4, 8)
    sh = 2 * torch.arange(8)
    lo = ((w[..., None] >> sh) & 3).reshape(t_, nc, 32, 8, 4)
    hi = ((w[..., None] >> (sh + 16)) & 3).reshape(t_, nc, 32, 8, 4)
    v = torch.stack([lo, hi], -1).reshape(t_, nc, 32, 8, 8)
    if bits == 3:
        p = q1.to(torch.int64) & 0xFFFFFFFF
        sh1 = torch.arange(16)
        lo1 = ((p[..., None] >> sh1) & 1).reshape(t_, nc, 32, 8, 4)
        hi1 = ((p[..., None] >> (sh1 + 16)) & 1).reshape(t_, nc, 32, 8, 4)
        v = v | (torch.stack([lo1, hi1], -1).reshape(t_, nc, 32, 8, 8) << 2)
    return v


def _unchunk(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_chunk_codes`: ``[T, nc, 32, S, 8]`` → ``[T, 16, Kp]``."""
    t_, nc, _, steps, _ = v.shape
    rows, cols = a_fragment_index()
    out = torch.empty(t_, nc, steps, 16, 16, dtype=v.dtype)
    out[:, :, :, rows, cols] = v.permute(0, 1, 3, 2, 4)
    return out.permute(0, 3, 1, 2, 4).reshape(t_, 16, nc * steps * 16)


def _sz_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype == torch.float16 else torch.float32


@dataclass
class GpuDense:
    """A dense weight in the fragment-ordered layout (see module docstring)."""
    qw: torch.Tensor                 # int32 [n_tiles, n_chunks, 32, 4]
    q1: Optional[torch.Tensor]       # int32 [n_tiles, n_chunks, 32, 2] (W3 high-bit plane)
    sz: torch.Tensor                 # fp16/fp32 [n_tiles, n_groups, 16, 2]
    n: int
    k: int
    bits: int
    gs: int
    param_dtype: torch.dtype         # dtype of the canonical scales/zeros

    @property
    def n_tiles(self) -> int:
        return self.qw.shape[0]

    @property
    def n_chunks(self) -> int:
        return self.qw.shape[1]

    @property
    def n_groups(self) -> int:
        return self.sz.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qw, self.q1, self.sz)
                   if t is not None)

    def to(self, device) -> "GpuDense":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return GpuDense(mv(self.qw), mv(self.q1), mv(self.sz), self.n, self.k, self.bits,
                        self.gs, self.param_dtype)


def dense_to_gpu(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int, in_features: int) -> GpuDense:
    """Canonical dense tensors → :class:`GpuDense` (on the device of ``qweight``).

    ``group_size`` is the effective group size (``in_features`` for per-channel)."""
    if bits not in CHUNK:
        raise ConfigError(f"GPU layout: bits must be 2, 3 or 4, got {bits}")
    k, gs = in_features, group_size
    if not supports_group_size(gs, k):
        raise ConfigError(f"GPU layout: group size {gs} must be a multiple of 16 (or "
                          f"per-channel); use the Triton kernels for this weight")
    dev = qweight.device
    n = qweight.shape[0]
    ng = (k + gs - 1) // gs
    if tuple(scales.shape) != (n, ng) or tuple(zeros.shape) != (n, ng):
        raise ConfigError(f"GPU layout: scales/zeros must be {(n, ng)}, got "
                          f"{tuple(scales.shape)} / {tuple(zeros.shape)}")
    c = CHUNK[bits]
    npad, kp = -(-n // TILE_N) * TILE_N, max(c, -(-k // c) * c)
    off = 1 << (bits - 1)
    # built on the weight's own device (a GPU repacks a large layer in milliseconds)
    u = torch.full((npad, kp), off, dtype=torch.int64, device=dev)
    u[:n, :k] = unpack_codes(qweight, bits, k).to(torch.int64) + off
    qw, q1 = _pack_fragments(_chunk_codes(u.reshape(npad // 16, 16, kp), bits), bits)
    del u
    sdt = _sz_dtype(scales.dtype)
    sz = torch.zeros(npad, ng, 2, dtype=sdt, device=dev)
    sz[:n, :, 0] = scales.detach().to(sdt)
    sz[:n, :, 1] = zeros.detach().to(sdt)
    sz = sz.reshape(npad // 16, 16, ng, 2).permute(0, 2, 1, 3).contiguous()
    return GpuDense(qw.contiguous(), None if q1 is None else q1.contiguous(), sz, n, k, bits,
                    gs, scales.dtype)


def dense_codes(p: GpuDense) -> torch.Tensor:
    """Unsigned codes ``[N_pad, K_pad]`` int64 of a :class:`GpuDense` (padding included)."""
    v = _unpack_fragments(p.qw.cpu(), None if p.q1 is None else p.q1.cpu(), p.bits)
    u = _unchunk(v, p.bits)
    return u.reshape(-1, u.shape[-1])


def dense_from_gpu(p: GpuDense) -> dict[str, torch.Tensor]:
    """Inverse repack: the canonical ``qweight``, ``scales``, ``zeros`` (bit-exact)."""
    u = dense_codes(p)[:p.n, :p.k]
    qweight = pack_codes((u - (1 << (p.bits - 1))).to(torch.int8), p.bits)
    sz = p.sz.cpu().permute(0, 2, 1, 3).reshape(-1, p.n_groups, 2)[:p.n]
    dev = p.qw.device
    return {"qweight": qweight.to(dev),
            "scales": sz[..., 0].to(p.param_dtype).contiguous().to(dev),
            "zeros": sz[..., 1].to(p.param_dtype).contiguous().to(dev)}


# ---- group-sparse ---------------------------------------------------------------------------
@dataclass
class GpuSparse:
    """A group-sparse weight as tiles of up to 16 kept rows sharing one group column."""
    qw: torch.Tensor                 # int32 [n_tiles, n_chunks, 32, 4]
    q1: Optional[torch.Tensor]       # int32 [n_tiles, n_chunks, 32, 2] (W3)
    sz: torch.Tensor                 # fp16/fp32 [n_tiles, 16, 2]
    rows: torch.Tensor               # int32 [n_tiles, 16] output row (-1: padding)
    cols: torch.Tensor               # int32 [n_tiles] group column
    block_ptr: torch.Tensor          # int32 [n_blocks + 1] tiles of row block b
    n: int
    k: int
    bits: int
    gs: int
    nnz: int
    param_dtype: torch.dtype

    @property
    def n_tiles(self) -> int:
        return self.qw.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.qw, self.q1, self.sz, self.rows, self.cols, self.block_ptr)
                   if t is not None)


def sparse_to_gpu(row_ptr: torch.Tensor, col_idx: torch.Tensor, qvalues: torch.Tensor,
                  scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                  in_features: int) -> GpuSparse:
    """Canonical block-sparse rows → :class:`GpuSparse` (rows of a tile share a column)."""
    if bits not in CHUNK:
        raise ConfigError(f"GPU layout: bits must be 2, 3 or 4, got {bits}")
    gs, k = group_size, in_features
    if gs % 16:
        raise ConfigError(f"GPU sparse layout: group size {gs} must be a multiple of 16")
    dev = qvalues.device
    rp = row_ptr.cpu().long()
    n = rp.numel() - 1
    nnz = col_idx.numel()
    rows = torch.repeat_interleave(torch.arange(n), rp[1:] - rp[:-1])
    cols = col_idx.cpu().long()
    blk = rows // SPARSE_ROW_BLOCK
    ng = (k + gs - 1) // gs
    # order kept groups by (block, column, row); cut each (block, column) run into tiles of 16
    key = (blk * ng + cols) * (n + 1) + rows
    order = torch.argsort(key)
    bc = (blk * ng + cols)[order]
    new_run = torch.ones(nnz, dtype=torch.bool)
    if nnz:
        new_run[1:] = bc[1:] != bc[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1
    run_start = torch.nonzero(new_run).flatten()
    pos = torch.arange(nnz) - run_start[run_id]          # position inside its run
    run_len = torch.bincount(run_id, minlength=int(run_id.max()) + 1 if nnz else 0)
    run_tiles = (run_len + 15) // 16
    tile_base = torch.cumsum(run_tiles, 0) - run_tiles
    tile = tile_base[run_id] + pos // 16
    slot = pos % 16
    nt = int(run_tiles.sum()) if nnz else 0
    c = CHUNK[bits]
    gp = -(-gs // c) * c
    off = 1 << (bits - 1)
    u = torch.full((nt, 16, gp), off, dtype=torch.int64)
    codes = unpack_codes(qvalues.cpu(), bits, gs).to(torch.int64) + off
    u[tile, slot, :gs] = codes[order]
    sdt = _sz_dtype(scales.dtype)
    sz = torch.zeros(nt, 16, 2, dtype=sdt)
    sz[tile, slot, 0] = scales.detach().cpu().reshape(-1)[order].to(sdt)
    sz[tile, slot, 1] = zeros.detach().cpu().reshape(-1)[order].to(sdt)
    trow = torch.full((nt, 16), -1, dtype=torch.int32)
    trow[tile, slot] = rows[order].to(torch.int32)
    tcol = torch.zeros(nt, dtype=torch.int32)
    tblk = torch.zeros(nt, dtype=torch.int64)
    if nt:
        tcol[tile] = cols[order].to(torch.int32)
        tblk[tile] = blk[order]
    nb = -(-n // SPARSE_ROW_BLOCK)
    block_ptr = torch.zeros(nb + 1, dtype=torch.int64)
    block_ptr[1:] = torch.cumsum(torch.bincount(tblk, minlength=nb)[:nb], 0) if nt else 0
    if nt:
        qw, q1 = _pack_fragments(_chunk_codes(u, bits), bits)
    else:
        qw = torch.zeros(0, gp // c, 32, 4, dtype=torch.int32)
        q1 = torch.zeros(0, gp // c, 32, 2, dtype=torch.int32) if bits == 3 else None
    mv = lambda t: None if t is None else t.contiguous().to(dev)  # noqa: E731
    return GpuSparse(mv(qw), mv(q1), mv(sz), mv(trow), mv(tcol),
                     mv(block_ptr.to(torch.int32)), n, k, bits, gs, nnz, scales.dtype)


def sparse_from_gpu(p: GpuSparse) -> dict[str, torch.Tensor]:
    """Inverse repack: the canonical BSR tensors (row-major, ascending columns; bit-exact)."""
    dev = p.qw.device
    rows = p.rows.cpu().long()
    valid = rows >= 0
    t_idx, s_idx = valid.nonzero(as_tuple=True)
    r = rows[t_idx, s_idx]
    col = p.cols.cpu().long()[t_idx]
    order = torch.argsort(r * (p.k // p.gs + 2) + col)
    t_idx, s_idx, r, col = t_idx[order], s_idx[order], r[order], col[order]
    if p.n_tiles:
        u = _unchunk(_unpack_fragments(p.qw.cpu(), None if p.q1 is None else p.q1.cpu(),
                                       p.bits), p.bits)
        codes = (u[t_idx, s_idx, :p.gs] - (1 << (p.bits - 1))).to(torch.int8)
    else:
        codes = torch.zeros(0, p.gs, dtype=torch.int8)
    row_ptr = torch.zeros(p.n + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(torch.bincount(r, minlength=p.n)[:p.n], 0)
    sz = p.sz.cpu()[t_idx, s_idx]
    return {"row_ptr": row_ptr.to(torch.int32).to(dev),
            "col_idx": col.to(torch.int32).to(dev),
            "qvalues": pack_codes(codes.contiguous(), p.bits).to(dev),
            "scales": sz[:, 0].to(p.param_dtype).contiguous().to(dev),
            "zeros": sz[:, 1].to(p.param_dtype).contiguous().to(dev)}


# ---- per-weight cache (the module's buffers stay canonical; this is derived once) ------------
def _cache():
    from .repack_cache import RepackCache
    global _CACHE
    if _CACHE is None:
        _CACHE = RepackCache()
    return _CACHE


_CACHE = None


def dense_gpu_cached(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     bits: int, group_size: int, in_features: int) -> GpuDense:
    """:func:`dense_to_gpu`, cached per ``qweight`` (re-derived after an in-place update)."""
    from .repack_cache import tensor_sig
    sig = (tensor_sig(qweight), tensor_sig(scales), tensor_sig(zeros), bits, group_size,
           in_features)
    return _cache().get(qweight, sig, lambda: dense_to_gpu(qweight, scales, zeros, bits,
                                                           group_size, in_features), "gpu")


def sparse_gpu_cached(row_ptr, col_idx, qvalues, scales, zeros, bits: int, group_size: int,
                      in_features: int) -> GpuSparse:
    """:func:`sparse_to_gpu`, cached per ``qvalues``."""
    from .repack_cache import tensor_sig
    sig = tuple(tensor_sig(t) for t in (row_ptr, col_idx, qvalues, scales, zeros)) + (
        bits, group_size, in_features)
    return _cache().get(qvalues, sig, lambda: sparse_to_gpu(
        row_ptr, col_idx, qvalues, scales, zeros, bits, group_size, in_features), "gpu")
