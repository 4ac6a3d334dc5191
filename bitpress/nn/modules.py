"""Drop-in ``torch.nn`` replacements whose buffers are the canonical packed tensors.

State-dict keys equal the on-disk names:

* ``QuantLinear``: ``qweight`` int32 ``[out, ceil(in/pf)]``, ``scales``, ``zeros``
  ``[out, n_groups]``, optional ``bias``.
* ``GroupSparseLinear``: ``row_ptr`` int32 ``[out+1]``, ``col_idx`` int32 ``[nnz]``,
  ``qvalues`` int32 ``[nnz, ceil(gs/pf)]``, ``scales``, ``zeros`` ``[nnz]``, optional ``bias``.

``scales``/``zeros`` are plain buffers; fine-tuning passes that train them turn them into
parameters with :meth:`float_parts_trainable`. Forward calls the ``bitpress`` ops, which
dispatch to the fastest kernel registered for the device.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..formats.qweight import GroupedShape
from ..formats import (QuantizedWeight, check_bits, check_group_size, magnitude_keep_mask,
                       packed_words, quantize_rtn)
from ..kernels import dense_qmm, ops, sparse_qmm

_PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _linear_weight(linear: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight ``[out, in]`` and bias of an ``nn.Linear`` or a GPT-2 style ``Conv1D``
    (whose weight is stored ``[in, out]``)."""
    w = linear.weight.detach()
    if type(linear).__name__ == "Conv1D":
        w = w.t()
    elif not isinstance(linear, nn.Linear):
        raise ConfigError(f"cannot quantize {type(linear).__name__}: expected nn.Linear or Conv1D")
    b = linear.bias.detach() if getattr(linear, "bias", None) is not None else None
    return w.float(), b


class _PackedLinear(nn.Module, GroupedShape):
    #: the buffers that hold the weight (with ``bias``: what a kernel plan binds)
    _WEIGHT_TENSORS: tuple[str, ...] = ()
    bits: int
    group_size: int
    in_features: int
    out_features: int

    def _init_common(self, in_features: int, out_features: int, bits: int, group_size: int,
                     bias: bool, param_dtype: torch.dtype, device) -> None:
        check_bits(bits)
        check_group_size(group_size)
        if param_dtype not in _PARAM_DTYPES:
            raise ConfigError(f"param dtype {param_dtype} not supported")
        if in_features <= 0 or out_features <= 0:
            raise ConfigError("in_features and out_features must be positive")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        if bias:
            # the bias keeps full precision (float32 here; a loaded checkpoint keeps its dtype)
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32,
                                                     device=device))
        else:
            self.bias = None

    def float_parts_trainable(self, trainable: bool = True) -> list[nn.Parameter]:
        """Turn ``scales``/``zeros`` (and ``bias``) into float32 parameters (or back into
        buffers of the original dtype); returns the parameters. Codes stay frozen."""
        out = []
        for name in ("scales", "zeros", "bias"):
            t = getattr(self, name, None)
            if t is None:
                continue
            if trainable and not isinstance(t, nn.Parameter):
                self._orig_dtypes = getattr(self, "_orig_dtypes", {})
                self._orig_dtypes[name] = t.dtype
                delattr(self, name)
                p = nn.Parameter(t.detach().float().clone())
                self.register_parameter(name, p)
                out.append(p)
            elif not trainable and isinstance(t, nn.Parameter):
                dtype = getattr(self, "_orig_dtypes", {}).get(name, t.dtype)
                delattr(self, name)
                self.register_buffer(name, t.detach().to(dtype).contiguous())
        return out

    # ---- forward ---------------------------------------------------------------------
    def _run(self, op_name: str, op, args: tuple) -> torch.Tensor:
        """Call the op, or, outside autograd and ``torch.compile``, the kernel the op would
        dispatch to, directly: the ``torch.library`` layer costs ~100 µs a call on CPU,
        as much as a small layer's whole GEMV at batch 1. The choice is cached per module,
        device and dtype and re-made when a forced implementation or the buffers change."""
        x = args[0]
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"{type(self).__name__}: input has {x.shape[-1]} features, "
                               f"expected {self.in_features}")
        if ((torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in args))
                or torch.compiler.is_compiling() or x.device.type == "meta"):
            return op(*args)
        key = (x.device.type, x.dtype, ops._forced(), args[1].data_ptr(), args[-6].dtype
               if op_name == "sparse_qmm" else args[2].dtype)
        cached = self.__dict__.get("_impl_cache")
        if cached is None or cached[0] != key:
            cached = (key, ops.select_impl(op_name, x.device.type, *args)[1])
            self.__dict__["_impl_cache"] = cached
            self.__dict__.pop("_fast", None)
        impl = cached[1]
        plan = getattr(impl, "plan", None)
        bound = tuple(getattr(self, n) for n in self._WEIGHT_TENSORS) + (self.bias,)
        if plan is not None and not any(isinstance(t, nn.Parameter) for t in bound):
            # bind the weight once (see _fast_forward); the plan re-validates every call
            fast = plan(args)
            if fast is not None:
                self.__dict__["_fast"] = (fast, bound)
                y = fast(x)
                if y is not None:
                    return y
        return impl(*args)

    def _fast_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The lean per-call path (inference on a kernel that offers a plan): the kernel's
        bound call, after checking that the module still holds the tensors it was bound to;
        ``None`` sends the call through :meth:`_run`."""
        fp = self.__dict__.get("_fast")
        if fp is None or (torch.is_grad_enabled() and x.requires_grad) \
                or torch.compiler.is_compiling():
            return None
        fast, bound = fp
        b = self._buffers
        for name, t in zip(self._WEIGHT_TENSORS, bound):
            if b.get(name) is not t:
                return None
        if self.bias is not bound[-1]:
            return None
        return fast(x)

    def extra_repr(self) -> str:
        gs = "per-channel" if self.group_size == -1 else self.group_size
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={gs}, bias={self.bias is not None}")


class QuantLinear(_PackedLinear):
    """Dense low-bit linear: ``y = x Wᵀ + b`` with ``W`` in the canonical packed layout."""
    _WEIGHT_TENSORS = ("qweight", "scales", "zeros")

    def __init__(self, in_features: int, out_features: int, bits: int = 4,
                 group_size: int = 128, bias: bool = False,
                 param_dtype: torch.dtype = torch.float16, device=None) -> None:
        super().__init__()
        self._init_common(in_features, out_features, bits, group_size, bias, param_dtype, device)
        ng = self.n_groups
        self.register_buffer("qweight", torch.zeros(out_features, packed_words(in_features, bits),
                                                    dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(out_features, ng, dtype=param_dtype,
                                                   device=device))
        self.register_buffer("zeros", torch.zeros(out_features, ng, dtype=param_dtype,
                                                  device=device))

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                       param_dtype: torch.dtype = torch.float16) -> "QuantLinear":
        """Module holding a solved :class:`QuantizedWeight` (from any pass)."""
        m = cls(qw.in_features, qw.out_features, qw.bits, qw.group_size, bias is not None,
                param_dtype, device=qw.codes.device)
        packed = qw.pack_dense(param_dtype)
        m.qweight.copy_(packed["qweight"])
        m.scales.copy_(packed["scales"])
        m.zeros.copy_(packed["zeros"])
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int = 4, group_size: int = 128,
                    sym: bool = False, param_dtype: torch.dtype = torch.float16) -> "QuantLinear":
        """Round-to-nearest quantization of an ``nn.Linear`` (or GPT-2 ``Conv1D``)."""
        w, b = _linear_weight(linear)
        qw = quantize_rtn(w, bits, group_size, sym=sym, param_dtype=param_dtype)
        return cls.from_quantized(qw, b, param_dtype)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight.from_dense(self.qweight, self.scales.detach(),
                                          self.zeros.detach(), self.bits, self.group_size,
                                          self.in_features)

    def dequantize(self) -> torch.Tensor:
        return self.quantized_weight().dequantize()

    def scheme(self) -> dict[str, Any]:
        return {"format": "dense", "bits": self.bits, "group_size": self.group_size,
                "in_features": self.in_features, "out_features": self.out_features}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.__dict__.get("_fused")
        if fused is not None:  # bitpress.nn.fuse: one call for the linears sharing x
            y = fused.member_forward(self, x)
            if y is not None:
                return y
        y = self._fast_forward(x)
        if y is not None:
            return y
        return self._run("dense_qmm", dense_qmm, (x, self.qweight, self.scales, self.zeros,
                                                  self.bias, self.bits, self.gs,
                                                  self.in_features))


class GroupSparseLinear(_PackedLinear):
    """Group-sparse low-bit linear: kept weight groups stored as block-sparse rows."""
    _WEIGHT_TENSORS = ("row_ptr", "col_idx", "qvalues", "scales", "zeros")

    def __init__(self, in_features: int, out_features: int, bits: int = 4,
                 group_size: int = 16, nnz: int = 0, bias: bool = False,
                 param_dtype: torch.dtype = torch.float16, device=None) -> None:
        super().__init__()
        if group_size == -1:
            raise ConfigError("GroupSparseLinear needs a group size (got per-channel)")
        self._init_common(in_features, out_features, bits, group_size, bias, param_dtype, device)
        self.register_buffer("row_ptr", torch.zeros(out_features + 1, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("col_idx", torch.zeros(nnz, dtype=torch.int32, device=device))
        self.register_buffer("qvalues", torch.zeros(nnz, packed_words(group_size, bits),
                                                    dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(nnz, dtype=param_dtype, device=device))
        self.register_buffer("zeros", torch.zeros(nnz, dtype=param_dtype, device=device))

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.out_features * self.n_groups)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                       param_dtype: torch.dtype = torch.float16) -> "GroupSparseLinear":
        packed = qw.pack_bsr(param_dtype)
        m = cls(qw.in_features, qw.out_features, qw.bits, qw.group_size,
                nnz=packed["col_idx"].numel(), bias=bias is not None, param_dtype=param_dtype,
                device=qw.codes.device)
        for k, v in packed.items():
            getattr(m, k).copy_(v)
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int = 4, group_size: int = 16,
                    sparsity: float = 0.5, balanced_rows: bool = False, sym: bool = False,
                    param_dtype: torch.dtype = torch.float16) -> "GroupSparseLinear":
        """Magnitude group pruning (largest-L2 groups kept) + RTN of the kept groups."""
        w, b = _linear_weight(linear)
        keep = magnitude_keep_mask(w, group_size, sparsity, balanced_rows)
        qw = quantize_rtn(w, bits, group_size, sym=sym, param_dtype=param_dtype, keep=keep)
        return cls.from_quantized(qw, b, param_dtype)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight.from_bsr(self.row_ptr, self.col_idx, self.qvalues,
                                        self.scales.detach(), self.zeros.detach(), self.bits,
                                        self.group_size, self.in_features)

    def dequantize(self) -> torch.Tensor:
        return self.quantized_weight().dequantize()

    def scheme(self) -> dict[str, Any]:
        return {"format": "bsr", "bits": self.bits, "group_size": self.group_size,
                "in_features": self.in_features, "out_features": self.out_features,
                "nnz": self.nnz}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._fast_forward(x)
        if y is not None:
            return y
        return self._run("sparse_qmm", sparse_qmm, (x, self.row_ptr, self.col_idx, self.qvalues,
                                                    self.scales, self.zeros, self.bias, self.bits,
                                                    self.group_size, self.in_features))


def packed_module_from_scheme(scheme: dict[str, Any], in_features: int, out_features: int,
                              bias: bool, param_dtype: torch.dtype, nnz: int = 0,
                              device=None) -> _PackedLinear:
    """Empty module for a ``quantization_config.modules`` entry (buffers are replaced when
    the checkpoint is loaded with ``assign=True``)."""
    if scheme["format"] == "dense":
        return QuantLinear(in_features, out_features, scheme["bits"], scheme["group_size"], bias,
                           param_dtype, device)
    return GroupSparseLinear(in_features, out_features, scheme["bits"], scheme["group_size"],
                             nnz, bias, param_dtype, device)


_HALF_KERNEL: list = []


def _half_kernel():
    """``bitpress.kernels.cpu.half_linear_cpu``, or None without the native extension
    (looked up once)."""
    if not _HALF_KERNEL:
        try:
            from ..kernels.cpu import half_linear_cpu
        except ImportError:  # no native extension: HalfLinear uses F.linear
            half_linear_cpu = None
        _HALF_KERNEL.append(half_linear_cpu)
    return _HALF_KERNEL[0]


class HalfLinear(nn.Module):
    """An unquantised linear stored in 16-bit floats (fp16 or bf16): ``y = x Wᵀ + b`` with
    fp32 arithmetic. On CPU, calls of at most :attr:`KERNEL_ROWS` activation rows run
    ``bitpress.kernels.cpu.half_linear_cpu`` (the weight widened exactly in registers, half
    the bytes of fp32); larger calls and other devices use ``F.linear`` on the weight cast to
    x's dtype (also when x needs a gradient: the weight is a buffer, not trained). For layers
    whose bytes matter at decode but whose quantisation error does not
    pay, e.g. a small model's output head (:func:`bitpress.nn.fuse.pack_output_head` with
    ``bits=16``)."""
    KERNEL_ROWS = 64

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float16, device=None) -> None:
        super().__init__()
        if dtype not in (torch.float16, torch.bfloat16):
            raise ConfigError(f"HalfLinear stores fp16 or bf16, not {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=dtype,
                                                   device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, dtype: torch.dtype = torch.float16) -> "HalfLinear":
        """Round an ``nn.Linear`` (or GPT-2 ``Conv1D``) weight to ``dtype``; bias stays fp32.
        Refuses a weight that overflows fp16."""
        w, b = _linear_weight(linear)
        if dtype == torch.float16 and bool((w.abs() > torch.finfo(torch.float16).max).any()):
            raise ConfigError("HalfLinear: the weight overflows fp16; use dtype=torch.bfloat16")
        m = cls(w.shape[1], w.shape[0], b is not None, dtype, device=w.device)
        m.weight.copy_(w.to(dtype))
        if b is not None:
            m.bias.copy_(b.float())
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"dtype={self.weight.dtype}, bias={self.bias is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cpu and x.dtype == torch.float32 \
                and not (torch.is_grad_enabled() and x.requires_grad) \
                and x.numel() // max(self.in_features, 1) <= self.KERNEL_ROWS:
            kernel = _half_kernel()
            if kernel is not None:
                return kernel(x, self.weight, self.bias)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), b)
