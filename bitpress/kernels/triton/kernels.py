"""Triton kernels for ``bitpress::dense_qmm`` and ``bitpress::sparse_qmm``.

Importing this module decorates the kernels with ``triton.jit``; whether they compile for a
GPU or run in Triton's interpreter is decided *then*, by ``TRITON_INTERPRET`` (set it before
the first import to run them on CPU tensors).

Layouts (built by :mod:`.repack` from the canonical tensors, see that module):

* dense: ``qw`` int32 ``[KW, N]`` (K-major: word ``kw`` of column ``n`` holds the codes of
  inputs ``kw*PF .. kw*PF+PF-1`` of output ``n``, element ``i`` at bits ``i*BITS``, unsigned
  with offset ``2^(BITS-1)``, exactly the canonical word, transposed), ``s``/``z``
  ``[NG, N]`` (fp16/bf16/fp32). Neighbouring outputs are neighbouring addresses, so every
  load of a ``[BLOCK_K, BLOCK_N]`` weight tile is coalesced along N.
* sparse: the canonical BSR arrays plus ``rows`` int32 ``[nnz]`` (the row of each kept
  group), so a program can start in the middle of a row.

Dense kernels load each packed word once (a ``[BLOCK_KW, BLOCK_N]`` tile) and unpack it in
registers with ``(w[:, None, :] >> (i * BITS)[None, :, None]) & mask`` (``PF_PAD`` = the next
power of two of the codes per word: 3-bit words give 10 codes, 6 padded slots masked out).
The same plain ``tl`` ops run compiled and in the interpreter (no inline asm), so the
interpreter tests exercise exactly the GPU code. The sparse kernels still extract codes with
one word gather per element (``(word >> ((k % PF) * BITS)) & mask``).

Group parameters: when a ``BLOCK_K`` tile lies inside one group (``GROUP_TILE``: ``GS`` is a
multiple of ``BLOCK_K``, or one group per row) the kernel loads one scale/zero per output
and uses ``sum_k x_k (s q_k + z) = s * sum_k x_k q_k + z * sum_k x_k``; otherwise it gathers
the parameter of every element (any group size, ragged last groups included).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _codes(w, sh, BITS: tl.constexpr):
    """Signed codes from packed words ``w`` shifted by ``sh`` bits."""
    return ((w >> sh) & ((1 << BITS) - 1)) - (1 << (BITS - 1))


@triton.jit
def _unpack_tile(w, BITS: tl.constexpr, PF: tl.constexpr, PF_PAD: tl.constexpr,
                 BLOCK_KW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Words ``w [BLOCK_KW, BLOCK_N]`` (each loaded once) → signed codes
    ``[BLOCK_KW * PF_PAD, BLOCK_N]`` in registers, row ``kw * PF_PAD + i`` = element ``i`` of word
    ``kw``. For 3-bit (PF = 10 < PF_PAD = 16) the padded slots repeat element ``PF - 1``; the
    caller masks their x to 0."""
    i = tl.arange(0, PF_PAD)
    sh = tl.minimum(i, PF - 1) * BITS
    q = ((w[:, None, :] >> sh[None, :, None]) & ((1 << BITS) - 1)) - (1 << (BITS - 1))
    return tl.reshape(q, (BLOCK_KW * PF_PAD, BLOCK_N))


@triton.jit
def _k_index(kw0, K, PF: tl.constexpr, PF_PAD: tl.constexpr, BLOCK_KW: tl.constexpr):
    """Input index and validity of each unpacked row of :func:`_unpack_tile`."""
    i = tl.arange(0, PF_PAD)
    kw = kw0 + tl.arange(0, BLOCK_KW)
    k = kw[:, None] * PF + i[None, :]
    ok = (i[None, :] < PF) & (k < K)
    return (tl.reshape(k, (BLOCK_KW * PF_PAD,)), tl.reshape(ok, (BLOCK_KW * PF_PAD,)))


# ---- dense: the parts both dense kernels share ---------------------------------------------------
@triton.jit
def _dense_program(pid_m, pid_n, pid_k, M, N, KW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr):
    """Program ``(pid_m, pid_n, pid_k)``: its rows of x and outputs with their masks, the K tiles
    ``[t0, t1)`` it reduces (split-K slice ``pid_k`` of ``SPLIT_K``) and a zeroed fp32
    ``[BLOCK_M, BLOCK_N]`` accumulator."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_tiles = tl.cdiv(KW, BLOCK_KW)
    per = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per
    return offs_m, m_mask, offs_n, n_mask, t0, tl.minimum(t0 + per, k_tiles), acc


@triton.jit
def _word_codes(qw_ptr, t, offs_n, n_mask, N, KW, BITS: tl.constexpr, PF: tl.constexpr,
                PF_PAD: tl.constexpr, BLOCK_KW: tl.constexpr, BLOCK_N: tl.constexpr):
    """K tile ``t`` of the weight: its ``[BLOCK_KW, BLOCK_N]`` packed words, each loaded once
    (coalesced along N), unpacked in registers to int32 codes ``[BLOCK_KW * PF_PAD, BLOCK_N]``
    (see :func:`_unpack_tile`)."""
    offs_kw = t * BLOCK_KW + tl.arange(0, BLOCK_KW)
    w = tl.load(qw_ptr + offs_kw[:, None] * N + offs_n[None, :],
                mask=(offs_kw < KW)[:, None] & n_mask[None, :], other=0)   # once per word
    return _unpack_tile(w, BITS, PF, PF_PAD, BLOCK_KW, BLOCK_N)


@triton.jit
def _x_tile(x_ptr, t, offs_m, m_mask, K, stride_xm, PF: tl.constexpr, PF_PAD: tl.constexpr,
            BLOCK_KW: tl.constexpr):
    """K tile ``t`` of the activations, ``[BLOCK_M, BLOCK_KW * PF_PAD]`` in x's dtype, in the
    row order of :func:`_word_codes` (padded slots and inputs past K load 0), with the input
    index ``offs_k`` and validity ``k_ok`` of each column."""
    offs_k, k_ok = _k_index(t * BLOCK_KW, K, PF, PF_PAD, BLOCK_KW)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=m_mask[:, None] & k_ok[None, :], other=0.0)
    return x, offs_k, k_ok


@triton.jit
def _tile_group_params(s_ptr, z_ptr, t, offs_n, n_mask, N, GS, PF: tl.constexpr,
                       BLOCK_KW: tl.constexpr):
    """``GROUP_TILE``: the one (scale, zero) per output of K tile ``t``'s group (fp32 ``[BN]``)."""
    g = (t * BLOCK_KW * PF) // GS
    s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _element_group_params(s_ptr, z_ptr, offs_k, k_ok, offs_n, n_mask, N, GS):
    """Not ``GROUP_TILE``: the (scale, zero) of every element of the tile (fp32 ``[BK, BN]``)."""
    gp = (offs_k // GS)[:, None] * N + offs_n[None, :]
    pm = k_ok[:, None] & n_mask[None, :]
    s = tl.load(s_ptr + gp, mask=pm, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + gp, mask=pm, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _dense_store(acc, y_ptr, b_ptr, offs_m, m_mask, offs_n, n_mask, stride_ym,
                 SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store the fp32 ``[BM, BN]`` sums: (+ bias) in y's dtype, or with ``SPLIT_K > 1`` added
    to the fp32 ``y`` with atomics (the caller adds the bias)."""
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=o_mask)


# ---- dense: batch-1 / tiny-batch GEMV (CUDA cores, split-K) ------------------------------------
@triton.jit
def dense_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                      M, N, K, KW, GS, stride_xm, stride_ym,
                      BITS: tl.constexpr, PF: tl.constexpr, PF_PAD: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                      SPLIT_K: tl.constexpr, GROUP_TILE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``y[m, n] = sum_k x[m, k] W[n, k]`` for ``BLOCK_M`` (1, 2, 4) rows of x at once.

    Each step loads a ``[BLOCK_KW, BLOCK_N]`` tile of packed words once (coalesced along N)
    and unpacks it in registers (``BLOCK_KW * PF`` inputs); x is loaded once per step too.
    Grid ``(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))``. With ``SPLIT_K > 1`` each program
    reduces a contiguous slice of K tiles and adds its partial sums to an fp32 ``y`` with
    atomics (bias then added by the caller); otherwise it stores ``y`` (+ bias) in y's dtype.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m, m_mask, offs_n, n_mask, t0, t1, acc = _dense_program(
        pid_m, pid_n, pid_k, M, N, KW, BLOCK_M, BLOCK_N, BLOCK_KW, SPLIT_K)
    for t in range(t0, t1):
        q = _word_codes(qw_ptr, t, offs_n, n_mask, N, KW, BITS, PF, PF_PAD, BLOCK_KW,
                        BLOCK_N).to(tl.float32)                                 # [BK, BN]
        x, offs_k, k_ok = _x_tile(x_ptr, t, offs_m, m_mask, K, stride_xm, PF, PF_PAD, BLOCK_KW)
        x = x.to(tl.float32)                                                    # [BM, BK]
        if GROUP_TILE:
            s, z = _tile_group_params(s_ptr, z_ptr, t, offs_n, n_mask, N, GS, PF, BLOCK_KW)
            xq = tl.sum(x[:, :, None] * q[None, :, :], axis=1)                 # [BM, BN]
            xs = tl.sum(x, axis=1)                                              # [BM]
            acc += xq * s[None, :] + xs[:, None] * z[None, :]
        else:
            s, z = _element_group_params(s_ptr, z_ptr, offs_k, k_ok, offs_n, n_mask, N, GS)
            acc += tl.sum(x[:, :, None] * (q * s + z)[None, :, :], axis=1)
    _dense_store(acc, y_ptr, b_ptr, offs_m, m_mask, offs_n, n_mask, stride_ym, SPLIT_K, HAS_BIAS)


# ---- dense: tl.dot GEMM (tensor cores; small batches with split-K) ---------------------------
@triton.jit
def dense_mm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                    M, N, K, KW, GS, stride_xm, stride_ym,
                    BITS: tl.constexpr, PF: tl.constexpr, PF_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                    SPLIT_K: tl.constexpr, GROUP_TILE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    DOT_F32: tl.constexpr):
    """Tile ``[BLOCK_M, BLOCK_N]`` of y. Each ``[BLOCK_KW, BLOCK_N]`` word tile is loaded once
    and unpacked in registers. When a K tile lies in one group (``GROUP_TILE``) the integer
    codes (exact in fp16/bf16) go to ``tl.dot`` and scale/zero are applied after it:
    ``acc += (x · q) * s + (Σ x) * z``; otherwise the tile is dequantised per element first.

    Grid ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``; programs that share a weight tile
    are adjacent (M fastest) so the tile is read from DRAM once and from L2 after.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m, m_mask, offs_n, n_mask, t0, t1, acc = _dense_program(
        pid_m, pid_n, pid_k, M, N, KW, BLOCK_M, BLOCK_N, BLOCK_KW, SPLIT_K)
    for t in range(t0, t1):
        q = _word_codes(qw_ptr, t, offs_n, n_mask, N, KW, BITS, PF, PF_PAD, BLOCK_KW, BLOCK_N)
        x, offs_k, k_ok = _x_tile(x_ptr, t, offs_m, m_mask, K, stride_xm, PF, PF_PAD, BLOCK_KW)
        if GROUP_TILE:
            s, z = _tile_group_params(s_ptr, z_ptr, t, offs_n, n_mask, N, GS, PF, BLOCK_KW)
            if DOT_F32:
                xq = tl.dot(x.to(tl.float32), q.to(tl.float32), input_precision="ieee")
            else:
                xq = tl.dot(x, q.to(x.dtype))
            xs = tl.sum(x.to(tl.float32), axis=1)
            acc += xq * s[None, :] + xs[:, None] * z[None, :]
        else:
            s, z = _element_group_params(s_ptr, z_ptr, offs_k, k_ok, offs_n, n_mask, N, GS)
            wf = q.to(tl.float32) * s + z
            if DOT_F32:
                acc += tl.dot(x.to(tl.float32), wf, input_precision="ieee")
            else:
                acc += tl.dot(x, wf.to(x.dtype))
    _dense_store(acc, y_ptr, b_ptr, offs_m, m_mask, offs_n, n_mask, stride_ym, SPLIT_K, HAS_BIAS)


# ---- group-sparse: the part both sparse kernels share ------------------------------------------
@triton.jit
def _sparse_groups(cols_ptr, qv_ptr, s_ptr, z_ptr, offs_g, gm, offs_k, k_in, sh, K, GS, WPG,
                   BITS: tl.constexpr, PF: tl.constexpr):
    """Kept groups ``offs_g`` (valid where ``gm``): their codes ``q [BLOCK_G, GS_PAD]`` (fp32,
    one word gather per element), scale and zero (fp32 ``[BLOCK_G]``), and the x columns
    ``xcol`` and mask ``xm`` the codes multiply."""
    col = tl.load(cols_ptr + offs_g, mask=gm, other=0)
    s = tl.load(s_ptr + offs_g, mask=gm, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs_g, mask=gm, other=0.0).to(tl.float32)
    w = tl.load(qv_ptr + offs_g[:, None] * WPG + (offs_k // PF)[None, :],
                mask=gm[:, None] & k_in[None, :], other=0)
    q = _codes(w, sh, BITS).to(tl.float32)
    xcol = col[:, None] * GS + offs_k[None, :]
    xm = gm[:, None] & k_in[None, :] & (xcol < K)
    return q, s, z, xcol, xm


# ---- group-sparse: task-centric GEMV -------------------------------------------------------
@triton.jit
def sparse_task_kernel(x_ptr, rows_ptr, cols_ptr, qv_ptr, s_ptr, z_ptr, y_ptr,
                       M, NNZ, K, GS, WPG, GPT, stride_xm, stride_ym,
                       BITS: tl.constexpr, PF: tl.constexpr, GS_PAD: tl.constexpr,
                       BLOCK_G: tl.constexpr):
    """Program ``p`` owns kept groups ``[p*GPT, min((p+1)*GPT, NNZ))`` in BSR order, whatever
    rows they belong to (every program gets the same amount of weight to read, however
    skewed the mask). It walks them ``BLOCK_G`` at a time: dequantise ``[BLOCK_G, GS]``
    codes once, then for each of the ``M`` activation rows gather x at each group's columns
    and add each group's dot product to ``y[m, row]`` (fp32) with an atomic add.
    """
    pid = tl.program_id(0)
    start = pid * GPT
    end = tl.minimum(start + GPT, NNZ)
    offs_k = tl.arange(0, GS_PAD)
    k_in = offs_k < GS
    sh = ((offs_k % PF) * BITS)[None, :]
    for g0 in range(start, end, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        gm = offs_g < end
        row = tl.load(rows_ptr + offs_g, mask=gm, other=0)
        q, s, z, xcol, xm = _sparse_groups(cols_ptr, qv_ptr, s_ptr, z_ptr, offs_g, gm, offs_k,
                                           k_in, sh, K, GS, WPG, BITS, PF)     # q [BG, GS_PAD]
        for m in range(0, M):
            x = tl.load(x_ptr + m * stride_xm + xcol, mask=xm, other=0.0).to(tl.float32)
            part = tl.sum(x * q, axis=1) * s + tl.sum(x, axis=1) * z
            tl.atomic_add(y_ptr + m * stride_ym + row, part, mask=gm)


# ---- group-sparse: row-split GEMV (for comparison on skewed masks) -----------------------------
@triton.jit
def sparse_row_kernel(x_ptr, rp_ptr, cols_ptr, qv_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                      N, K, GS, WPG, stride_xm, stride_ym,
                      BITS: tl.constexpr, PF: tl.constexpr, GS_PAD: tl.constexpr,
                      BLOCK_G: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One program per (output row, activation row): walk the row's kept groups
    ``BLOCK_G`` at a time and store the result (+ bias) directly. A row with many kept
    groups keeps its program busy while others idle: this is the baseline the task split
    is compared against."""
    r = tl.program_id(0)
    m = tl.program_id(1)
    lo = tl.load(rp_ptr + r)
    hi = tl.load(rp_ptr + r + 1)
    offs_k = tl.arange(0, GS_PAD)
    k_in = offs_k < GS
    sh = ((offs_k % PF) * BITS)[None, :]
    acc = tl.zeros((BLOCK_G,), dtype=tl.float32)
    for g0 in range(lo, hi, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        gm = offs_g < hi
        q, s, z, xcol, xm = _sparse_groups(cols_ptr, qv_ptr, s_ptr, z_ptr, offs_g, gm, offs_k,
                                           k_in, sh, K, GS, WPG, BITS, PF)
        x = tl.load(x_ptr + m * stride_xm + xcol, mask=xm, other=0.0).to(tl.float32)
        acc += tl.sum(x * q, axis=1) * s + tl.sum(x, axis=1) * z
    out = tl.sum(acc, axis=0)
    if HAS_BIAS:
        out += tl.load(b_ptr + r).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + r, out.to(y_ptr.dtype.element_ty))
