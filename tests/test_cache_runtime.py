"""bitpress.cache.runtime: the DeepCache-style cached U-Net on tiny random diffusers models."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, PNDMScheduler  # noqa: E402

from bitpress.cache.runtime import (as_schedule, count_macs, enable_cache, enable_pipeline_cache,  # noqa: E402
                                    get_cache, n_evaluations, sample_loop, schedule_macs)
from bitpress.errors import ConfigError  # noqa: E402
from conftest import tiny_cond_unet, tiny_unet  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("skip,layers", [(False, 1), (False, 2), (True, 1)])
def test_refresh_every_step_equals_plain_unet(skip: bool, layers: int) -> None:
    unet = tiny_unet(skip=skip, layers=layers)
    x = torch.randn(3, unet.config.in_channels, 16, 16)
    with torch.no_grad():
        ref = [unet(x * (i + 1), 10 * i).sample for i in range(3)]
        cache = enable_cache(unet, [True, True, True])
        got = [unet(x * (i + 1), 10 * i).sample for i in range(3)]
        cache.disable()
        again = unet(x, 0).sample
    for r, g in zip(ref, got):
        assert torch.equal(r, g)
    assert torch.equal(again, ref[0])
    assert get_cache(unet) is None and "forward" not in unet.__dict__


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("skip", [False, True])
def test_cached_step_reuses_deep_feature(depth: int, skip: bool) -> None:
    """Same input twice: the cached step must reproduce the full output exactly (the deep
    feature it reuses is the one the full U-Net would compute); a new input then differs
    from the full output only through the stale deep feature."""
    unet = tiny_unet(skip=skip)
    x = torch.randn(2, unet.config.in_channels, 16, 16)
    x2 = torch.randn(2, unet.config.in_channels, 16, 16)
    with torch.no_grad():
        full1, full2 = unet(x, 5).sample, unet(x2, 5).sample
        cache = enable_cache(unet, [True, False, False], depth=depth)
        a = unet(x, 5).sample
        b = unet(x, 5).sample
        c = unet(x2, 5).sample
        assert cache.n_full == 1 and cache.n_cached == 2
        cache.disable()
    torch.testing.assert_close(a, full1, rtol=0, atol=0)
    torch.testing.assert_close(b, full1, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(c, full2, atol=1e-4)


def test_cached_step_runs_no_deep_block() -> None:
    unet = tiny_unet()
    calls: list[str] = []  # hooks on the blocks' first resnets: they fire only if a block computes
    for i, b in enumerate(unet.up_blocks):
        b.resnets[0].register_forward_pre_hook(lambda m, a, i=i: calls.append(f"up{i}"))
    unet.mid_block.resnets[0].register_forward_pre_hook(lambda m, a: calls.append("mid"))
    cache = enable_cache(unet, [True, False])
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        unet(x, 1)
        assert calls == ["mid", "up0", "up1", "up2"]
        calls.clear()
        unet(x, 2)
    cache.disable()
    assert calls == ["up2"]


def test_streams_keyed_by_batch_and_tag() -> None:
    unet = tiny_unet()
    cache = enable_cache(unet, [True, False, False])
    with torch.no_grad():
        unet(torch.randn(2, 1, 16, 16), 1)
        unet(torch.randn(4, 1, 16, 16), 1)  # another stream: refreshes on its own
        unet(torch.randn(2, 1, 16, 16), 1)
        with cache.stream("uncond"):
            unet(torch.randn(2, 1, 16, 16), 1)
    assert cache.n_full == 3 and cache.n_cached == 1
    assert sorted(cache.steps().values()) == [1, 1, 2]
    cache.disable()


def test_schedule_validation() -> None:
    assert as_schedule([0, 3], 5) == [True, False, False, True, False]
    with pytest.raises(ConfigError):
        as_schedule([False, True])
    with pytest.raises(ConfigError):
        as_schedule([0, 7], 5)
    with pytest.raises(ConfigError):
        enable_cache(tiny_unet(), None, depth=3)
    unet = tiny_unet()
    enable_cache(unet)
    with pytest.raises(ConfigError):
        enable_cache(unet)


def test_n_evaluations() -> None:
    assert n_evaluations(DDIMScheduler(num_train_timesteps=1000), 10) == 10
    assert n_evaluations(PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True), 10) == 11
    assert n_evaluations(PNDMScheduler(num_train_timesteps=1000), 10) > 11  # Runge-Kutta warm-up


@pytest.mark.parametrize("sched_cls", [DDIMScheduler, DDPMScheduler, PNDMScheduler])
def test_sample_loop_schedulers(sched_cls) -> None:
    unet = tiny_unet()
    extra = {"skip_prk_steps": True} if sched_cls is PNDMScheduler else {}
    sched = sched_cls(num_train_timesteps=1000, **extra)
    steps = 4
    n = n_evaluations(sched, steps)
    noise = torch.randn(2, 1, 16, 16)
    kw = dict(generator=torch.Generator().manual_seed(0))
    plain = sample_loop(unet, sched, noise, steps, None, **kw)
    kw = dict(generator=torch.Generator().manual_seed(0))
    all_refresh = sample_loop(unet, sched, noise, steps, [True] * n, **kw)
    torch.testing.assert_close(plain, all_refresh, rtol=0, atol=0)
    kw = dict(generator=torch.Generator().manual_seed(0))
    mask = [i % 2 == 0 for i in range(n)]
    cached = sample_loop(unet, sched, noise, steps, mask, **kw)
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
    assert get_cache(unet) is None
    with pytest.raises(ConfigError):
        sample_loop(unet, sched, noise, steps, [True] * (n + 1))


def test_cfg_batch_with_condition_unet() -> None:
    unet = tiny_cond_unet()
    sched = DDIMScheduler(num_train_timesteps=1000)
    noise = torch.randn(2, 4, 8, 8)
    emb = torch.randn(4, 5, 12)  # [uncond; cond] for a batch of 2
    plain = sample_loop(unet, sched, noise, 4, None, guidance_scale=3.0,
                        unet_kwargs={"encoder_hidden_states": emb})
    same = sample_loop(unet, sched, noise, 4, [True] * 4, guidance_scale=3.0,
                       unet_kwargs={"encoder_hidden_states": emb})
    torch.testing.assert_close(plain, same, rtol=0, atol=0)
    cache = enable_cache(unet, [True, False, True, False])
    out = sample_loop(unet, sched, noise, 4, guidance_scale=3.0,
                      unet_kwargs={"encoder_hidden_states": emb}, cache=cache)
    assert cache.n_full == 2 and cache.n_cached == 2 and torch.isfinite(out).all()
    # the stream holds the doubled batch: both halves have their own cached feature
    (st,) = cache._streams.values()
    assert st.outputs[cache._branch_key].shape[0] == 4
    cache.disable()


def test_pipelines() -> None:
    unet = tiny_unet()
    for pipe in (DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)),
                 DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))):
        pipe.set_progress_bar_config(disable=True)
        ref = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                   output_type="np").images
        pc = enable_pipeline_cache(pipe, [True] * 5)
        got = pc(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np").images
        assert (got == ref).all()
        pc.cache.schedule = as_schedule([0, 2], 5)
        out = pc(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np").images
        assert pc.cache.n_full == 2 and pc.cache.n_cached == 3 and out.shape == ref.shape
        with pytest.raises(ConfigError):
            pc(batch_size=2, num_inference_steps=7)
        pc.disable()


def test_stable_diffusion_pipeline_tiny() -> None:
    """The StableDiffusionPipeline path with a tiny random UNet2DConditionModel and VAE;
    prompt embeddings are passed directly, so no text encoder or tokenizer is needed."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    torch.manual_seed(0)
    unet = tiny_cond_unet()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=8).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt_embeds=torch.randn(1, 5, 12), negative_prompt_embeds=torch.randn(1, 5, 12),
              height=8, width=8, guidance_scale=4.0, output_type="np")
    ref = pipe(num_inference_steps=4, generator=torch.Generator().manual_seed(0), **kw).images
    pc = enable_pipeline_cache(pipe, [True] * 4)
    got = pc(generator=torch.Generator().manual_seed(0), **kw).images
    assert (got == ref).all()
    pc.cache.schedule = [True, False, False, True]
    pc(generator=torch.Generator().manual_seed(0), **kw)
    assert pc.cache.n_full == 2 and pc.cache.n_cached == 2
    (st,) = pc.cache._streams.values()  # one stream: the doubled CFG batch
    assert st.outputs[pc.cache._branch_key].shape[0] == 2
    pc.disable()


def test_count_macs() -> None:
    unet = tiny_unet()
    x = torch.randn(2, 1, 16, 16)
    m = count_macs(unet, x, 3)
    assert 0 < m["cached"] < m["full"] and m["speedup"] > 1.5
    m2 = count_macs(unet, x, 3, depth=2)
    assert m["cached"] < m2["cached"] < m2["full"] == m["full"]
    # conv_in alone, by hand: 16*16 outputs * 8 channels * 9 taps * 1 input channel
    assert m["cached"] > 16 * 16 * 8 * 9
    s = schedule_macs(m, [True, False, False, False, False])
    assert s["speedup"] == pytest.approx(5 * m["full"] / (m["full"] + 4 * m["cached"]))
    assert get_cache(unet) is None
    cm = count_macs(tiny_cond_unet(), torch.randn(1, 4, 8, 8), 3, encoder_hidden_states=torch.randn(1, 5, 12))
    assert 0 < cm["cached"] < cm["full"]


def test_disable_restores_foreign_forward_wrappers() -> None:
    """A forward wrapper someone else installed (as accelerate's hooks do) survives enable/disable."""
    unet = tiny_unet()
    calls = []
    plain_forward = unet.forward

    def wrapped(*a, **k):
        calls.append(1)
        return plain_forward(*a, **k)

    unet.forward = wrapped
    cache = enable_cache(unet, [True, False])
    with torch.no_grad():
        unet(torch.randn(1, 1, 16, 16), 1)
    cache.disable()
    assert unet.forward is wrapped and len(calls) == 1
