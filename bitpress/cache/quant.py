"""Post-training quantization (W8A8 / W4A8) of diffusers U-Nets: CacheQuant's PTQ half for
``UNet2DModel`` and ``UNet2DConditionModel``.

:func:`quantize_unet` replaces the convs and attention/transformer linears by the int8 layers
of :mod:`bitpress.nn.int8` (:class:`~bitpress.nn.int8.Int8Conv2d`,
:class:`~bitpress.nn.int8.Int8Linear`): per-output-channel symmetric weight codes with a
per-channel scale from an MSE search over clipping ratios (:func:`quantize_weight`),
per-tensor uint8 activation grids calibrated separately for every denoising step on
full-precision trajectories, split quantizers where up-block resnets consume
``torch.cat([h, skip])``. The time-embedding MLP, every ``time_emb_proj`` and, by default
(:data:`DEFAULT_FLOAT_LAYERS`), ``conv_in`` / ``conv_out`` stay float. :class:`QuantizedUNet`
is the handle (steps, modes, save/load in the format of :mod:`bitpress.formats.diffusion`);
:func:`fit_quant_correction` is DEC's quantization-error half. Why these choices, and what
they measure on the testbed: docs/diffusion.md ("int8 U-Net layers").

The current denoising step comes from the cache runtime when one is active (``sample_loop``
always runs one, so the step is its stream counter), else from the handle's own counter that
advances after every U-Net call and wraps after ``n_steps`` (:meth:`QuantizedUNet.reset`,
:meth:`QuantizedUNet.at_step`). Steps count U-Net evaluations, as the cache schedule does.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import ConfigError, FormatError
from ..formats.diffusion import FORMAT, FORMAT_VERSION, load_quantized_unet, save_quantized_unet
from ..nn.int8 import (KERNELS, Int8Conv2d, Int8Linear, _Int8Layer, build_int8_layer,
                       fbgemm_available, kernel_available, onednn_available, quant_ranges,
                       search_act_range)
from ..quant.clip import clip_search

log = logging.getLogger(__name__)

#: modules kept in float: the time-embedding MLP and per-resnet time projections (one vector per image)
FLOAT_PREFIXES = ("time_embedding", "class_embedding", "add_embedding", "encoder_hid_proj", "add_time_proj")
FLOAT_LEAVES = ("time_emb_proj",)
EIGHT_BIT_LAYERS = ("conv_in", "conv_out")
#: Convs left in float by default (``quantize_unet(exclude=...)``; see the module docstring):
#: the U-Net's input and output convolutions, ~0.1 % of its MACs and the largest share of
#: the W8A8 error on the testbed.
DEFAULT_FLOAT_LAYERS: tuple[str, ...] = ("conv_in", "conv_out")
EXCLUDED = "excluded by the caller"  # the float_layers reason of a layer named in exclude=
_UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
_MODES = ("int8", "reference", "float")



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
    ``layers`` maps module names to :class:`Int8Conv2d` / :class:`Int8Linear`;
    ``float_layers`` maps the convs/linears left in float to the reason. The step index of a
    call comes from :meth:`current_step`.
    """

    def __init__(self, unet: nn.Module, n_steps: int, wbits: int, abits: int, guard: str,
                 layers: dict[str, _Int8Layer], float_layers: dict[str, str]):
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
        float norms/embeddings) and ``quant.json`` into ``path``, atomically
        (:mod:`bitpress.formats.diffusion`)."""
        tensors = dict(self.unet.state_dict())
        if self.correction is not None:
            tensors.update(self.correction.tensors())
        return save_quantized_unet(path, tensors, self.meta(), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "QuantizedUNet":
        """Rebuild the quantized U-Net saved by :meth:`save` (no pickle: safetensors + JSON)."""
        import diffusers

        path = Path(path)
        meta, tensors = load_quantized_unet(path)
        if meta.get("unet_class") not in _UNET_CLASSES:
            raise FormatError(f"unsupported U-Net class {meta.get('unet_class')!r}")
        try:
            unet = getattr(diffusers, meta["unet_class"]).from_config(meta["unet_config"]).eval()
            n_steps = int(meta["n_steps"])
            layers: dict[str, _Int8Layer] = {}
            for name, lm in meta["layers"].items():
                lay = build_int8_layer(lm, n_steps, None)
                _set_module(unet, name, lay)
                layers[name] = lay
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"bad quantized U-Net metadata in {path}: {e}") from None
        dec = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(QuantCorrection.PREFIX)]}
        try:
            unet.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise FormatError(f"{path}: the tensors do not match the layer metadata: {e}") from None
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

    layers: dict[str, _Int8Layer] = {}
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
            lay: _Int8Layer = Int8Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride,
                                           mod.padding, mod.dilation, mod.groups, T, parts, qmin, qmax, aq,
                                           mod.bias is not None, step_fn, kernel)
        else:
            if type(mod) is not nn.Linear:
                float_layers[name] = f"unsupported linear subclass {type(mod).__name__}"
                continue
            lay = Int8Linear(mod.in_features, mod.out_features, T, [(0, mod.in_features)], qmin, qmax, aq,
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
           "consumer_layers", "Int8Conv2d", "Int8Linear",
           "quantize_weight", "search_act_range", "quant_ranges", "get_quant", "fbgemm_available",
           "onednn_available", "kernel_available", "KERNELS"]
