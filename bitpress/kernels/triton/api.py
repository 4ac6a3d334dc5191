"""Plain-Python entry points of the Triton kernels (same arguments as the ops, plus kernel
choices). They run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set
before Triton was first imported (the tests do that).

Dispatch of :func:`triton_dense_qmm` (``kernel="auto"``): M <= 4 rows of x → the GEMV
kernel (CUDA cores, split-K when there are too few output tiles to fill the GPU); M > 4 →
the dequantise-then-``tl.dot`` GEMM (tensor cores; configs with BLOCK_M = 16 and split-K
for small batches, larger tiles for large ones).

:func:`triton_sparse_qmm` (``split="auto"``): M <= 16 → the task-centric GEMV; larger batches
→ the dense GEMM on a densified copy of the weight (built once, cached).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from . import kernels as K
from . import repack, tune

GEMV_MAX_M = 4
SPARSE_GEMV_MAX_M = 16


def _interpreting() -> bool:
    """Whether the kernels were built for Triton's interpreter (``TRITON_INTERPRET=1`` when
    :mod:`.kernels` was first imported)."""
    return type(K.dense_gemv_kernel).__name__ == "InterpretedFunction"


def _check_x(x: torch.Tensor, in_features: int, dev: torch.device, what: str) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"{what}: x has {x.shape[-1]} features, weight expects {in_features}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{what}: x must be float16/bfloat16/float32, got {x.dtype}")
    if x.device != dev:
        raise ValueError(f"{what}: x is on {x.device}, weight on {dev}")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{what}: CPU tensors need TRITON_INTERPRET=1 (set before importing "
                         f"triton); use a CUDA device otherwise")
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _dot_f32(dtype: torch.dtype) -> bool:
    # Triton's interpreter (3.x) returns garbage from tl.dot on bfloat16 operands, so there the
    # bf16 GEMM dequantises to fp32 instead; compiled GPU kernels use the bf16 tensor cores.
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting())


def _bias(bias: Optional[torch.Tensor], n: int, dev: torch.device) -> Optional[torch.Tensor]:
    if bias is None:
        return None
    if bias.numel() != n or bias.device != dev:
        raise ValueError(f"bias must have {n} elements on {dev}, got {bias.numel()} on "
                         f"{bias.device}")
    return bias.reshape(-1).contiguous()


def _prev_pow2(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


def _launch_opts(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}


# ---- dense ---------------------------------------------------------------------------------------
def _run_dense(kernel: str, cfg: dict, x2: torch.Tensor, p: repack.DensePacked,
               bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    m, n, k = x2.shape[0], p.n, p.k
    split = int(cfg.get("SPLIT_K", 1))
    bm, bn = int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"])
    pf, kw = 32 // p.bits, p.qw.shape[0]
    pf_pad = triton.next_power_of_2(pf)
    # BLOCK_K (codes) -> whole words per K tile, a power of two; tl.dot needs >= 16 rows
    bkw = _prev_pow2(max(1, int(cfg["BLOCK_K"]) // pf))
    if kernel == "mm":
        bkw = max(bkw, 16 // pf_pad)
    gt = tune.group_tile(p.gs, k, bkw * pf)
    if split > 1:
        y = torch.zeros(m, n, dtype=torch.float32, device=x2.device)
    else:
        y = torch.empty(m, n, dtype=out_dtype, device=x2.device)
    b = bias if bias is not None else y
    common = dict(BITS=p.bits, PF=pf, PF_PAD=pf_pad, BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw,
                  SPLIT_K=split, GROUP_TILE=gt, HAS_BIAS=bias is not None, **_launch_opts(cfg))
    if kernel == "gemv":
        grid = (triton.cdiv(n, bn), split, triton.cdiv(m, bm))
        K.dense_gemv_kernel[grid](x2, p.qw, p.s, p.z, b, y, m, n, k, kw, p.gs, x2.stride(0),
                                  y.stride(0), **common)
    elif kernel == "mm":
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
        K.dense_mm_kernel[grid](x2, p.qw, p.s, p.z, b, y, m, n, k, kw, p.gs, x2.stride(0),
                                y.stride(0), DOT_F32=_dot_f32(x2.dtype), **common)
    else:
        raise ValueError(f"kernel must be 'auto', 'gemv' or 'mm', got {kernel!r}")
    if split > 1:
        if bias is not None:
            y += bias.float()
        y = y.to(out_dtype)
    return y


def _dense_on_packed(x2: torch.Tensor, p: repack.DensePacked, bias: Optional[torch.Tensor],
                     out_dtype: torch.dtype, kernel: str, config: Optional[dict]) -> torch.Tensor:
    m = x2.shape[0]
    if kernel == "auto":
        kernel = "gemv" if m <= GEMV_MAX_M else "mm"
    if config is None:
        dev = x2.device
        if kernel == "gemv":
            default = tune.gemv_default(m, p.n, p.k, p.gs, dev)
            cands = lambda: tune.gemv_candidates(m, p.n, p.k, p.gs, dev)  # noqa: E731
        else:
            default = tune.mm_default(m, p.n, p.k, p.gs, dev)
            cands = lambda: tune.mm_candidates(m, p.n, p.k, p.gs, dev)  # noqa: E731
        key = f"{kernel}|{p.bits}|{p.gs if p.gs < p.k else -1}|{p.n}|{p.k}|" \
              f"{tune.m_bucket(m)}|{str(x2.dtype)[6:]}"
        config = tune.pick(key, dev, default, cands,
                           lambda c: _run_dense(kernel, c, x2, p, bias, out_dtype))
    return _run_dense(kernel, config, x2, p, bias, out_dtype)


def triton_dense_qmm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
                     group_size: int, in_features: int, *, kernel: str = "auto",
                     config: Optional[dict] = None) -> torch.Tensor:
    """``bitpress::dense_qmm`` with Triton. ``kernel``: ``"auto"``, ``"gemv"`` or ``"mm"``;
    ``config`` forces a launch config (``BLOCK_M/N/K``, ``SPLIT_K``, ``num_warps``...)."""
    p = repack.dense_packed(qweight, scales, zeros, bits, group_size, in_features)
    x2 = _check_x(x, in_features, qweight.device, "triton_dense_qmm")
    b = _bias(bias, p.n, qweight.device)
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], p.n)
    y = _dense_on_packed(x2, p, b, x.dtype, kernel, config)
    return y.reshape(*x.shape[:-1], p.n)


# ---- group-sparse -----------------------------------------------------------------------------
def _run_sparse(split: str, cfg: dict, x2: torch.Tensor, p: repack.SparsePacked,
                bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    m = x2.shape[0]
    pf = 32 // p.bits
    gs_pad = triton.next_power_of_2(p.gs)
    bg = int(cfg["BLOCK_G"])
    wpg = p.qv.shape[1]
    opts = _launch_opts(cfg)
    if split == "task":
        y = torch.zeros(m, p.n, dtype=torch.float32, device=x2.device)
        gpt = triton.cdiv(p.nnz, max(1, int(cfg["n_tasks"])))
        grid = (triton.cdiv(p.nnz, gpt),)
        K.sparse_task_kernel[grid](x2, p.rows, p.cols, p.qv, p.s, p.z, y, m, p.nnz, p.k, p.gs,
                                   wpg, gpt, x2.stride(0), y.stride(0), BITS=p.bits, PF=pf,
                                   GS_PAD=gs_pad, BLOCK_G=bg, **opts)
        if bias is not None:
            y += bias.float()
        return y.to(out_dtype)
    if split == "row":
        y = torch.empty(m, p.n, dtype=out_dtype, device=x2.device)
        b = bias if bias is not None else y
        K.sparse_row_kernel[(p.n, m)](x2, p.row_ptr, p.cols, p.qv, p.s, p.z, b, y, p.n, p.k,
                                      p.gs, wpg, x2.stride(0), y.stride(0), BITS=p.bits, PF=pf,
                                      GS_PAD=gs_pad, BLOCK_G=bg, HAS_BIAS=bias is not None,
                                      **opts)
        return y
    raise ValueError(f"split must be 'auto', 'task', 'row' or 'dense', got {split!r}")


def triton_sparse_qmm(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                      qvalues: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      bias: Optional[torch.Tensor], bits: int, group_size: int,
                      in_features: int, *, split: str = "auto",
                      config: Optional[dict] = None) -> torch.Tensor:
    """``bitpress::sparse_qmm`` with Triton. ``split``: ``"task"`` (kept groups split evenly
    across programs, atomics), ``"row"`` (one program per output row), ``"dense"`` (tensor-core
    GEMM on a cached densified copy) or ``"auto"``. ``config``: ``n_tasks``, ``BLOCK_G``,
    ``num_warps`` for the sparse kernels; a dense config for ``"dense"``."""
    p = repack.sparse_packed(row_ptr, col_idx, qvalues, scales, zeros, bits, group_size,
                             in_features)
    x2 = _check_x(x, in_features, qvalues.device, "triton_sparse_qmm")
    b = _bias(bias, p.n, qvalues.device)
    m = x2.shape[0]
    if split == "auto":
        split = "task" if m <= SPARSE_GEMV_MAX_M else "dense"
    if m == 0:
        return x.new_empty(*x.shape[:-1], p.n)
    if split == "dense":
        y = _dense_on_packed(x2, repack.densified(p), b, x.dtype, "auto", config)
    elif p.nnz == 0:
        y = torch.zeros(m, p.n, dtype=torch.float32, device=x2.device)
        if b is not None:
            y += b.float()
        y = y.to(x.dtype)
    else:
        if config is None:
            dev = x2.device
            default = tune.sparse_default(m, p.n, p.nnz, p.gs, dev)
            key = f"sparse-{split}|{p.bits}|{p.gs}|{p.n}|{p.k}|{p.nnz}|{tune.m_bucket(m)}|" \
                  f"{str(x2.dtype)[6:]}"
            config = tune.pick(key, dev, default,
                               lambda: tune.sparse_candidates(m, p.n, p.nnz, p.gs, dev),
                               lambda c: _run_sparse(split, c, x2, p, b, x.dtype))
        y = _run_sparse(split, config, x2, p, b, x.dtype)
    return y.reshape(*x.shape[:-1], p.n)
