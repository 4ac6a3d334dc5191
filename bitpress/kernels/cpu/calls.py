"""The regular call path of the CPU ops (``dense_qmm_cpu``, ``sparse_qmm_cpu``,
``half_linear_cpu``): activation-side checks and the switch between the activation-mode
kernels and the GEMM path."""
from __future__ import annotations

from typing import Optional

import torch

from . import config as _cfg
from .config import _C, _MODES, _PKIND
from .gemm import _dense_gemm_fill, _panel_gemm, _sparse_gemm_fill
from .repack import _check_dense, _check_sparse, _dense_packed, _sparse_packed


def _prep_x(x: torch.Tensor, in_features: int) -> tuple[torch.Tensor, int]:
    # a contiguous fp32 x is passed as is (the kernels read it as [M, in] rows)
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.reshape(-1, in_features).float().contiguous()
    return x, x.numel() // in_features


def _bias(bias: Optional[torch.Tensor], out: int) -> tuple[Optional[torch.Tensor], int]:
    if bias is None:
        return None, 0
    if bias.numel() != out or not bias.is_cpu:
        raise ValueError(f"bias must be a CPU tensor of {out} elements, got {bias.numel()} on "
                         f"{bias.device}")
    b = bias if bias.dtype == torch.float32 and bias.is_contiguous() else \
        bias.reshape(-1).float().contiguous()
    return b, b.data_ptr()


def _finish(y: torch.Tensor, x: torch.Tensor, out: int) -> torch.Tensor:
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _bias_f32(bias: Optional[torch.Tensor], out: int) -> Optional[torch.Tensor]:
    return _bias(bias, out)[0]


def _use_gemm(mode: Optional[str], m: int) -> bool:
    return mode == "blas" or (mode is None and m >= _cfg._gemm_rows)


def dense_qmm_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor, bias: Optional[torch.Tensor], bits: int, group_size: int,
                  in_features: int, mode: Optional[str] = None) -> torch.Tensor:
    # the weight is validated once, when it is repacked (a cache hit implies the same
    # tensors, shapes and versions); per call only the activation side is checked
    if not x.is_cpu or x.dtype not in _PKIND or x.shape[-1] != in_features:
        raise ValueError(f"dense_qmm_cpu: x must be a CPU float tensor [..., {in_features}]")
    out = qweight.shape[0]
    x2, m = _prep_x(x, in_features)
    if _use_gemm(mode, m):
        _check_dense(qweight, scales, zeros, bits, group_size, in_features)
        fill = _dense_gemm_fill(qweight, scales, zeros, bits, group_size, in_features)
        y = _panel_gemm(x2, out, in_features, _bias_f32(bias, out), fill)
        return _finish(y.reshape(*x.shape[:-1], out), x, out)
    code = _MODES[mode or _cfg._mode]
    if code >= 2 and (bits != 2 or _cfg._isa == "scalar"):
        code = 1  # the lut kernels are 2-bit SIMD only; elsewhere lut means int8
    packed, pk = _dense_packed(qweight, scales, zeros, bits, group_size, in_features,
                               1 if code >= 2 else 0)
    y = torch.empty(*x.shape[:-1], out, dtype=torch.float32)
    b, bptr = _bias(bias, out)
    if m:
        _C.qmm_dense(packed.data_ptr(), out, in_features, bits, group_size, pk, x2.data_ptr(), m,
                     y.data_ptr(), bptr, code, torch.get_num_threads())
    return _finish(y, x, out)


def half_linear_cpu(x: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for an unquantised 16-bit weight (fp16 or bf16, ``[out,
    in]``) with fp32 arithmetic: each weight element is widened exactly and multiplied in
    fp32, so the result equals ``F.linear(x.float(), weight.float(), bias)`` up to fp32
    summation order, while reading half the bytes of an fp32 weight (SmolLM2's 49152x576
    head at batch 1, one AVX2 thread: 6.4 ms, against 14.5 for torch's fp32 ``F.linear``
    and 8.3 / 10.3 for its fp16 / bf16 one, whose outputs are rounded to 16 bits).
    Returns x's dtype."""
    if weight.dim() != 2 or weight.dtype not in (torch.float16, torch.bfloat16) \
            or not weight.is_cpu:
        raise ValueError(f"half_linear_cpu: weight must be a 2-D fp16/bf16 CPU tensor, got "
                         f"{tuple(weight.shape)} {weight.dtype} on {weight.device}")
    out, inf = weight.shape
    if not x.is_cpu or not x.is_floating_point() or x.shape[-1] != inf:
        raise ValueError(f"half_linear_cpu: x must be a CPU float tensor [..., {inf}]")
    w = weight.contiguous()
    x2, m = _prep_x(x, inf)
    b, bptr = _bias(bias, out)
    y = torch.empty(*x.shape[:-1], out, dtype=torch.float32)
    if m:
        _C.half_linear(w.data_ptr(), int(w.dtype == torch.bfloat16), out, inf, x2.data_ptr(), m,
                       y.data_ptr(), bptr, torch.get_num_threads())
    return _finish(y, x, out)


def sparse_qmm_cpu(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                   qvalues: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                   mode: Optional[str] = None) -> torch.Tensor:
    if not x.is_cpu or x.dtype not in _PKIND or x.shape[-1] != in_features:
        raise ValueError(f"sparse_qmm_cpu: x must be a CPU float tensor [..., {in_features}]")
    out = row_ptr.numel() - 1
    x2, m = _prep_x(x, in_features)
    if _use_gemm(mode, m):
        _check_sparse(row_ptr, col_idx, qvalues, scales, zeros, bits, group_size, in_features)
        fill = _sparse_gemm_fill(row_ptr, col_idx, qvalues, scales, zeros, bits, group_size,
                                 in_features)
        y = _panel_gemm(x2, out, in_features, _bias_f32(bias, out), fill)
        return _finish(y.reshape(*x.shape[:-1], out), x, out)
    packed, nnz, pk = _sparse_packed(row_ptr, col_idx, qvalues, scales, zeros, bits,
                                     group_size, in_features)
    y = torch.empty(*x.shape[:-1], out, dtype=torch.float32)
    b, bptr = _bias(bias, out)
    if m:
        _C.qmm_sparse(packed.data_ptr(), nnz, out, in_features, bits, group_size, pk,
                      x2.data_ptr(), m, y.data_ptr(), bptr, min(_MODES[mode or _cfg._mode], 1),
                      torch.get_num_threads())
    return _finish(y, x, out)
