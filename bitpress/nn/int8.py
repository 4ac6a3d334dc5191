"""int8 ``Conv2d`` / ``Linear`` layers of quantized diffusion U-Nets (W8A8 / W4A8), on torch's
real int8 CPU kernels: onednn (``qconv2d_pointwise`` / ``qlinear_pointwise``, fp32 output, the
default) or fbgemm (``quantized.conv2d`` / ``linear``, uint8 output).

Per-output-channel symmetric int8 weight codes (W4: values in [-8, 7]), per-tensor uint8
activation grids chosen separately for every denoising step, optional split input quantizers
(one grid and one int8 op per channel slice, outputs summed) for inputs that concatenate
tensors of different ranges. The step index comes from ``step_fn`` (the
:class:`bitpress.cache.QuantizedUNet` handle). :data:`quant_ranges` keeps the codes inside the
range that AVX2's ``vpmaddubsw`` multiplies without int16 saturation. Kernel choice,
measurements and accuracy: docs/diffusion.md ("int8 U-Net layers").
"""
from __future__ import annotations

import abc
import contextlib
import math
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, FormatError

GUARDS = ("weight", "act")
_SUBSAMPLE = 1 << 15


def quant_ranges(wbits: int, guard: str = "weight") -> tuple[int, int, int]:
    """``(w_qmin, w_qmax, a_qmax)`` for the fbgemm kernel on AVX2 (see the module docstring)."""
    if wbits == 4:
        return -8, 7, 255
    if wbits == 8:
        if guard == "weight":
            return -64, 63, 255
        if guard == "act":
            return -128, 127, 127
        raise ConfigError(f"guard must be one of {GUARDS}, got {guard!r}")
    raise ConfigError(f"weight bits must be 4 or 8, got {wbits}")



def _affine_params(lo: float, hi: float, qmax: int) -> tuple[float, int]:
    """Scale and integer zero point of the asymmetric grid [0, qmax] covering [lo, hi] (0 included)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = (hi - lo) / qmax
    if not s > 1e-12:
        return 1e-8, 0
    zp = int(min(max(round(-lo / s), 0), qmax))
    return float(s), zp


def search_act_range(x: torch.Tensor, qmax: int = 255, grid: int = 20, min_ratio: float = 0.5,
                     generator: torch.Generator | None = None) -> tuple[float, float]:
    """Clipping range ``(lo, hi)`` of an asymmetric per-tensor grid for the activation ``x``.

    Both ends of ``[min(x, 0), max(x, 0)]`` are shrunk by a common ratio in ``[min_ratio, 1]``;
    the ratio with the least squared error on (a random subsample of at most 32k elements
    of) ``x`` wins.
    """
    flat = x.detach().reshape(-1).float()
    lo0, hi0 = min(float(flat.min()), 0.0), max(float(flat.max()), 0.0)
    if hi0 - lo0 <= 1e-12:
        return lo0, hi0
    if flat.numel() > _SUBSAMPLE:
        idx = torch.randint(0, flat.numel(), (_SUBSAMPLE,), generator=generator)
        flat = flat[idx]
    flat = flat.double()
    best, best_r = math.inf, 1.0
    for r in torch.linspace(min_ratio, 1.0, grid).tolist():
        s, zp = _affine_params(lo0 * r, hi0 * r, qmax)
        q = torch.clamp(torch.round(flat / s) + zp, 0, qmax)
        err = float((((q - zp) * s - flat) ** 2).sum())
        if err < best:
            best, best_r = err, r
    return lo0 * best_r, hi0 * best_r



@contextlib.contextmanager
def _engine(name: str) -> Iterator[None]:
    prev = torch.backends.quantized.engine
    if prev != name:
        torch.backends.quantized.engine = name
    try:
        yield
    finally:
        if torch.backends.quantized.engine != prev:
            torch.backends.quantized.engine = prev


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def onednn_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and \
            torch.ops.onednn.qconv2d_pointwise.default is not None and \
            torch.ops.onednn.qlinear_pointwise.default is not None
    except (AttributeError, RuntimeError):
        return False


KERNELS = ("onednn", "fbgemm")


def kernel_available(kernel: str) -> bool:
    return onednn_available() if kernel == "onednn" else fbgemm_available()


_warned_fallback = [False]


class _Int8Layer(nn.Module, abc.ABC):
    """Shared machinery of :class:`Int8Conv2d` and :class:`Int8Linear`.

    Buffers (in ``state_dict``): ``codes`` int8 (the weight's shape), ``w_scale`` fp32 [out],
    ``bias`` fp32 [out] (zeros if the float layer had none; ``has_bias`` says which),
    per step and part ``a_scale``/``a_zero`` (input grid) and ``o_scale``/``o_zero``
    (output requantization), each ``[T, P]``. ``parts`` are the channel ranges of the split
    quantizers (one part = no split). The packed weights and the per-step parameters
    are cached on first use; after editing buffers in place call :meth:`refresh`.
    """

    kind = ""

    def __init__(self, out_features: int, in_features: int, weight_shape: Sequence[int], n_steps: int,
                 parts: Sequence[tuple[int, int]], w_qmin: int, w_qmax: int, a_qmax: int, has_bias: bool,
                 step_fn: Callable[[], int] | None = None, kernel: str = "onednn"):
        super().__init__()
        if kernel not in KERNELS:
            raise ConfigError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
        self.in_ch, self.out_ch = in_features, out_features
        self.n_steps = n_steps
        self.parts = [(int(a), int(b)) for a, b in parts]
        self.w_qmin, self.w_qmax, self.a_qmax = w_qmin, w_qmax, a_qmax
        self.has_bias = has_bias
        P = len(self.parts)
        self.register_buffer("codes", torch.zeros(tuple(weight_shape), dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features))
        self.register_buffer("a_scale", torch.ones(n_steps, P))
        self.register_buffer("a_zero", torch.zeros(n_steps, P, dtype=torch.int32))
        self.register_buffer("o_scale", torch.ones(n_steps, P))
        self.register_buffer("o_zero", torch.zeros(n_steps, P, dtype=torch.int32))
        self.step_fn = step_fn
        self.mode = "int8"
        self.out_correction: tuple[torch.Tensor, torch.Tensor] | None = None  # ([T, out], [T, out])
        self._float_weight: torch.Tensor | None = None
        self._float_bias: torch.Tensor | None = None
        self._packed: list[Any] | None = None
        self._params: list[list[tuple[float, int, float, int]]] | None = None
        self._calib: dict[int, list[list[float]]] | None = None  # step -> per part [alo, ahi, olo, ohi]

    # -- geometry hooks (subclasses) ----------------------------------------------------------
    @abc.abstractmethod
    def _slice_in(self, x: torch.Tensor, p: int) -> torch.Tensor:
        ...

    def _weight_part(self, w: torch.Tensor, p: int) -> torch.Tensor:
        """Input-channel slice ``p`` of the weight (dim 1 for both conv and linear)."""
        if len(self.parts) == 1:
            return w
        a, b = self.parts[p]
        return w[:, a:b]

    @abc.abstractmethod
    def _float_op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def _prepack(self, qw: torch.Tensor, b: torch.Tensor | None) -> Any:
        ...

    @abc.abstractmethod
    def _int8_op(self, qx: torch.Tensor, packed: Any, scale: float, zero: int) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def _onednn_prepack(self, codes: torch.Tensor, p: int) -> Any:
        ...

    @abc.abstractmethod
    def _onednn_op(self, xq: torch.Tensor, a_s: float, a_z: int, packed: Any,
                   bias: torch.Tensor | None) -> torch.Tensor:
        ...

    # -- state ------------------------------------------------------------------------------
    def _step(self) -> int:
        if self.step_fn is None:
            raise ConfigError("this quantized layer is not attached to a QuantizedUNet (no step source)")
        s = self.step_fn()
        if not 0 <= s < self.n_steps:
            raise ConfigError(f"denoising step {s} is outside the {self.n_steps} calibrated steps; the U-Net was "
                              f"quantized for {self.n_steps} evaluations per trajectory (call .reset() on the "
                              f"handle or the cache before a new trajectory)")
        return s

    def refresh(self) -> None:
        """Drop the cached packed weights and step parameters (rebuilt from the buffers on next use)."""
        self._packed = None
        self._params = None

    _invalidate = refresh

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    def _step_params(self, step: int) -> list[tuple[float, int, float, int]]:
        if self._params is None:
            a_s, a_z = self.a_scale.tolist(), self.a_zero.tolist()
            o_s, o_z = self.o_scale.tolist(), self.o_zero.tolist()
            self._params = [[(a_s[t][p], a_z[t][p], o_s[t][p], o_z[t][p]) for p in range(len(self.parts))]
                            for t in range(self.n_steps)]
        return self._params[step]

    def _packed_parts(self) -> list[Any]:
        if self._packed is None and self.kernel == "onednn":
            self._w_zero = torch.zeros(self.out_ch, dtype=torch.int32)
            self._w_scale_f = self.w_scale.float().contiguous()
            self._bias_f = self.bias.float().contiguous() if self.has_bias else None
            self._packed = [self._onednn_prepack(self._weight_part(self.codes, p).contiguous(), p)
                            for p in range(len(self.parts))]
        if self._packed is None:
            packed = []
            with _engine("fbgemm"):
                for p in range(len(self.parts)):
                    codes = self._weight_part(self.codes, p).contiguous()
                    qw = torch._make_per_channel_quantized_tensor(
                        codes, self.w_scale.double(), torch.zeros(self.out_ch, dtype=torch.long), 0)
                    b = self.bias.float() if (p == 0 and self.has_bias) else None
                    packed.append(self._prepack(qw, b))
            self._packed = packed
        return self._packed

    # -- forwards ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calib is not None:
            return self._forward_calib(x)
        if self.mode == "float":
            return self.forward_float(x)
        step = self._step()
        if self.mode == "reference" or x.device.type != "cpu" or not kernel_available(self.kernel):
            if self.mode == "int8" and not _warned_fallback[0]:
                _warned_fallback[0] = True
                warnings.warn(f"no int8 kernel for this input (device {x.device.type}, {self.kernel} available: "
                              f"{kernel_available(self.kernel)}): quantized U-Net layers run the pure-torch "
                              f"reference (same math, slow)")
            y = self.forward_reference(x, step).to(x.dtype)
        else:
            y = self.forward_int8(x, step)
        if self.out_correction is not None:  # DEC of the quantization error: per-step, per-channel affine
            a, b = self.out_correction
            shape = (1, -1) + (1,) * (y.ndim - 2) if self.kind == "conv2d" else (-1,)
            y = torch.addcmul(b[step].to(y.dtype).view(shape), y, a[step].to(y.dtype).view(shape))
        return y

    def forward_float(self, x: torch.Tensor) -> torch.Tensor:
        """The original float layer (only while the float weights are kept, see ``keep_float``)."""
        if self._float_weight is None:
            raise ConfigError("float weights of this layer were not kept (quantize_unet(..., keep_float=True)) "
                              "or it was loaded from disk")
        return self._float_op(x, self._float_weight.to(x.dtype), None if self._float_bias is None
                              else self._float_bias.to(x.dtype))

    def forward_int8(self, x: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """Real integer execution: quantize with this step's input grid, int8 op (onednn: fp32
        output; fbgemm: uint8 output with this step's output grid, dequantized)."""
        step = self._step() if step is None else step
        params = self._step_params(step)
        packed = self._packed_parts()
        xf = x.float()
        y = None
        for p, (a_s, a_z, o_s, o_z) in enumerate(params):
            xp = self._slice_in(xf, p)
            if self.a_qmax < 255:  # guard="act": the grid stops at a_qmax, not at 255
                xp = xp.clamp(-a_z * a_s, (self.a_qmax - a_z) * a_s)
            # one fused pass; a manual div/round/add/clamp/cast measured as fast at B=64, slower at B=1
            qx = torch.quantize_per_tensor(xp, a_s, a_z, torch.quint8)
            if self.kernel == "onednn":  # takes plain uint8 codes, returns fp32
                yp = self._onednn_op(qx.int_repr(), a_s, a_z, packed[p], self._bias_f if p == 0 else None)
            else:
                yp = self._int8_op(qx, packed[p], o_s, o_z).dequantize()
            y = yp if y is None else y.add_(yp)
        assert y is not None
        return y.to(x.dtype)

    def forward_reference(self, x: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """The same quantized math in float64 with plain torch ops (the test oracle). The
        activation codes are torch's ``quantize_per_tensor`` of the fp32 input, as in the
        kernels: rounding ``x / a_s`` in float64 instead flips a code where the fp32 quotient
        sits within an ulp of a rounding tie (about one seed in 200 in the tests)."""
        step = self._step() if step is None else step
        xf = x.float()
        y = None
        for p, (a_s, a_z, o_s, o_z) in enumerate(self._step_params(step)):
            xq = torch.quantize_per_tensor(self._slice_in(xf, p), a_s, a_z, torch.quint8)
            xq = torch.clamp(xq.int_repr().double(), 0, self.a_qmax)
            w = self._weight_part(self.codes, p).double() * self._wview(self.w_scale.double())
            b = self.bias.double() if (p == 0 and self.has_bias) else None
            yp = self._float_op((xq - a_z) * a_s, w, b)
            if self.kernel == "fbgemm":  # fbgemm requantizes its output to uint8
                yp = (torch.clamp(torch.round(yp / o_s) + o_z, 0, 255) - o_z) * o_s
            y = yp if y is None else y + yp
        assert y is not None
        return y

    def _wview(self, s: torch.Tensor) -> torch.Tensor:
        return s.view(-1, *([1] * (self.codes.ndim - 1)))

    # -- calibration ------------------------------------------------------------------------
    def _forward_calib(self, x: torch.Tensor) -> torch.Tensor:
        assert self._calib is not None and self._float_weight is not None
        step = self._step()
        w, b = self._float_weight.to(x.dtype), None if self._float_bias is None else self._float_bias.to(x.dtype)
        y = self._float_op(x, w, b)
        g = torch.Generator().manual_seed(1000 * step + len(self._calib))
        stats = []
        for p in range(len(self.parts)):
            xp = self._slice_in(x, p)
            alo, ahi = search_act_range(xp, self.a_qmax, generator=g)
            if len(self.parts) == 1:
                yp = y
            else:
                yp = self._float_op(xp, self._weight_part(w, p), b if p == 0 else None)
            stats.append([alo, ahi, min(float(yp.min()), 0.0), max(float(yp.max()), 0.0)])
        prev = self._calib.get(step)
        if prev is not None:  # several calibration batches at one step: union of the ranges
            stats = [[min(a[0], c[0]), max(a[1], c[1]), min(a[2], c[2]), max(a[3], c[3])] for a, c in zip(prev, stats)]
        self._calib[step] = stats
        return y

    def _finish_calibration(self, name: str, out_margin: float) -> None:
        assert self._calib is not None
        missing = [t for t in range(self.n_steps) if t not in self._calib]
        if missing:
            raise ConfigError(f"calibration never ran layer {name!r} at step(s) {missing[:10]}"
                              f"{'...' if len(missing) > 10 else ''}: every step must be calibrated")
        P = len(self.parts)
        a_s = torch.ones(self.n_steps, P)
        a_z = torch.zeros(self.n_steps, P, dtype=torch.int32)
        o_s = torch.ones(self.n_steps, P)
        o_z = torch.zeros(self.n_steps, P, dtype=torch.int32)
        for t in range(self.n_steps):
            for p, (alo, ahi, olo, ohi) in enumerate(self._calib[t]):
                a_s[t, p], a_z[t, p] = _affine_params(alo, ahi, self.a_qmax)
                o_s[t, p], o_z[t, p] = _affine_params(olo * out_margin, ohi * out_margin, 255)
        self.a_scale.copy_(a_s)
        self.a_zero.copy_(a_z)
        self.o_scale.copy_(o_s)
        self.o_zero.copy_(o_z)
        self._calib = None
        self._invalidate()

    def layer_meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "in": self.in_ch, "out": self.out_ch, "weight_shape": list(self.codes.shape),
                "parts": [list(p) for p in self.parts], "w_qmin": self.w_qmin, "w_qmax": self.w_qmax,
                "a_qmax": self.a_qmax, "has_bias": self.has_bias, "kernel": self.kernel}

    def extra_repr(self) -> str:
        return (f"{self.in_ch}, {self.out_ch}, steps={self.n_steps}, parts={self.parts}, "
                f"w=[{self.w_qmin},{self.w_qmax}], a=[0,{self.a_qmax}], kernel={self.kernel}, mode={self.mode}")


class Int8Conv2d(_Int8Layer):
    """int8 ``Conv2d`` (onednn or fbgemm) with per-step input grids and optional split input quantizers."""

    kind = "conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], groups: int, n_steps: int,
                 parts: Sequence[tuple[int, int]], w_qmin: int, w_qmax: int, a_qmax: int, has_bias: bool,
                 step_fn: Callable[[], int] | None = None, kernel: str = "onednn"):
        if groups != 1 and len(parts) > 1:
            raise ConfigError("split input quantizers need groups == 1")
        shape = (out_channels, in_channels // groups, *kernel_size)
        super().__init__(out_channels, in_channels, shape, n_steps, parts, w_qmin, w_qmax, a_qmax, has_bias, step_fn,
                         kernel)
        self.stride, self.padding = list(stride), list(padding)
        self.dilation, self.groups = list(dilation), int(groups)

    def _slice_in(self, x: torch.Tensor, p: int) -> torch.Tensor:
        if len(self.parts) == 1:
            return x
        a, b = self.parts[p]
        return x[:, a:b]

    def _float_op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _prepack(self, qw: torch.Tensor, b: torch.Tensor | None) -> Any:
        return torch.ops.quantized.conv2d_prepack(qw, b, self.stride, self.padding, self.dilation, self.groups)

    def _int8_op(self, qx: torch.Tensor, packed: Any, scale: float, zero: int) -> torch.Tensor:
        return torch.ops.quantized.conv2d(qx, packed, scale, zero)

    def _onednn_prepack(self, codes: torch.Tensor, p: int) -> Any:
        return torch.ops.onednn.qconv_prepack(codes, self._w_scale_f, float(self.a_scale[0, p]),
                                              int(self.a_zero[0, p]), self.stride, self.padding, self.dilation,
                                              self.groups, None)

    def _onednn_op(self, xq: torch.Tensor, a_s: float, a_z: int, packed: Any,
                   bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.onednn.qconv2d_pointwise(xq, a_s, a_z, packed, self._w_scale_f, self._w_zero, bias,
                                                  self.stride, self.padding, self.dilation, self.groups, 1.0, 0,
                                                  torch.float32, "none", [], "")

    def layer_meta(self) -> dict[str, Any]:
        return {**super().layer_meta(), "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "groups": self.groups}


class Int8Linear(_Int8Layer):
    """int8 ``Linear`` (onednn or fbgemm) on ``[..., in]`` inputs with per-step input grids."""

    kind = "linear"

    def __init__(self, in_features: int, out_features: int, n_steps: int, parts: Sequence[tuple[int, int]],
                 w_qmin: int, w_qmax: int, a_qmax: int, has_bias: bool, step_fn: Callable[[], int] | None = None,
                 kernel: str = "onednn"):
        super().__init__(out_features, in_features, (out_features, in_features), n_steps, parts, w_qmin, w_qmax,
                         a_qmax, has_bias, step_fn, kernel)

    def _slice_in(self, x: torch.Tensor, p: int) -> torch.Tensor:
        if len(self.parts) == 1:
            return x
        a, b = self.parts[p]
        return x[..., a:b]

    def _float_op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    def _prepack(self, qw: torch.Tensor, b: torch.Tensor | None) -> Any:
        return torch.ops.quantized.linear_prepack(qw, b)

    def _int8_op(self, qx: torch.Tensor, packed: Any, scale: float, zero: int) -> torch.Tensor:
        lead = qx.shape[:-1]
        y = torch.ops.quantized.linear(qx.reshape(-1, qx.shape[-1]), packed, scale, zero)
        return y.reshape(*lead, self.out_ch)

    def _onednn_prepack(self, codes: torch.Tensor, p: int) -> Any:
        return torch.ops.onednn.qlinear_prepack(codes, None)

    def _onednn_op(self, xq: torch.Tensor, a_s: float, a_z: int, packed: Any,
                   bias: torch.Tensor | None) -> torch.Tensor:
        lead = xq.shape[:-1]
        y = torch.ops.onednn.qlinear_pointwise(xq.reshape(-1, xq.shape[-1]), a_s, a_z, packed, self._w_scale_f,
                                               self._w_zero, bias, 1.0, 0, torch.float32, "none", [], "")
        return y.reshape(*lead, self.out_ch)


def build_int8_layer(meta: dict[str, Any], n_steps: int, step_fn: Callable[[], int] | None) -> _Int8Layer:
    parts = [tuple(p) for p in meta["parts"]]
    common = dict(n_steps=n_steps, parts=parts, w_qmin=int(meta["w_qmin"]), w_qmax=int(meta["w_qmax"]),
                  a_qmax=int(meta["a_qmax"]), has_bias=bool(meta["has_bias"]), step_fn=step_fn,
                  kernel=str(meta.get("kernel", "fbgemm")))
    if meta["kind"] == "conv2d":
        ws = meta["weight_shape"]
        return Int8Conv2d(int(meta["in"]), int(meta["out"]), ws[2:], meta["stride"], meta["padding"],
                           meta["dilation"], int(meta["groups"]), **common)
    if meta["kind"] == "linear":
        return Int8Linear(int(meta["in"]), int(meta["out"]), **common)
    raise FormatError(f"unknown quantized layer kind {meta['kind']!r}")


__all__ = ["Int8Conv2d", "Int8Linear", "build_int8_layer", "quant_ranges", "search_act_range",
           "GUARDS", "KERNELS", "kernel_available", "fbgemm_available", "onednn_available"]
