"""Baselines for GQSA: SparseGPT-style 2:4 and unstructured pruning, each + group quantization.

Both run the same joint prune + quantize sweep as GQSA
(:func:`bitpress.sparse.sweep.prune_quantize_sweep`): columns in natural order with the
damped inverse-Cholesky factor ``U`` of ``H``; when a column block is reached its mask is
chosen from the error-updated weights with SparseGPT's saliency ``w² / U_ii²``; pruned
weights are set to 0, kept ones rounded onto their group's grid (min/max over the row's
*kept* weights of the group), and the error is spread over the later columns.

* :func:`semi_structured_24`: in every aligned run of 4 input columns of a row, the 2 least
  salient weights are pruned (a short trailing run of ``len`` columns prunes ``len // 2``).
* :func:`unstructured`: inside each column block the least salient ``sparsity`` share of
  all its weights (all rows together) is pruned — 50 % by default, exactly per block.

Element masks are not part of the logical format (only GQSA's group ``keep`` is), so these
return a :class:`MaskedQuantizedWeight` ``(qweight, mask)``: a dense
:class:`~bitpress.formats.QuantizedWeight` (codes 0 at pruned positions, which does not make
them 0 in general: ``s·0 + z ≠ 0``) and the bool element mask ``[out, in]``. They exist for
the benchmark and are evaluated as **fake-quantised float models**
(:meth:`MaskedQuantizedWeight.dequantize`); their on-disk cost is the honest figure of a
real storage format, computed by :func:`bits_per_weight_24` and
:func:`bits_per_weight_unstructured`, not the dense ``QuantizedWeight``'s.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..errors import ConfigError
from ..formats import QuantizedWeight, check_bits, check_group_size, packed_words
from ..quant import QuantSpec, prepare_hessian
from ..quant.spec import Options
from ..quant.gptq import DEFAULT_DAMP, _check_hessian, _check_weight
from .sweep import prune_quantize_sweep

_KNOWN = {"damp", "block_size"}


class MaskedQuantizedWeight(NamedTuple):
    """A dense quantized weight plus an element keep mask (2:4 / unstructured baselines)."""
    qweight: QuantizedWeight
    mask: torch.Tensor          # bool [out, in]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The fake-quantised float weight: pruned positions exactly 0."""
        return (self.qweight.dequantize(torch.float32) * self.mask).to(dtype)

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.mask.float().mean())


def _param_bits(param_bits: int) -> int:
    if param_bits not in (16, 32):
        raise ConfigError(f"param_bits must be 16 or 32, got {param_bits}")
    return param_bits


def bits_per_weight_24(bits: int, group_size: int, param_bits: int = 16) -> float:
    """Honest bits per original weight of 2:4 + ``bits``-bit group quantization, stored as a
    2:4 sparse tensor: the kept half's codes (``bits / 2``), a 2-bit position index per kept
    weight (``2 · 1/2 = 1``, the semi-structured metadata) and one scale + zero per group of
    ``group_size`` input columns (``2 · param_bits / group_size``)."""
    check_bits(bits)
    check_group_size(group_size)
    if group_size == -1:
        raise ConfigError("pass the effective group size (the row length) for per-channel")
    return bits / 2 + 1.0 + 2 * _param_bits(param_bits) / group_size


def bits_per_weight_unstructured(bits: int, group_size: int, sparsity: float = 0.5,
                                 param_bits: int = 16) -> float:
    """Honest bits per original weight of unstructured pruning + group quantization: kept
    codes (``bits · (1 − sparsity)``), a 1-bit kept bitmap per weight, one scale + zero per
    group of ``group_size`` input columns."""
    check_bits(bits)
    if group_size < 1:
        raise ConfigError("pass the effective group size (the row length) for per-channel")
    return bits * (1 - sparsity) + 1.0 + 2 * _param_bits(param_bits) / group_size


def bits_per_weight_gqsa(bits: int, group_size: int, sparsity: float, param_bits: int = 16,
                         out_features: Optional[int] = None,
                         in_features: Optional[int] = None) -> float:
    """Honest bits per original weight of a group-sparse checkpoint (format_version 2): per
    kept group its packed codes (whole int32 words), scale and zero; per group, kept or not,
    one bit of the keep bitmask (rows padded to whole bytes when the shape is given). Ragged
    last groups are ignored (counted as full groups)."""
    check_bits(bits)
    per_group = 32 * packed_words(group_size, bits) + 2 * _param_bits(param_bits)
    bpw = (1 - sparsity) * per_group / group_size
    if out_features and in_features:
        ng = -(-in_features // group_size)
        return bpw + 8 * ((ng + 7) // 8) / in_features
    return bpw + 1 / group_size


def _prepare(W: torch.Tensor, H: Optional[torch.Tensor], spec: QuantSpec, name: str):
    if H is None:
        raise ConfigError(f"{name} needs the layer Hessian H = XᵀX/n (calibration data)")
    _check_weight(W)
    _check_hessian(H, W.shape[1])
    o = Options(spec, name, _KNOWN)
    damp = o.number("damp", DEFAULT_DAMP)
    bs = o.integer("block_size", 128, lo=4)
    factor = prepare_hessian(H.to(W.device), damp=float(damp))
    return factor, bs


def _run(W, factor, select, spec: QuantSpec, bs: int) -> MaskedQuantizedWeight:
    codes, scale, zero, mask = prune_quantize_sweep(
        W, factor, select, spec.bits, spec.group_size, sym=spec.sym,
        param_dtype=spec.torch_param_dtype, block_size=bs)
    return MaskedQuantizedWeight(QuantizedWeight(codes, scale, zero, spec.bits, spec.group_size),
                                 mask)


def semi_structured_24(W: torch.Tensor, H: Optional[torch.Tensor],
                       spec: QuantSpec) -> MaskedQuantizedWeight:
    """SparseGPT-style 2:4 pruning along the input dimension with OBS compensation, then
    ``spec.bits``-bit group quantization (``spec.group_size``) of the kept weights, in one
    sweep. Returns ``(qweight, mask)``; evaluated as a fake-quantised float model. Honest
    storage cost: :func:`bits_per_weight_24`. ``spec.sparsity`` is ignored (always 50 %)."""
    factor, bs = _prepare(W, H, spec, "2:4")
    bs = max(4, bs // 4 * 4)

    def select(i1: int, i2: int, Wb: torch.Tensor, Ub: Optional[torch.Tensor]) -> torch.Tensor:
        cnt, out = Wb.shape
        d = torch.diagonal(Ub) if Ub is not None else torch.ones(cnt, device=Wb.device)
        sal = Wb.pow(2) / d[:, None].pow(2)
        runs = (cnt + 3) // 4
        pad = runs * 4 - cnt
        if pad:
            sal = torch.nn.functional.pad(sal, (0, 0, 0, pad), value=float("inf"))
        sal = sal.view(runs, 4, out)
        rank = sal.argsort(1).argsort(1)                      # 0 = least salient
        n_pr = torch.full((runs, 1, 1), 2, device=Wb.device)
        if pad:
            n_pr[-1] = (4 - pad) // 2
        return (rank >= n_pr).view(runs * 4, out)[:cnt]

    return _run(W, factor, select, spec, bs)


def unstructured(W: torch.Tensor, H: Optional[torch.Tensor],
                 spec: QuantSpec) -> MaskedQuantizedWeight:
    """SparseGPT-style unstructured pruning (``spec.sparsity``, default 0.5, exact per column
    block) with OBS compensation, then ``spec.bits``-bit group quantization of the kept
    weights, in one sweep. Returns ``(qweight, mask)``; evaluated as a fake-quantised float
    model. Honest storage cost: :func:`bits_per_weight_unstructured`."""
    factor, bs = _prepare(W, H, spec, "unstructured")
    sparsity = 0.5 if spec.sparsity is None else float(spec.sparsity)

    def select(i1: int, i2: int, Wb: torch.Tensor, Ub: Optional[torch.Tensor]) -> torch.Tensor:
        cnt, out = Wb.shape
        d = torch.diagonal(Ub) if Ub is not None else torch.ones(cnt, device=Wb.device)
        sal = (Wb.pow(2) / d[:, None].pow(2)).flatten()
        k = int(round(sparsity * sal.numel()))
        keep = torch.ones_like(sal, dtype=torch.bool)
        if k:
            keep[sal.topk(k, largest=False).indices] = False
        return keep.view(cnt, out)

    return _run(W, factor, select, spec, bs)
