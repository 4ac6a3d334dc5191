"""Post-training quantization (W8A8 / W4A8) of diffusers U-Nets with real int8 kernels on CPU.

CacheQuant's PTQ half for ``UNet2DModel`` and ``UNet2DConditionModel``:

* **weights**: per-output-channel symmetric integer codes (W8, or W4 stored as int8 values in
  [-8, 7]) with a per-channel scale chosen by an MSE search over clipping ratios. ``conv_in``
  and ``conv_out`` keep 8-bit weights even for W4A8.
* **activations**: per-tensor asymmetric uint8 (scale and zero point) -- what the int8 kernel
  takes -- with **separate ranges per denoising step**, calibrated (MSE-searched clipping) on
  the full-precision U-Net along full-precision calibration trajectories.
* **split quantizers at skip concatenations**: in the up blocks every resnet receives
  ``torch.cat([h, skip])``; its ``conv1`` (after GroupNorm + SiLU, which keep the channel
  order) and its ``conv_shortcut`` (on the raw concatenation) get one activation range per
  concatenated part. Each part is quantized with its own scale and runs its own int8 conv
  over the matching channel slice of the weight; the parts' outputs are summed.
* **kept in float** (and why): the time-embedding MLP (``time_embedding``, ``class_embedding``,
  ``add_embedding``) and every resnet's ``time_emb_proj`` -- they act on one vector per image
  (negligible MACs); GroupNorm, SiLU and the two attention matmuls (softmax(QK^T)V) run in
  float as well. By default (:data:`DEFAULT_FLOAT_LAYERS`, ``exclude=``) also ``conv_in`` and
  ``conv_out``: ``conv_in`` reads the raw sample x_t, whose late-step noise is far below a
  uint8 step of its range, and ``conv_out`` writes the predicted noise itself. Measured on the
  Fashion-MNIST testbed (DPS+DEC schedule, 100 DDIM steps, 32 fresh trajectories, RMS
  distance of the final images to the float DPS+DEC images, range [-1, 1]): all int8 0.216;
  only one layer group int8, the rest float: conv_in 0.141, last up block 0.138, conv_out
  0.115, first down block 0.073, everything deeper <= 0.026 (the shallow branch runs at every
  step, cached or not, and its error accumulates over 100 steps); every layer int8 except
  conv_in/conv_out 0.145. FID (protocol v2, 500 samples) of DPS+DEC+W8A8: 53.07 all int8,
  45.20 with the two convs float (FP 46.75). They hold ~0.1 % of the MACs (1 -> 16 and
  16 -> 1 channels at 28x28) and 0.01 % of the weights. With ``exclude=()`` they are int8
  (8-bit weights also under W4A8). All other convolutions and all linears of
  attention/transformer blocks are int8.

Which int8 kernel, measured on this machine (AMD EPYC, 2 cores, AVX2 only -- no AVX-512, no
VNNI), torch 2.13 CPU, one thread, the real layer shapes of the Fashion-MNIST testbed U-Net
(``bench/models/ddpm-fmnist``, 28x28, channels 16/64/128), 3x3 convs, ms per call including
quantizing the fp32 input and dequantizing the output (the machine was shared, so +-10%):

============================  ======  =========  ==========  ================  ===============
conv (Cin->Cout, HxW), batch  fp32    fbgemm q   onednn q    onednn fp32-out   _int_mm+im2col
============================  ======  =========  ==========  ================  ===============
16->16, 28, B=1               0.26    0.25       0.26        0.36              2.8
64->64, 28, B=1               1.85    1.97       2.08        2.05              51.8
256->128, 7, B=1              1.54    0.94       1.01        1.43              22.3
192->64, 14, B=16             19.8    20.6       20.6        22.0              506
128->128, 7, B=16             6.8     6.8        7.3         7.6               159
64->64, 28, B=64              106     115        111         118               2697
256->128, 7, B=64             52.8    52.8       55.8        57.7              1251
============================  ======  =========  ==========  ================  ===============

Attention linears 128->128 (M = 49*B rows): fp32 0.065 / 0.79 / 3.39 ms at B = 1 / 16 / 64,
fbgemm quantized 0.14 / 1.11 / 3.85, ``torch._int_mm`` 1.1 / 16.8 / 70 (``_int_mm`` runs on
CPU but without an optimised kernel: 15-25x slower than fp32, out of the question). The
kernel alone (pre-quantized input, no dequantize) of fbgemm is also on par with fp32 MKL-DNN
(64->64@28, B=64: 120 vs 118 ms; 256->128@7, B=1: 0.89 vs 1.69 ms). So on an AVX2 CPU without
VNNI int8 convolutions are **not** faster than fp32 except on the deep, channel-heavy
layers at small batch (1.6x at 256->128@7, B=1): int8 gives 4x (W8) / 8x (W4, when packed)
smaller weights here, and the speed-up of the pipeline comes from caching. The whole
testbed U-Net (one full step, one thread, ms, fbgemm): fp32 35 / 285 / 1081 at B = 1 / 16 / 64,
W8A8 39 / 336 / 1298, W4A8 40 / 341 / 1291 -- int8 is 1.1-1.2x *slower* end to end (the
split skip layers run two convs, e.g. 64+16 -> 16 @28x28: 16.7 vs 9.9 ms at B=16, and every
layer pays quantize/dequantize). On a VNNI / AMX CPU the same fbgemm/onednn path is the
fast one; nothing here is specific to this machine except the saturation guard below.
Channels-last does not change the picture (64->64@28, B=16: fbgemm kernel alone on
channels-last input 27.1 ms, fp32 channels-last 23.8 ms). (torch 2.13 warns that its
quantized-tensor API is deprecated; the kernels still run.)

The int8 paths worth having are therefore torch's **onednn** ops with fp32 output
(``torch.ops.onednn.qconv2d_pointwise`` / ``qlinear_pointwise``, the ops Inductor lowers x86
int8 models to; the table's "onednn fp32-out" column quantized the input with four
separate torch ops, later replaced by one ``quantize_per_tensor``) and **fbgemm**
(``torch.ops.quantized.conv2d`` / ``linear``, whose output is requantized to uint8). Both
are implemented (``kernel=``). The default is ``"onednn"``: on the testbed it is 3-6 %
slower than fbgemm end to end (W8A8 43 / 353 / 1311 ms vs 41 / 335 / 1275 ms at
B = 1 / 16 / 64, same run, fp32 34 / 282 / 1091) but has no output rounding, which lowers
the U-Net's per-step error from 2.1 % to 1.6 % (W8A8). fbgemm weights are prepacked with the
fbgemm engine (the packed object carries its backend, so the global
``torch.backends.quantized.engine`` is only switched during prepacking).

Accuracy on the testbed (10 DDIM steps, calibration 8 trajectories, 4 fresh ones scored):
relative L2 error of the U-Net output against the float model per step, first nine steps
(last step, t ~ 0, where the predicted noise is small and enters x_0 with weight
sqrt(1 - alpha_bar) ~ 0.01, in brackets):

=================  =====================  =====================
setting            onednn (fp32 output)   fbgemm (uint8 output)
=================  =====================  =====================
W8A8 guard=weight  1.6-2.0 % (8.8 %)      2.1-2.8 % (12.9 %)
W8A8 guard=act     2.4-3.3 % (15.7 %)     2.8-3.9 % (18.2 %)
W4A8               3.5-6.4 % (20 %)       3.7-6.7 % (22.7 %)
=================  =====================  =====================

Of the 2.2 % (fbgemm W8A8), the weights alone (7-bit grid) account for 0.9 % and the
output requantization for about 40 % of the error variance.

Details of both kernels:

* **AVX2 int16 saturation.** Without VNNI, fbgemm (and onednn, measured alike) multiplies
  uint8 activations by int8 weights with ``vpmaddubsw``, whose pairwise sums saturate at
  int16. Measured: full-range uint8 x full-range int8 is wrong by up to 62 output LSBs
  (adversarial; onednn fp32 output: 50 % relative error) or 9 LSBs (random codes). Exact
  results need ``2 * a_max * |w|_max <= 32767``. Hence, for W8A8 the default
  ``guard="weight"`` keeps activations at full uint8 [0, 255] and restricts the W8 weight
  codes to [-64, 63] (the "8-bit" weight is a 7-bit grid on this kernel); ``guard="act"``
  keeps weights in [-128, 127] and activations in [0, 127] instead (PyTorch's own
  ``reduce_range``). W4 codes in [-8, 7] need no guard: W4A8 is exact at full uint8.
  W4 weights execute through the same int8 kernel (int8 storage of values in [-8, 7]; no
  4-bit packing or arithmetic gain on this path).
* **Output.** onednn returns fp32 (integer accumulation, then per-channel scale and fp32
  bias). fbgemm's ``quantized.conv2d`` / ``linear`` return uint8 with an output scale and
  zero point, calibrated per layer and per step from the float output range (times
  ``out_margin`` = 1.1 against unseen inputs), so its extra rounding is 1/255 of the step's
  output range; the module dequantizes right away. Everything between layers is fp32. The
  numerical reference (:meth:`QuantConv2d.forward_reference`, float64) models exactly
  this: input quantization, integer weights, and (fbgemm only) output requantization.

The current denoising step comes from the cache runtime when one is active (``sample_loop``
always runs one, so the step is its stream counter), else from the handle's own counter that
advances after every U-Net call and wraps after ``n_steps`` (:meth:`QuantizedUNet.reset`,
:meth:`QuantizedUNet.at_step`). Steps count U-Net evaluations, as the cache schedule does.
"""
from __future__ import annotations

import abc
import contextlib
import copy
import fnmatch
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, FormatError, SourceError
from ..formats.checkpoint import atomic_output_dir, write_json
from ..quant.clip import clip_search

log = logging.getLogger(__name__)

FORMAT = "bitpress-diffusion-ptq"
FORMAT_VERSION = 1
TENSORS_FILE = "unet.safetensors"
META_FILE = "quant.json"
#: modules kept in float: the time-embedding MLP and per-resnet time projections (one vector per image)
FLOAT_PREFIXES = ("time_embedding", "class_embedding", "add_embedding", "encoder_hid_proj", "add_time_proj")
FLOAT_LEAVES = ("time_emb_proj",)
EIGHT_BIT_LAYERS = ("conv_in", "conv_out")
#: Convs left in float by default (``quantize_unet(exclude=...)``; see the module docstring):
#: the U-Net's input and output convolutions, ~0.1 % of its MACs and the largest share of
#: the W8A8 error on the testbed.
DEFAULT_FLOAT_LAYERS: tuple[str, ...] = ("conv_in", "conv_out")
EXCLUDED = "excluded by the caller"  # the float_layers reason of a layer named in exclude=
GUARDS = ("weight", "act")
_UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
_SUBSAMPLE = 1 << 15
_MODES = ("int8", "reference", "float")


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


# ------------------------------------------------------------------------------------------
# quantizers
# ------------------------------------------------------------------------------------------

def quantize_weight(w: torch.Tensor, qmin: int, qmax: int, grid: int = 50,
                    min_ratio: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric codes ``int8`` (``w``'s shape) and scales ``[out]`` (fp32).

    The scale of channel ``c`` is ``r * max|w_c| / qmax`` with the clipping ratio ``r`` in
    ``[min_ratio, 1]`` (``grid`` values) that minimises the squared reconstruction error of
    that channel. ``w`` is not modified.
    """
    if not (-128 <= qmin < 0 < qmax <= 127):
        raise ConfigError(f"weight code range [{qmin}, {qmax}] must lie in int8 and contain 0")
    W = w.detach().reshape(w.shape[0], -1).double()
    amax = W.abs().amax(1).clamp_min(1e-12)
    zero = torch.zeros_like(amax)
    ratios = torch.linspace(min_ratio, 1.0, grid, dtype=torch.float64).tolist()
    best = clip_search(W, qmin, qmax, ratios, lambda r: (r * amax / qmax, zero))
    assert best is not None
    best_s = best[0].float().double()  # the scale the kernel will see (fp32)
    codes = torch.clamp(torch.round(W / best_s[:, None]), qmin, qmax).to(torch.int8)
    return codes.reshape(w.shape), best_s.float()


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


# ------------------------------------------------------------------------------------------
# the int8 layer
# ------------------------------------------------------------------------------------------

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



def read_format_json(file: Path, fmt: str, version: int) -> dict[str, Any]:
    """The JSON metadata of a saved directory, checked for its ``format`` / ``format_version``
    (no pickle anywhere)."""
    try:
        meta = json.loads(Path(file).read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt or meta.get("format_version") != version:
        got = (meta.get("format"), meta.get("format_version")) if isinstance(meta, dict) else None
        raise FormatError(f"{file}: expected format {fmt} v{version}, got {got}")
    return meta

class _QuantLayer(nn.Module, abc.ABC):
    """Shared machinery of :class:`QuantConv2d` and :class:`QuantLinear`.

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


class QuantConv2d(_QuantLayer):
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


class QuantLinear(_QuantLayer):
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


def _build_layer(meta: dict[str, Any], n_steps: int, step_fn: Callable[[], int] | None) -> _QuantLayer:
    parts = [tuple(p) for p in meta["parts"]]
    common = dict(n_steps=n_steps, parts=parts, w_qmin=int(meta["w_qmin"]), w_qmax=int(meta["w_qmax"]),
                  a_qmax=int(meta["a_qmax"]), has_bias=bool(meta["has_bias"]), step_fn=step_fn,
                  kernel=str(meta.get("kernel", "fbgemm")))
    if meta["kind"] == "conv2d":
        ws = meta["weight_shape"]
        return QuantConv2d(int(meta["in"]), int(meta["out"]), ws[2:], meta["stride"], meta["padding"],
                           meta["dilation"], int(meta["groups"]), **common)
    if meta["kind"] == "linear":
        return QuantLinear(int(meta["in"]), int(meta["out"]), **common)
    raise FormatError(f"unknown quantized layer kind {meta['kind']!r}")


# ------------------------------------------------------------------------------------------
# the U-Net handle
# ------------------------------------------------------------------------------------------

def _check_unet(unet: nn.Module) -> None:
    if type(unet).__name__ not in _UNET_CLASSES or not hasattr(unet, "up_blocks"):
        raise ConfigError(f"quantize_unet supports diffusers {' / '.join(_UNET_CLASSES)}, got {type(unet).__name__}")


def _set_module(root: nn.Module, name: str, mod: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, mod)


class QuantizedUNet:
    """Handle of a U-Net whose convs and linears were replaced by int8 layers (:func:`quantize_unet`).

    ``unet`` is the (copied, unless ``inplace``) diffusers model, used like any U-Net;
    ``layers`` maps module names to :class:`QuantConv2d` / :class:`QuantLinear`;
    ``float_layers`` maps the convs/linears left in float to the reason. The step index of a
    call comes from :meth:`current_step`.
    """

    def __init__(self, unet: nn.Module, n_steps: int, wbits: int, abits: int, guard: str,
                 layers: dict[str, _QuantLayer], float_layers: dict[str, str]):
        self.unet = unet
        self.n_steps = n_steps
        self.wbits, self.abits, self.guard = wbits, abits, guard
        self.layers = layers
        self.float_layers = float_layers
        self._own = 0
        self._fixed: int | None = None
        for lay in layers.values():
            lay.step_fn = self.current_step
        self.correction: QuantCorrection | None = None
        self._hook = unet.register_forward_hook(self._after_call)
        unet._bitpress_quant = self

    # -- steps ------------------------------------------------------------------------------
    def _after_call(self, *_: Any) -> None:
        self._own = (self._own + 1) % self.n_steps

    def current_step(self) -> int:
        """The step of the U-Net call in progress: :meth:`at_step` if set, else the active cache
        stream's step (:mod:`bitpress.cache.runtime`), else the handle's own call counter."""
        if self._fixed is not None:
            return self._fixed
        from .runtime import get_cache

        cache = get_cache(self.unet)
        cur = getattr(cache, "_cur", None) if cache is not None else None
        if cur is not None:
            return cur.step
        return self._own

    def reset(self) -> None:
        """Restart the own step counter (a new trajectory without a cache runtime)."""
        self._own = 0

    @contextlib.contextmanager
    def at_step(self, step: int) -> Iterator[None]:
        """Run the U-Net calls inside the block with the activation grids of ``step``."""
        if not 0 <= step < self.n_steps:
            raise ConfigError(f"step must be in 0..{self.n_steps - 1}, got {step}")
        prev, self._fixed = self._fixed, int(step)
        try:
            yield
        finally:
            self._fixed = prev

    def set_mode(self, mode: str) -> None:
        """``"int8"`` (the int8 kernels), ``"reference"`` (float64 emulation of the same math) or
        ``"float"`` (the original weights; needs ``keep_float=True``)."""
        if mode not in _MODES:
            raise ConfigError(f"mode must be one of {_MODES}, got {mode!r}")
        if mode == "float" and any(lay._float_weight is None for lay in self.layers.values()):
            raise ConfigError("float weights were not kept: quantize with keep_float=True")
        for lay in self.layers.values():
            lay.mode = mode

    @contextlib.contextmanager
    def mode(self, mode: str) -> Iterator[None]:
        prev = {k: lay.mode for k, lay in self.layers.items()}
        self.set_mode(mode)
        try:
            yield
        finally:
            for k, lay in self.layers.items():
                lay.mode = prev[k]

    def remove_correction(self) -> None:
        """Stop applying the quantization-error DEC correction (if any)."""
        for lay in self.layers.values():
            lay.out_correction = None
        self.correction = None

    def detach(self) -> None:
        """Remove the own-counter hook and the handle's mark from the U-Net (the layers still ask
        this handle for the step, so use :meth:`at_step` or a cache runtime afterwards)."""
        self._hook.remove()
        self.unet._bitpress_quant = None

    # -- sizes ------------------------------------------------------------------------------
    def weight_bytes(self) -> dict[str, int]:
        """Bytes of the quantized weights as stored (int8 codes) and at ``wbits`` packing, vs fp32."""
        n = sum(lay.codes.numel() for lay in self.layers.values())
        packed = sum(lay.codes.numel() * (8 if lay.w_qmax > 7 else 4) // 8 for lay in self.layers.values())
        return {"fp32": 4 * n, "int8_storage": n, "packed": packed}

    # -- save / load ------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "unet_class": type(self.unet).__name__,
                "unet_config": json.loads(self.unet.to_json_string()), "n_steps": self.n_steps,
                "wbits": self.wbits, "abits": self.abits, "guard": self.guard,
                "layers": {k: lay.layer_meta() for k, lay in self.layers.items()},
                "float_layers": self.float_layers,
                "dec_quant": None if self.correction is None else sorted(self.correction.layers)}

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write ``unet.safetensors`` (every tensor of the U-Net: int8 codes, scales, per-step grids,
        float norms/embeddings) and ``quant.json`` into ``path``, atomically."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().clone() for k, v in self.unet.state_dict().items()}
        if self.correction is not None:
            tensors.update(self.correction.tensors())
        with atomic_output_dir(path, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
            write_json(tmp / META_FILE, self.meta())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "QuantizedUNet":
        """Rebuild the quantized U-Net saved by :meth:`save` (no pickle: safetensors + JSON)."""
        import diffusers
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / META_FILE).is_file() or not (path / TENSORS_FILE).is_file():
            raise SourceError(f"{path} is not a quantized U-Net directory (needs {META_FILE} and {TENSORS_FILE})")
        meta = read_format_json(path / META_FILE, FORMAT, FORMAT_VERSION)
        if meta.get("unet_class") not in _UNET_CLASSES:
            raise FormatError(f"unsupported U-Net class {meta.get('unet_class')!r}")
        try:
            unet = getattr(diffusers, meta["unet_class"]).from_config(meta["unet_config"]).eval()
            n_steps = int(meta["n_steps"])
            layers: dict[str, _QuantLayer] = {}
            for name, lm in meta["layers"].items():
                lay = _build_layer(lm, n_steps, None)
                _set_module(unet, name, lay)
                layers[name] = lay
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"bad quantized U-Net metadata in {path}: {e}") from None
        tensors = load_file(str(path / TENSORS_FILE))
        dec = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(QuantCorrection.PREFIX)]}
        try:
            unet.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise FormatError(f"{path / TENSORS_FILE} does not match {META_FILE}: {e}") from None
        handle = cls(unet, n_steps, int(meta["wbits"]), int(meta["abits"]), meta["guard"], layers,
                     dict(meta.get("float_layers", {})))
        if meta.get("dec_quant"):
            QuantCorrection.from_tensors(dec, meta["dec_quant"]).install(handle)
        return handle


class QuantCorrection:
    """DEC's quantization-error half: per-step, per-output-channel ``scale``/``bias`` (``[T, C]``
    each) on the output of the int8 layers that consume the cached deep feature, mapping the
    quantized model's output of the layer onto the full-precision model's."""

    PREFIX = "dec.quant."

    def __init__(self, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        for name, (a, b) in layers.items():
            if a.ndim != 2 or a.shape != b.shape:
                raise FormatError(f"DEC correction of {name!r} must be two [T, C] tensors, got "
                                  f"{tuple(a.shape)} and {tuple(b.shape)}")
        self.layers = {k: (a.float().contiguous(), b.float().contiguous()) for k, (a, b) in layers.items()}

    def install(self, qunet: QuantizedUNet) -> QuantizedUNet:
        for name, (a, b) in self.layers.items():
            lay = qunet.layers.get(name)
            if lay is None:
                raise ConfigError(f"DEC correction for {name!r}, which is not an int8 layer of this U-Net")
            if a.shape != (qunet.n_steps, lay.out_ch):
                raise ConfigError(f"DEC correction of {name!r} is {tuple(a.shape)}, the layer needs "
                                  f"({qunet.n_steps}, {lay.out_ch})")
        qunet.remove_correction()
        for name, (a, b) in self.layers.items():
            qunet.layers[name].out_correction = (a, b)
        qunet.correction = self
        return qunet

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (a, b) in self.layers.items():
            out[f"{self.PREFIX}{name}.scale"] = a
            out[f"{self.PREFIX}{name}.bias"] = b
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], names: Sequence[str]) -> "QuantCorrection":
        try:
            return cls({n: (tensors[f"{cls.PREFIX}{n}.scale"], tensors[f"{cls.PREFIX}{n}.bias"]) for n in names})
        except KeyError as e:
            raise FormatError(f"missing DEC tensor {e.args[0]!r}") from None


def consumer_layers(unet: nn.Module, depth: int = 1) -> list[str]:
    """Names of the layers that consume the cached deep feature at branch ``depth``: ``conv1``
    (after GroupNorm + SiLU) and ``conv_shortcut`` (if any) of the first resnet of up block
    ``n_up - depth`` -- both read ``cat([cached feature, skip])``."""
    n_up = len(unet.up_blocks)
    if not 1 <= depth < n_up:
        raise ConfigError(f"depth must be in 1..{n_up - 1}, got {depth}")
    block = unet.up_blocks[n_up - depth]
    if not getattr(block, "resnets", None):
        raise ConfigError(f"up block {n_up - depth} has no resnets to correct")
    prefix = f"up_blocks.{n_up - depth}.resnets.0."
    r = block.resnets[0]
    return [prefix + n for n in ("conv1", "conv_shortcut") if getattr(r, n, None) is not None]


@torch.no_grad()
def fit_quant_correction(qunet: QuantizedUNet, fp_unet: nn.Module, calib: Sequence[dict[str, Any]],
                         schedule: Sequence[bool] | None = None, depth: int = 1,
                         layers: Sequence[str] | None = None, ridge: float = 1e-8,
                         install: bool = True) -> QuantCorrection:
    """Fit DEC's quantization-error correction (CacheQuant) in closed form.

    Both U-Nets run the calibration inputs ``calib`` step by step with the same cache
    ``schedule`` (``None``: every step refreshes), so at cached steps each reuses its own
    cached feature; for every step and output channel of the ``layers`` (default:
    :func:`consumer_layers` at ``depth``) the least-squares affine map from the quantized
    layer output to the full-precision one is fitted (:func:`~bitpress.cache.dec.fit_channel_affine`).
    ``fp_unet`` is the original float model (not modified). With ``install`` the correction is
    applied at run time from then on (and saved with the model).
    """
    from .dec import fit_channel_affine
    from .runtime import as_schedule, enable_cache

    _check_calib(calib)
    T = qunet.n_steps
    if len(calib) != T:
        raise ConfigError(f"calibration has {len(calib)} steps, the quantized U-Net serves {T}")
    mask = None if schedule is None else as_schedule(schedule, T)
    names = list(layers) if layers is not None else [n for n in consumer_layers(qunet.unet, depth)
                                                     if n in qunet.layers]
    if not names:
        raise ConfigError("no int8 layer to correct")
    for n in names:
        if n not in qunet.layers:
            raise ConfigError(f"{n!r} is not an int8 layer of the quantized U-Net")
    fp_mods = {n: fp_unet.get_submodule(n) for n in names}
    got: dict[str, dict[str, torch.Tensor]] = {"q": {}, "fp": {}}

    def grab(kind: str, name: str) -> Callable[..., None]:
        def h(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
            got[kind][name] = out.detach().clone()
        return h

    handles = [qunet.layers[n].register_forward_hook(grab("q", n)) for n in names]
    handles += [fp_mods[n].register_forward_hook(grab("fp", n)) for n in names]
    saved = qunet.correction
    qunet.remove_correction()
    scale = {n: torch.ones(T, qunet.layers[n].out_ch) for n in names}
    bias = {n: torch.zeros(T, qunet.layers[n].out_ch) for n in names}
    c_fp = enable_cache(fp_unet, mask, depth)
    try:
        c_q = enable_cache(qunet.unet, mask, depth)
        try:
            for t in range(T):
                got["q"].clear()
                got["fp"].clear()
                _call_unet(fp_unet, calib[t])
                _call_unet(qunet.unet, calib[t])
                for n in names:
                    if n not in got["q"] or n not in got["fp"]:
                        raise ConfigError(f"layer {n!r} did not run at step {t}; is depth {depth} the cache's?")
                    dim = 1 if qunet.layers[n].kind == "conv2d" else -1  # linears: [..., C]
                    scale[n][t], bias[n][t] = fit_channel_affine(got["q"][n], got["fp"][n], dim, ridge)
        finally:
            c_q.disable()
    finally:
        c_fp.disable()
        for h in handles:
            h.remove()
        if saved is not None:
            saved.install(qunet)
    corr = QuantCorrection({n: (scale[n], bias[n]) for n in names})
    if install:
        corr.install(qunet)
    return corr


def get_quant(unet: nn.Module) -> QuantizedUNet | None:
    """The :class:`QuantizedUNet` handle of a quantized U-Net, if any."""
    return getattr(unet, "_bitpress_quant", None)


# ------------------------------------------------------------------------------------------
# calibration data and the driver
# ------------------------------------------------------------------------------------------

@torch.no_grad()
def collect_calibration(unet: nn.Module, scheduler: Any, noise: torch.Tensor, num_inference_steps: int, *,
                        guidance_scale: float | None = None, unet_kwargs: dict[str, Any] | None = None,
                        eta: float = 0.0, generator: torch.Generator | None = None,
                        progress: bool = False) -> list[dict[str, Any]]:
    """The U-Net inputs of every evaluation of a full-precision trajectory from ``noise``.

    Returns one dict per U-Net evaluation: ``{"sample": x_t, "timestep": t, **unet kwargs}``
    (tensors cloned to the CPU), the input :func:`quantize_unet` expects.
    """
    from .runtime import sample_loop

    steps: list[dict[str, Any]] = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        d = dict(kwargs)
        names = ("sample", "timestep")
        for n, a in zip(names, args):
            d[n] = a
        if len(args) > 2:
            raise ConfigError("collect_calibration records sample, timestep and keyword arguments only")
        steps.append({k: (v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v)
                      for k, v in d.items() if k != "return_dict"})

    h = unet.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        sample_loop(unet, scheduler, noise, num_inference_steps, guidance_scale=guidance_scale,
                    unet_kwargs=unet_kwargs, eta=eta, generator=generator, progress=progress)
    finally:
        h.remove()
    return steps


def _skip_splits(unet: nn.Module, probe: dict[str, Any]) -> dict[str, list[tuple[int, int]]]:
    """Channel parts of the layers that consume a skip concatenation, found by running ``probe``."""
    found: dict[str, list[tuple[int, int]]] = {}
    names = {id(m): n for n, m in unet.named_modules()}
    handles = []

    def make(block: nn.Module) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            if not isinstance(res, (tuple, list)):
                return
            for i, resnet in enumerate(block.resnets):
                if i >= len(res):
                    break
                skip = res[-(i + 1)].shape[1]
                for conv_name in ("conv1", "conv_shortcut"):
                    conv = getattr(resnet, conv_name, None)
                    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
                        continue
                    split = conv.in_channels - skip
                    if 0 < split < conv.in_channels:
                        found[names[id(conv)]] = [(0, split), (split, conv.in_channels)]
        return pre

    for block in unet.up_blocks:
        if hasattr(block, "resnets"):
            handles.append(block.register_forward_pre_hook(make(block), with_kwargs=True))
    try:
        _call_unet(unet, probe)
    finally:
        for h in handles:
            h.remove()
    return found


def _call_unet(unet: nn.Module, inp: dict[str, Any]) -> Any:
    kw = {k: v for k, v in inp.items() if k not in ("sample", "timestep")}
    return unet(inp["sample"], inp["timestep"], **kw)


def _check_calib(calib: Sequence[dict[str, Any] | None]) -> None:
    if not isinstance(calib, (list, tuple)) or not calib:
        raise ConfigError("calibration must be a non-empty list with one U-Net input dict per step "
                          "(see collect_calibration)")
    for i, c in enumerate(calib):
        if c is None:
            raise ConfigError(f"calibration is missing step {i}")
        if not isinstance(c, dict) or "sample" not in c or "timestep" not in c:
            raise ConfigError(f"calibration step {i} must be a dict with 'sample' and 'timestep' "
                              f"(and U-Net keyword arguments)")


@torch.no_grad()
def quantize_unet(unet: nn.Module, calib: Sequence[dict[str, Any]], wbits: int = 8, abits: int = 8, *,
                  guard: str = "weight", kernel: str = "onednn", inplace: bool = False, keep_float: bool = True,
                  out_margin: float = 1.1, weight_grid: int = 50,
                  exclude: Sequence[str] = DEFAULT_FLOAT_LAYERS,
                  progress: bool = False) -> QuantizedUNet:
    """Post-training quantization of a diffusers U-Net to W8A8 / W4A8 with per-step activation grids.

    ``calib[t]`` is the U-Net input of evaluation ``t`` of full-precision calibration
    trajectories (:func:`collect_calibration`); the number of entries fixes the number of
    steps ``T`` the quantized model serves. By default the U-Net is deep-copied and the
    caller's model is left untouched; ``inplace=True`` replaces its modules instead (if
    quantization then fails half-way, e.g. on bad calibration data, that model is left with
    some layers replaced: use the default copy unless memory forbids it).
    ``kernel`` picks the int8 op: ``"onednn"`` (default; fp32 output, no output rounding) or
    ``"fbgemm"`` (uint8 output requantized with per-step output grids widened by ``out_margin``).
    ``keep_float`` keeps the float weights inside the int8 layers (for ``set_mode("float")``
    and the quantization-error DEC); they are never saved. ``exclude``: names (or ``fnmatch``
    patterns) of convs/linears to leave in float, each matching at least one (default
    :data:`DEFAULT_FLOAT_LAYERS`, ``conv_in`` and ``conv_out``; ``()`` quantizes them too).
    """
    _check_unet(unet)
    if abits != 8:
        raise ConfigError(f"activation bits must be 8 (the int8 kernels take uint8 inputs), got {abits}")
    w_qmin, w_qmax, a_qmax = quant_ranges(wbits, guard)
    w8_qmin, w8_qmax, w8_aqmax = quant_ranges(8, guard)
    if wbits == 4:  # first/last layers at 8 bits; W4A8 keeps full uint8 activations, so the
        w8_qmin, w8_qmax, w8_aqmax = -64, 63, 255  # 8-bit layers use the weight guard there
    if kernel not in KERNELS:
        raise ConfigError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if not out_margin >= 1.0:
        raise ConfigError(f"out_margin must be >= 1, got {out_margin}")
    _check_calib(calib)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    quantizable = [n for n, m in unet.named_modules() if n and isinstance(m, (nn.Conv2d, nn.Linear))]
    for pat in exclude:
        if not any(fnmatch.fnmatchcase(n, pat) for n in quantizable):
            raise ConfigError(f"exclude pattern {pat!r} matches no conv/linear of this U-Net "
                              f"(e.g. {', '.join(quantizable[:3])}, ...)")
    from .runtime import get_cache

    if get_cache(unet) is not None or get_quant(unet) is not None:
        raise ConfigError("disable the cache / use a fresh U-Net before quantizing it")
    if any(p.dtype != torch.float32 for p in unet.parameters()):
        raise ConfigError("quantize_unet expects a float32 U-Net")
    target = unet if inplace else copy.deepcopy(unet)
    target.eval()
    T = len(calib)
    splits = _skip_splits(target, calib[0])

    layers: dict[str, _QuantLayer] = {}
    float_layers: dict[str, str] = {}
    originals: dict[str, nn.Module] = {}
    state = {"step": 0}
    step_fn = lambda: state["step"]  # noqa: E731  (calibration steps explicitly)
    for name, mod in list(target.named_modules()):
        if not isinstance(mod, (nn.Conv2d, nn.Linear)) or not name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            float_layers[name] = EXCLUDED
            continue
        if name.startswith(FLOAT_PREFIXES) or leaf in FLOAT_LEAVES:
            float_layers[name] = "time embedding (one vector per image)"
            continue
        eight = name in EIGHT_BIT_LAYERS
        qmin, qmax, aq = (w8_qmin, w8_qmax, w8_aqmax) if eight else (w_qmin, w_qmax, a_qmax)
        if isinstance(mod, nn.Conv2d):
            if mod.padding_mode != "zeros" or isinstance(mod.padding, str) or type(mod) is not nn.Conv2d:
                float_layers[name] = "unsupported conv (padding mode or subclass)"
                continue
            parts = splits.get(name, [(0, mod.in_channels)])
            lay: _QuantLayer = QuantConv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride,
                                           mod.padding, mod.dilation, mod.groups, T, parts, qmin, qmax, aq,
                                           mod.bias is not None, step_fn, kernel)
        else:
            if type(mod) is not nn.Linear:
                float_layers[name] = f"unsupported linear subclass {type(mod).__name__}"
                continue
            lay = QuantLinear(mod.in_features, mod.out_features, T, [(0, mod.in_features)], qmin, qmax, aq,
                              mod.bias is not None, step_fn, kernel)
        codes, scale = quantize_weight(mod.weight, qmin, qmax, grid=weight_grid)
        lay.codes.copy_(codes)
        lay.w_scale.copy_(scale)
        if mod.bias is not None:
            lay.bias.copy_(mod.bias.detach())
        lay._float_weight = mod.weight.detach().clone()
        lay._float_bias = None if mod.bias is None else mod.bias.detach().clone()
        lay._calib = {}
        _set_module(target, name, lay)
        layers[name] = lay
        originals[name] = mod

    from tqdm.auto import tqdm

    for t in tqdm(range(T), disable=not progress, desc="calibrate"):
        state["step"] = t
        _call_unet(target, calib[t])
    for name in [n for n, lay in layers.items() if not lay._calib]:  # never executed: leave it float
        _set_module(target, name, originals[name])
        del layers[name]
        float_layers[name] = "not executed during calibration"
    for name, lay in layers.items():
        lay._finish_calibration(name, out_margin)
    if not keep_float:
        for lay in layers.values():
            lay._float_weight = lay._float_bias = None
    log.info("quantized %d layers to W%dA%d over %d steps (%d split at skip concatenations); float: %s",
             len(layers), wbits, abits, T, sum(len(lay.parts) > 1 for lay in layers.values()),
             ", ".join(f"{k} ({v})" for k, v in float_layers.items()))
    return QuantizedUNet(target, T, wbits, abits, guard, layers, float_layers)


__all__ = ["quantize_unet", "DEFAULT_FLOAT_LAYERS", "collect_calibration", "QuantizedUNet", "QuantCorrection", "fit_quant_correction",
           "consumer_layers", "QuantConv2d", "QuantLinear",
           "quantize_weight", "search_act_range", "quant_ranges", "get_quant", "fbgemm_available",
           "onednn_available", "kernel_available", "KERNELS"]
