"""DeepCache-style cached U-Net runtime for diffusers ``UNet2DModel`` / ``UNet2DConditionModel``.

A U-Net's deep features change slowly between adjacent denoising steps (DeepCache, CVPR
2024), so at most steps it is enough to recompute only the *shallow branch* -- ``conv_in``,
the first ``depth`` down blocks, the last ``depth`` up blocks and the output head -- and
reuse the *deep feature* (the output of the up path just before the last ``depth`` up
blocks) from the most recent *refresh* step, at which the full U-Net runs.

How it is implemented, and why: the U-Net's own ``forward`` always runs unchanged (so
every config diffusers supports -- class labels, cross-attention, ControlNet/T2I residuals,
skip-sample blocks -- keeps working), and only the ``forward`` of the *deep* submodules
(down blocks ``depth..``, the mid block, up blocks ``..-depth-1``) is replaced by an
instance attribute (the module tree and ``state_dict`` keys do not change). At a refresh
step those forwards call diffusers' own blocks and remember their outputs; at a cached
step they return the remembered outputs without computing anything -- the deep down/mid
outputs are only placeholders that feed nothing but skipped blocks, and the output of the
branch-point up block is the cached deep feature that the last up blocks consume together
with the fresh skip activations of the shallow down blocks. With every step a refresh
step the output equals the plain U-Net bit for bit.

Steps are counted per *stream*: each U-Net call advances the step of its stream, keyed by
the batch size (a classifier-free-guidance batch ``[uncond; cond]`` is one stream with its
own cache, covering both halves) and an optional user tag (:meth:`UNetCache.stream`) for
pipelines that evaluate conditional and unconditional halves in separate calls. A
schedule is a boolean list over U-Net *evaluations* (``True`` = refresh; evaluation 0
must refresh); for DDIM/DDPM that is one per inference step, for PNDM one per entry of
``scheduler.timesteps`` (PLMS evaluates one more time than it has steps). After the last
evaluation the stream wraps around to step 0, so a pipeline can be called repeatedly.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import ConfigError

FeatureHook = Callable[[int, torch.Tensor], None]
FeatureTransform = Callable[[int, int, torch.Tensor], torch.Tensor]


def _first(x: Any) -> torch.Tensor:
    """The hidden state of a block output (skip-sample blocks return a tuple)."""
    return x[0] if isinstance(x, (tuple, list)) else x


def _check_unet(unet: nn.Module) -> None:
    for name in ("down_blocks", "up_blocks", "conv_in", "conv_out"):
        if not hasattr(unet, name):
            raise ConfigError(f"{type(unet).__name__} is not a diffusers UNet2DModel/UNet2DConditionModel "
                              f"(it has no {name!r})")


def max_depth(unet: nn.Module) -> int:
    """The largest valid branch depth: one less than the number of up blocks."""
    _check_unet(unet)
    return len(unet.up_blocks) - 1


def _validate_depth(unet: nn.Module, depth: int) -> None:
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    if not 1 <= depth <= min(n_down, n_up) - 1:
        raise ConfigError(f"cache depth must be in 1..{min(n_down, n_up) - 1} for a U-Net with "
                          f"{n_down} down / {n_up} up blocks, got {depth}")
    # the shallow down blocks must produce every skip the shallow up blocks consume
    produced = 1 + sum(len(b.resnets) + (1 if getattr(b, "downsamplers", None) else 0)
                       for b in unet.down_blocks[:depth])
    consumed = sum(len(b.resnets) for b in unet.up_blocks[-depth:])
    if consumed > produced:
        raise ConfigError(f"at depth {depth} the last up blocks consume {consumed} skip activations but the "
                          f"first down blocks produce only {produced}; choose another depth")


@dataclass
class _Stream:
    """Per-stream cache state: step counter and the outputs remembered at the last refresh."""

    step: int = 0
    last_refresh: int = -1
    outputs: dict[str, Any] = field(default_factory=dict)


def as_schedule(schedule: Sequence[bool] | Sequence[int] | torch.Tensor, n_steps: int | None = None) -> list[bool]:
    """Normalise a schedule to a boolean refresh mask.

    Accepts a boolean mask, or a sorted list of refresh step indices together with
    ``n_steps``. Step 0 must refresh (there is nothing cached before it).
    """
    if isinstance(schedule, torch.Tensor):
        schedule = schedule.tolist()
    sched = list(schedule)
    if sched and all(isinstance(s, bool) for s in sched):
        mask = [bool(s) for s in sched]
        if n_steps is not None and len(mask) != n_steps:
            raise ConfigError(f"schedule mask has {len(mask)} entries, expected {n_steps}")
    else:
        if n_steps is None:
            raise ConfigError("a schedule given as refresh indices needs n_steps")
        idx = [int(s) for s in sched]
        if any(i < 0 or i >= n_steps for i in idx):
            raise ConfigError(f"refresh indices must lie in 0..{n_steps - 1}, got {idx}")
        mask = [False] * n_steps
        for i in idx:
            mask[i] = True
    if not mask or not mask[0]:
        raise ConfigError("a cache schedule must refresh at step 0 (nothing is cached before it)")
    return mask


class UNetCache:
    """A DeepCache-style cache installed on a diffusers U-Net (see the module docstring).

    Create it with :func:`enable_cache`; the U-Net object itself is patched in place and keeps
    working anywhere (pipelines, custom loops). ``schedule=None`` refreshes at every step
    (then outputs equal the plain U-Net's).

    Attributes a caller may set: ``feature_hook(step, feature)`` is called with the deep
    feature at every refresh step (used to collect calibration trajectories);
    ``feature_transform(step, last_refresh, feature) -> feature`` is applied to the cached
    feature at every cached step (DEC's per-step correction).
    """

    def __init__(self, unet: nn.Module, schedule: Sequence[bool] | None = None, depth: int = 1):
        _check_unet(unet)
        _validate_depth(unet, depth)
        if getattr(unet, "_bitpress_cache", None) is not None:
            raise ConfigError("this U-Net already has a cache enabled; call .disable() on it first")
        self.unet = unet
        self.depth = depth
        self.schedule: list[bool] | None = None if schedule is None else as_schedule(schedule)
        self.feature_hook: FeatureHook | None = None
        self.feature_transform: FeatureTransform | None = None
        self.n_full = 0
        self.n_cached = 0
        self._streams: dict[Any, _Stream] = {}
        self._tag: Any = None
        self._mode: str | None = None  # "refresh" | "cached" | None (outside a call)
        self._cur: _Stream | None = None
        # (module, its own instance-level forward before patching, or None): restored on disable,
        # so wrappers installed by others (e.g. accelerate's offload hooks) survive
        self._patched: list[tuple[nn.Module, Any]] = []
        n_up = len(unet.up_blocks)
        deep: list[tuple[str, nn.Module]] = [(f"down{i}", b) for i, b in enumerate(unet.down_blocks) if i >= depth]
        if getattr(unet, "mid_block", None) is not None:
            deep.append(("mid", unet.mid_block))
        deep += [(f"up{j}", b) for j, b in enumerate(unet.up_blocks) if j < n_up - depth]
        self._branch_key = f"up{n_up - depth - 1}"
        for key, mod in deep:
            self._patch(key, mod)
        self._orig_unet_forward = unet.forward
        self._unet_prev_forward = unet.__dict__.get("forward")
        unet.forward = self._unet_forward  # instance attribute: module tree unchanged
        unet._bitpress_cache = self

    # -- patching -------------------------------------------------------------------------
    def _patch(self, key: str, mod: nn.Module) -> None:
        orig = mod.forward
        prev = mod.__dict__.get("forward")

        def forward(*args: Any, **kwargs: Any) -> Any:
            st = self._cur
            if self._mode == "cached" and st is not None:
                out = st.outputs[key]
                if key == self._branch_key and self.feature_transform is not None:
                    feat = self.feature_transform(st.step, st.last_refresh, _first(out))
                    out = (feat, *out[1:]) if isinstance(out, (tuple, list)) else feat
                return out
            out = orig(*args, **kwargs)
            if self._mode == "refresh" and st is not None:
                if key == self._branch_key:
                    out = (_first(out).clone(), *out[1:]) if isinstance(out, (tuple, list)) else out.clone()
                    if self.feature_hook is not None:
                        self.feature_hook(st.step, _first(out))
                st.outputs[key] = out
            return out

        mod.forward = forward
        self._patched.append((mod, prev))

    def disable(self) -> None:
        """Restore the U-Net's original forwards and drop all cached tensors."""
        for mod, prev in self._patched:
            if prev is not None:
                mod.forward = prev
            elif "forward" in mod.__dict__:
                del mod.forward
        self._patched = []
        if self._unet_prev_forward is not None:
            self.unet.forward = self._unet_prev_forward
        elif "forward" in self.unet.__dict__:
            del self.unet.forward
        self.unet._bitpress_cache = None
        self._streams.clear()

    # -- stream and step control ------------------------------------------------------------
    def reset(self) -> None:
        """Forget every stream (start of a new trajectory) and the call counters."""
        self._streams.clear()
        self.n_full = self.n_cached = 0

    @contextlib.contextmanager
    def stream(self, tag: Any) -> Iterator[None]:
        """Route the calls inside the block to a separately cached stream named ``tag``."""
        prev, self._tag = self._tag, tag
        try:
            yield
        finally:
            self._tag = prev

    def steps(self) -> dict[Any, int]:
        """Current step of every stream (how many evaluations it has done in this trajectory)."""
        return {k: s.step for k, s in self._streams.items()}

    def _is_refresh(self, st: _Stream) -> bool:
        """Whether the stream's current step runs the full U-Net (wrapping to a new trajectory)."""
        if self.schedule is None or not st.outputs:
            return True
        if st.step >= len(self.schedule):  # a new trajectory on the same stream
            st.step = 0
        return self.schedule[st.step]

    def _unet_forward(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        key = (self._tag, tuple(sample.shape), sample.dtype, sample.device)
        st = self._streams.setdefault(key, _Stream())
        if self.schedule is not None and st.step >= len(self.schedule):
            st.step = 0
        refresh = self._is_refresh(st)
        self._mode, self._cur = ("refresh" if refresh else "cached"), st
        try:
            out = self._orig_unet_forward(sample, timestep, *args, **kwargs)
        finally:
            self._mode, self._cur = None, None
        if refresh:
            st.last_refresh = st.step
            self.n_full += 1
        else:
            self.n_cached += 1
        st.step += 1
        return out


def enable_cache(unet: nn.Module, schedule: Sequence[bool] | None = None, depth: int = 1) -> UNetCache:
    """Install a DeepCache-style cache on ``unet`` (patched in place) and return its handle.

    ``schedule`` is a boolean refresh mask over U-Net evaluations (``None``: refresh every
    step); ``depth`` is the branch point (1 = the shallowest skip branch: the cached step
    runs conv_in, down block 0, the last up block and the head). Undo with ``.disable()``.
    """
    return UNetCache(unet, schedule, depth)


def get_cache(unet: nn.Module) -> UNetCache | None:
    """The cache installed on ``unet`` by :func:`enable_cache`, if any."""
    return getattr(unet, "_bitpress_cache", None)


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------

def n_evaluations(scheduler: Any, num_inference_steps: int) -> int:
    """How many U-Net evaluations ``scheduler`` makes for ``num_inference_steps`` (PNDM: +1)."""
    scheduler.set_timesteps(num_inference_steps)
    return len(scheduler.timesteps)


@torch.no_grad()
def sample_loop(unet: nn.Module, scheduler: Any, noise: torch.Tensor, num_inference_steps: int,
                schedule: Sequence[bool] | None = None, depth: int = 1, *,
                guidance_scale: float | None = None, unet_kwargs: dict[str, Any] | None = None,
                eta: float = 0.0, generator: torch.Generator | None = None, progress: bool = False,
                cache: UNetCache | None = None) -> torch.Tensor:
    """Run a diffusers scheduler's denoising loop with an optional cache schedule.

    ``noise`` is the initial latent ``[B, C, H, W]`` (it is scaled by
    ``scheduler.init_noise_sigma``). ``schedule`` is a refresh mask with one entry per U-Net
    evaluation (:func:`n_evaluations`); ``None`` runs the full U-Net every step. With
    ``guidance_scale`` the batch is doubled (``[uncond; cond]``) and ``unet_kwargs`` must
    hold the doubled conditioning (e.g. ``encoder_hidden_states`` with the unconditional
    embeddings first). ``eta`` is passed to DDIM only. An existing ``cache`` (e.g. with a
    DEC transform or feature hook) is reset and used instead of a temporary one.
    """
    import inspect

    from tqdm.auto import tqdm

    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps
    own = cache is None
    if cache is None:
        if schedule is not None:
            schedule = as_schedule(schedule, len(timesteps))
        cache = enable_cache(unet, schedule, depth)
    else:
        if schedule is not None:
            cache.schedule = as_schedule(schedule, len(timesteps))
        if cache.schedule is not None and len(cache.schedule) != len(timesteps):
            raise ConfigError(f"cache schedule has {len(cache.schedule)} steps but the scheduler makes "
                              f"{len(timesteps)} evaluations")
        cache.reset()
    step_kw: dict[str, Any] = {}
    params = inspect.signature(scheduler.step).parameters
    if "eta" in params:
        step_kw["eta"] = eta
    if "generator" in params and generator is not None:
        step_kw["generator"] = generator
    kwargs = dict(unet_kwargs or {})
    x = noise * scheduler.init_noise_sigma
    try:
        for t in tqdm(timesteps, disable=not progress, desc="denoise"):
            inp = torch.cat([x, x]) if guidance_scale is not None else x
            if hasattr(scheduler, "scale_model_input"):
                inp = scheduler.scale_model_input(inp, t)
            eps = unet(inp, t, **kwargs).sample
            if guidance_scale is not None:
                e_u, e_c = eps.chunk(2)
                eps = e_u + guidance_scale * (e_c - e_u)
            x = scheduler.step(eps, t, x, **step_kw).prev_sample
    finally:
        if own:
            cache.disable()
    return x


class PipelineCache:
    """A cache enabled on a diffusers pipeline object (``pipe.unet`` patched in place).

    Calling ``pipe(num_inference_steps=T, ...)`` directly works when ``T`` gives as many U-Net
    evaluations as the schedule has entries; :meth:`__call__` resets the streams, checks the
    count and calls the pipeline. ``.disable()`` restores the plain U-Net.
    """

    def __init__(self, pipe: Any, schedule: Sequence[bool] | None, depth: int = 1):
        self.pipe = pipe
        self.cache = enable_cache(pipe.unet, schedule, depth)

    def __call__(self, *args: Any, num_inference_steps: int | None = None, **kwargs: Any) -> Any:
        sched = self.cache.schedule
        if num_inference_steps is None:
            if sched is None:
                raise ConfigError("pass num_inference_steps (the cache has no schedule to infer it from)")
            num_inference_steps = len(sched)
        if sched is not None:
            n_eval = n_evaluations(self.pipe.scheduler, num_inference_steps)
            if n_eval != len(sched):
                raise ConfigError(f"{num_inference_steps} inference steps make {n_eval} U-Net evaluations with "
                                  f"{type(self.pipe.scheduler).__name__}, but the schedule has {len(sched)} entries")
        self.cache.reset()
        return self.pipe(*args, num_inference_steps=num_inference_steps, **kwargs)

    def disable(self) -> None:
        self.cache.disable()


def enable_pipeline_cache(pipe: Any, schedule: Sequence[bool] | None, depth: int = 1) -> PipelineCache:
    """Enable the cache on a diffusers pipeline (``DDIMPipeline``, ``DDPMPipeline``,
    ``StableDiffusionPipeline``, ... -- anything with a ``unet``) and return a callable handle."""
    if not hasattr(pipe, "unet"):
        raise ConfigError(f"{type(pipe).__name__} has no .unet to cache")
    return PipelineCache(pipe, schedule, depth)


# --------------------------------------------------------------------------------------------
# MACs
# --------------------------------------------------------------------------------------------

def _conv_linear_macs(mod: nn.Module, out: torch.Tensor) -> int:
    if isinstance(mod, nn.Conv2d):
        k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        return out.numel() * k
    return out.numel() * mod.in_features  # Linear


@torch.no_grad()
def count_macs(unet: nn.Module, sample: torch.Tensor, timestep: Any, depth: int = 1,
               **unet_kwargs: Any) -> dict[str, float]:
    """Multiply-accumulates per image of one full step and one cached step.

    Counts every ``Conv2d`` and ``Linear`` (forward hooks) plus the two matmuls of each
    diffusers ``Attention`` (``2 * Lq * Lk * inner_dim``); normalisations and activations
    are not counted (as usual). ``sample`` (with its batch) and ``unet_kwargs`` are one
    ordinary U-Net input. Returns ``{"full", "cached", "speedup"}`` (MACs per image, and
    full/cached).
    """
    from diffusers.models.attention_processor import Attention

    total = [0]

    def hook(mod: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        if isinstance(mod, Attention):
            hs = args[0] if args else kwargs["hidden_states"]
            lq = hs.shape[2] * hs.shape[3] if hs.ndim == 4 else hs.shape[1]
            ehs = kwargs.get("encoder_hidden_states")
            if ehs is None and len(args) > 1:
                ehs = args[1]
            lk = ehs.shape[1] if ehs is not None else lq
            total[0] += 2 * hs.shape[0] * lq * lk * mod.inner_dim
        else:
            total[0] += _conv_linear_macs(mod, out)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in unet.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, Attention))]
    existing = get_cache(unet)
    try:
        cache = existing if existing is not None else enable_cache(unet, [True, False], depth)
        saved = cache.schedule, dict(cache._streams), cache.n_full, cache.n_cached
        cache.schedule = [True, False]
        cache._streams = {}
        res = []
        for _ in range(2):
            total[0] = 0
            unet(sample, timestep, **unet_kwargs)
            res.append(total[0] / sample.shape[0])
        cache.schedule, cache._streams = saved[0], saved[1]
        cache.n_full, cache.n_cached = saved[2], saved[3]
        if existing is None:
            cache.disable()
    finally:
        for h in handles:
            h.remove()
    full, cached = res
    return {"full": full, "cached": cached, "speedup": full / cached if cached else math.inf}


def schedule_macs(macs: dict[str, float], schedule: Sequence[bool]) -> dict[str, float]:
    """MACs per image of a whole trajectory under ``schedule`` and the speed-up vs all-full."""
    n = len(schedule)
    k = sum(bool(s) for s in schedule)
    tot = k * macs["full"] + (n - k) * macs["cached"]
    return {"macs": tot, "full_macs": n * macs["full"], "speedup": n * macs["full"] / tot}


__all__ = ["UNetCache", "enable_cache", "get_cache", "max_depth", "as_schedule", "sample_loop",
           "n_evaluations", "PipelineCache", "enable_pipeline_cache", "count_macs", "schedule_macs"]
