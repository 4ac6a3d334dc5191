"""A CPU emulator of the tensor-core kernels in ``bitpress/csrc/cuda/qmma.cu``.

It runs the kernels' arithmetic the way a warp does, on the fragment-ordered layout of
:mod:`.gpu_layout`, so the layout, the lane → (row, k) mappings, the magic-number dequant and
the per-group post-scaling are all checked on CPU against :mod:`.reference`:

* each lane's 16-byte vector is decoded with the kernel's bit operations
  (``lop3(w >> shift, mask, magic)`` → a pair of fp16/bf16 ``magic + u``, then
  ``fma(v, 1, -(magic + 2^(b-1)))`` in that dtype) into its eight A-fragment values;
* the A (16×16) and B (16×8, x transposed) operands are assembled from the per-lane fragments
  with the PTX m16n8k16 mappings, multiplied with fp32 accumulation, and the result is read
  back through the C-fragment mapping; each lane's B values are the four consecutive inputs
  ``4t..4t+3`` it loads, so the layout's per-step k permutation is checked too;
* per group: ``D_g`` (codes · x) and ``X_g`` (the all-ones mma: Σ x) are accumulated over the
  group's k16 steps, then ``acc += s · D_g + z · X_g`` with the lane's two rows' (s, z);
* the stream-K split (:func:`dense_schedule`): CTA ranges of (tile, chunk) units, chunks
  dealt round-robin to the 8 warps, warps summed in order, split tiles summed over their
  contributing CTAs in CTA order (the kernel's deterministic last-arriver reduction).

The arithmetic is vectorised over tiles and lanes; the loops run over chunks and k16 steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .gpu_layout import CHUNK, GpuDense, GpuSparse

WARPS = 8
MAGIC = {torch.float16: 0x6400, torch.bfloat16: 0x4300}          # 1024.0 / 128.0
MAGIC_VALUE = {torch.float16: 1024, torch.bfloat16: 128}


# ---- magic-number dequant -------------------------------------------------------------------
def _pairs(bits32: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """uint32 words → ``[..., 2]`` values of ``dtype`` (low half first)."""
    h = np.ascontiguousarray(bits32.astype(np.uint32)).view(np.uint16)
    t = torch.from_numpy(h.astype(np.int16).reshape(*bits32.shape, 2))
    return t.view(dtype)


def magic_pair(word: np.ndarray, shift: int, mask: int, dtype: torch.dtype,
               plane: Optional[np.ndarray] = None, plane_shift: int = 0,
               bits: int = 4) -> torch.Tensor:
    """One dequant step of the kernel: ``lop3(word >> shift, mask, magic·0x10001)`` (ORed with
    the W3 high bit ``((plane >> plane_shift) << 2) & 0x00040004``), reinterpreted as a pair of
    ``dtype`` and reduced by ``fma(v, 1, -(magic + 2^(bits-1)))`` in ``dtype``: the signed codes
    as exact small numbers of ``dtype``."""
    w = word.astype(np.uint64) & 0xFFFFFFFF
    m = MAGIC[dtype] * 0x10001
    v = ((w >> shift) & mask) | m
    if plane is not None:
        p = plane.astype(np.uint64) & 0xFFFFFFFF
        v |= ((p >> plane_shift) << 2) & 0x00040004
    pairs = _pairs(v, dtype)
    bias = torch.tensor(-(MAGIC_VALUE[dtype] + (1 << (bits - 1))), dtype=dtype)
    return torch.addcmul(bias.expand_as(pairs), pairs, torch.ones((), dtype=dtype))


def decode_vector(qw: np.ndarray, q1: Optional[np.ndarray], bits: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """A lane's vectors ``[..., 4]`` (+ W3 plane ``[..., 2]``) → its A-fragment values
    ``[..., steps, 8]`` (signed codes in ``dtype``), exactly as the kernel computes them."""
    regs = []
    if bits == 4:
        for s in range(4):
            regs.append(torch.stack([magic_pair(qw[..., s], 4 * r, 0x000F000F, dtype, bits=4)
                                     for r in range(4)], -2))
    else:
        for s in range(8):
            w = qw[..., s // 2]
            rr = []
            for r in range(4):
                j = 4 * (s % 2) + r
                if bits == 2:
                    rr.append(magic_pair(w, 2 * j, 0x00030003, dtype, bits=2))
                else:
                    j1 = 4 * (s % 4) + r
                    rr.append(magic_pair(w, 2 * j, 0x00030003, dtype, q1[..., s // 4], j1,
                                         bits=3))
            regs.append(torch.stack(rr, -2))
    v = torch.stack(regs, -3)                       # [..., steps, 4 regs, 2]
    return v.reshape(*v.shape[:-2], 8)


# ---- mma fragments (PTX m16n8k16 .f16/.bf16, native mma-k numbering) -------------------------
def _a_native_index() -> tuple[torch.Tensor, torch.Tensor]:
    """(row, mma-k) of each lane's A values a0..a7, as the PTX ISA defines them."""
    lane = torch.arange(32)
    g, t = (lane // 4)[:, None], (lane % 4)[:, None]
    rows = g + torch.tensor([0, 0, 8, 8, 0, 0, 8, 8])[None, :]
    k = 2 * t + torch.tensor([0, 1, 0, 1, 8, 9, 8, 9])[None, :]
    return rows, k


def _b_index() -> tuple[torch.Tensor, torch.Tensor]:
    """(mma-k, n) of each lane's B values b0..b3 (16×8 operand, 'col')."""
    lane = torch.arange(32)
    g, t = (lane // 4)[:, None], (lane % 4)[:, None]
    k = 2 * t + torch.tensor([0, 1, 8, 9])[None, :]
    return k, g.expand(32, 4)


def _b_input_k() -> torch.Tensor:
    """The input column the kernel loads for each lane's B value: ``4t + (0, 1, 2, 3)`` (one
    8-byte load of x; the layout permutes the weights' k the same way)."""
    t = (torch.arange(32) % 4)[:, None]
    return 4 * t + torch.tensor([0, 1, 2, 3])[None, :]


def _c_index() -> tuple[torch.Tensor, torch.Tensor]:
    """(row, n) of each lane's accumulator values c0..c3."""
    lane = torch.arange(32)
    g, t = (lane // 4)[:, None], (lane % 4)[:, None]
    row = g + torch.tensor([0, 0, 8, 8])[None, :]
    n = 2 * t + torch.tensor([0, 1, 0, 1])[None, :]
    return row, n


_AR, _AC = _a_native_index()
_BK, _BN = _b_index()
_BX = _b_input_k()
_CR, _CN = _c_index()


def mma_m16n8k16(a_frag: torch.Tensor, b_frag: torch.Tensor) -> torch.Tensor:
    """``a_frag [..., 32, 8]``, ``b_frag [..., 32, 4]`` (per-lane operand values, placed by the
    PTX fragment mappings) → the accumulator fragment ``[..., 32, 4]`` in fp32 (products of
    fp16/bf16 values are exact in fp32; the sum runs in fp32)."""
    lead = a_frag.shape[:-2]
    a = torch.zeros(*lead, 16, 16, dtype=torch.float32)
    a[..., _AR, _AC] = a_frag.float()
    b = torch.zeros(*lead, 16, 8, dtype=torch.float32)
    b[..., _BK, _BN] = b_frag.float()
    c = a @ b
    return c[..., _CR, _CN]


def b_fragments(x: torch.Tensor, k0: int, k_lo: int, k_hi: int) -> torch.Tensor:
    """B fragments ``[NT, 32, 4]`` of one k16 step at ``k0`` for the batch ``x [M, K]`` (in
    its dtype), batch tile ``j`` = rows ``8j .. 8j+7``; entries with ``k`` outside
    ``[k_lo, k_hi)`` or ``n >= M`` are 0, as the kernel's masked loads."""
    m = x.shape[0]
    nt = max(1, -(-m // 8))
    k = k0 + _BX                                     # [32, 4] input columns the lane loads
    out = torch.zeros(nt, 32, 4, dtype=x.dtype)
    for j in range(nt):
        n = 8 * j + _BN
        ok = (n < m) & (k >= k_lo) & (k < k_hi)
        out[j][ok] = x[n[ok], k[ok]]
    return out


# ---- stream-K schedule (shared by the host plan and the emulator) -----------------------------
@dataclass(frozen=True)
class Schedule:
    units: int
    ctas: int

    def range(self, b: int) -> tuple[int, int]:
        q, r = divmod(self.units, self.ctas)
        lo = b * q + min(b, r)
        return lo, lo + q + (1 if b < r else 0)

    def cta_of(self, u: int) -> int:
        q, r = divmod(self.units, self.ctas)
        big = r * (q + 1)
        return u // (q + 1) if u < big else r + (u - big) // q


def dense_schedule(n_tiles: int, n_chunks: int, n_sm: int, ctas_per_sm: int = 2,
                   unit_bytes: int = 512, min_bytes_per_cta: int = 16384) -> Schedule:
    """#CTAs = min(ctas_per_sm · #SM, bytes / 16 KB), at least 1 and at most the unit count."""
    units = n_tiles * n_chunks
    by_bytes = max(1, units * unit_bytes // min_bytes_per_cta)
    return Schedule(units, max(1, min(units, ctas_per_sm * n_sm, by_bytes)))


def _tile_contributors(sch: Schedule, t: int, per: int) -> list[tuple[int, int]]:
    """(cta, slot) of every CTA holding part of tile/block ``t`` whose units are
    ``[t*per, (t+1)*per)``: slot 0 when ``t`` is the CTA's first tile, else 1."""
    b0, b1 = sch.cta_of(t * per), sch.cta_of((t + 1) * per - 1)
    out = []
    for b in range(b0, b1 + 1):
        first = sch.range(b)[0] // per
        out.append((b, 0 if first == t else 1))
    return out


# ---- the dense kernel -------------------------------------------------------------------------
def _chunk_partials(p: GpuDense, x: torch.Tensor) -> torch.Tensor:
    """Per (tile, chunk) partial outputs ``[T, nc, 16, 8·NT]`` fp32, as one warp computes a
    chunk: decode, mma per k16 step, flush ``s·D + z·X`` at each group end."""
    dtype = x.dtype
    bits, c = p.bits, CHUNK[p.bits]
    steps = c // 16
    gsteps = p.gs // 16 if p.gs < p.k else 1 << 30
    nt_b = max(1, -(-x.shape[0] // 8))
    qw = p.qw.cpu().numpy()
    q1 = p.q1.cpu().numpy() if p.q1 is not None else None
    sz = p.sz.cpu().float()                                            # [T, ng, 16, 2]
    ones = torch.ones(32, 8, dtype=dtype)
    tiles = p.n_tiles
    out = torch.zeros(tiles, p.n_chunks, 16, 8 * nt_b)
    lane_rows = _CR                                                    # [32, 4]
    for ci in range(p.n_chunks):
        a = decode_vector(qw[:, ci], None if q1 is None else q1[:, ci], bits, dtype)
        acc = torch.zeros(tiles, nt_b, 32, 4)
        d = torch.zeros_like(acc)
        xs = torch.zeros(nt_b, 32, 4)
        for s in range(steps):
            kstep = ci * steps + s
            k0 = 16 * kstep
            bf = b_fragments(x, k0, 0, p.k)                            # [NT, 32, 4]
            d += mma_m16n8k16(a[:, None, :, s, :].expand(tiles, nt_b, 32, 8),
                              bf[None].expand(tiles, nt_b, 32, 4))
            xs += mma_m16n8k16(ones[None].expand(nt_b, 32, 8), bf)
            grp = kstep // gsteps
            if s == steps - 1 or (kstep + 1) // gsteps != grp:
                g = min(grp, p.n_groups - 1)
                srow = sz[:, g][:, lane_rows]                          # [T, 32, 4, 2]
                acc += srow[:, None, ..., 0] * d + srow[:, None, ..., 1] * xs[None]
                d.zero_()
                xs.zero_()
        # accumulator fragments → [T, 16, 8·NT]
        y = torch.zeros(tiles, 16, 8 * nt_b)
        for j in range(nt_b):
            y[:, _CR, 8 * j + _CN] = acc[:, j]
        out[:, ci] = y
    return out


def emulate_dense(p: GpuDense, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  n_sm: int = 4, ctas_per_sm: int = 2) -> torch.Tensor:
    """``y = x Wᵀ (+ bias)`` computed as the CUDA dense kernel does (x: fp16/bf16 ``[M, K]``)."""
    if x.dtype not in MAGIC:
        raise ValueError("the tensor-core kernel takes fp16/bf16 activations")
    m = x.shape[0]
    part = _chunk_partials(p, x)                                        # [T, nc, 16, Mp]
    nc = p.n_chunks
    sch = dense_schedule(p.n_tiles, nc, n_sm, ctas_per_sm)
    slots = torch.zeros(sch.ctas, 2, 16, part.shape[-1])
    full = {}
    for b in range(sch.ctas):
        u0, u1 = sch.range(b)
        for t in range(u0 // nc, (u1 - 1) // nc + 1):
            c0, c1 = max(u0, t * nc) - t * nc, min(u1, (t + 1) * nc) - t * nc
            warp = [torch.zeros(16, part.shape[-1]) for _ in range(WARPS)]
            for w in range(WARPS):
                for cc in range(c0 + w, c1, WARPS):
                    warp[w] = warp[w] + part[t, cc]
            tot = torch.zeros(16, part.shape[-1])
            for w in range(WARPS):
                tot = tot + warp[w]
            if c0 == 0 and c1 == nc:
                full[t] = tot
            else:
                slots[b, 0 if t == u0 // nc else 1] = tot
    y = torch.empty(p.n_tiles, 16, part.shape[-1])
    for t in range(p.n_tiles):
        if t in full:
            y[t] = full[t]
        else:
            tot = torch.zeros(16, part.shape[-1])
            for b, slot in _tile_contributors(sch, t, nc):
                tot = tot + slots[b, slot]
            y[t] = tot
    y = y.reshape(-1, part.shape[-1])[:p.n, :m].t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---- the group-sparse kernel -------------------------------------------------------------------
def emulate_sparse(p: GpuSparse, x: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x Wᵀ (+ bias)`` as the CUDA group-sparse kernel computes it: per tile of 16 rows
    sharing a group column, x's group slice is the shared B operand; one flush per tile; tile
    results are added into per-row-block sums."""
    m = x.shape[0]
    nt_b = max(1, -(-m // 8))
    y = torch.zeros(p.n, 8 * nt_b)
    if p.n_tiles:
        dtype = x.dtype
        c = CHUNK[p.bits]
        steps = c // 16
        qw = p.qw.cpu().numpy()
        q1 = p.q1.cpu().numpy() if p.q1 is not None else None
        cols = p.cols.cpu().long()
        rows = p.rows.cpu().long()
        sz = p.sz.cpu().float()
        ones = torch.ones(32, 8, dtype=dtype)
        for t in range(p.n_tiles):
            base = int(cols[t]) * p.gs
            d = torch.zeros(nt_b, 32, 4)
            xs = torch.zeros(nt_b, 32, 4)
            for ci in range(qw.shape[1]):
                a = decode_vector(qw[t, ci], None if q1 is None else q1[t, ci], p.bits, dtype)
                for s in range(steps):
                    k0 = base + ci * c + 16 * s
                    bf = b_fragments(x, k0, base, min(base + p.gs, p.k))
                    d += mma_m16n8k16(a[None, :, s, :].expand(nt_b, 32, 8), bf)
                    xs += mma_m16n8k16(ones[None].expand(nt_b, 32, 8), bf)
            srow = sz[t][_CR]                                           # [32, 4, 2]
            acc = srow[None, ..., 0] * d + srow[None, ..., 1] * xs
            tile = torch.zeros(16, 8 * nt_b)
            for j in range(nt_b):
                tile[_CR, 8 * j + _CN] = acc[j]
            ok = rows[t] >= 0
            y[rows[t][ok]] += tile[ok]
    y = y[:, :m].t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
