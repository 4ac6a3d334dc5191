"""Block-wise minimisation (decoupleQ float parts, GQSA BQPO) inside the streaming pipeline,
on the tiny Llama / GPT-2 fixtures: the block output loss never rises, codes (float_parts) and
masks (bqpo) stay, tuned norms reach the saved checkpoint, bad options fail early."""
from __future__ import annotations

import json

import pytest
import torch

import bitpress
from bitpress.errors import ConfigError
from bitpress.nn import Recipe
from bitpress.pipeline.compress import compress
from bitpress.pipeline.blocktune import block_output_loss, make_block_tuner, norm_parameters


FAST = dict(nsamples=8, seqlen=48, batch_size=4, progress=False, dtype=torch.float32)


pytestmark = pytest.mark.usefixtures("one_thread")


class Spy:
    """Wraps a tuner; records what each block looked like before and after."""

    def __init__(self, tuner):
        self.tuner, self.rows = tuner, []
        self.target = tuner.target  # the pipeline reads it from the hook

    def __call__(self, ctx):
        before = {n: (qw.codes.clone(), qw.scale.clone(), qw.zero.clone(),
                      None if qw.keep is None else qw.keep.clone())
                  for n, qw in ctx.qweights.items()}
        norms0 = {n: p.detach().clone() for n, p in norm_parameters(ctx.block).items()}
        loss0 = block_output_loss(ctx)
        new = self.tuner(ctx)
        if new:  # what the pipeline does with the result
            for n, qw in new.items():
                m = ctx.block.get_submodule(n)
                w = qw.dequantize()
                m.weight.data = (w.t() if type(m).__name__ == "Conv1D" else w).contiguous()
        loss1 = block_output_loss(ctx)
        norms1 = {n: p.detach().clone() for n, p in norm_parameters(ctx.block).items()}
        self.rows.append(dict(name=ctx.name, before=before, new=new, loss0=loss0,
                              loss1=loss1, norms0=norms0, norms1=norms1))
        return new


@pytest.mark.parametrize("arch", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_float_parts_lowers_loss_keeps_codes_saves_norms(request, tmp_path, calib_file, arch):
    src = request.getfixturevalue(arch)
    spy = Spy(make_block_tuner("float_parts", epochs=3, lr=1e-3, progress=False,
                               param_dtype=torch.float32))
    out = tmp_path / "q"
    compress(src, out, Recipe(method="decoupleq", bits=2, group_size=32), calib=calib_file,
             block_hook=spy, **FAST)
    assert len(spy.rows) == 2
    assert any(r["new"] for r in spy.rows), "tuning improved no block at all"
    for r in spy.rows:
        assert r["loss1"] <= r["loss0"] * (1 + 1e-6)
        if r["new"]:
            assert r["loss1"] < r["loss0"]
            for n, (codes, scale, zero, keep) in r["before"].items():
                assert torch.equal(r["new"][n].codes, codes)  # codes frozen
                assert r["new"][n].keep is None
            assert any(not torch.equal(r["new"][n].scale, b[1]) for n, b in r["before"].items())
            assert any(not torch.equal(r["norms1"][k], v) for k, v in r["norms0"].items())
        else:  # rejected: norms restored exactly
            assert all(torch.equal(r["norms1"][k], v) for k, v in r["norms0"].items())
    # GPT-2 ln_1/ln_2 (weight and bias) and Llama's RMSNorms are found
    names = list(spy.rows[0]["norms0"])
    assert len(names) == (4 if arch == "tiny_gpt2_dir" else 2), names
    # the tuned norm weights are in the saved checkpoint (float32 storage here: exact)
    model = bitpress.load(out)
    sd = model.state_dict()
    for r in spy.rows:
        for k, v in r["norms1"].items():
            assert torch.equal(sd[f"{r['name']}.{k}"], v), k


def test_float_parts_block0_codes_identical_to_untuned_run(tiny_llama_dir, tmp_path,
                                                             calib_file):
    """Block 0 sees the same inputs with and without tuning: its packed codes are
    byte-identical, its scales differ; the summary records tuning time and losses."""
    from safetensors.torch import load_file

    recipe = Recipe(method="decoupleq", bits=2, group_size=32)
    a = compress(tiny_llama_dir, tmp_path / "a", recipe, calib=calib_file, block_tune="none",
                 **FAST)
    b = compress(tiny_llama_dir, tmp_path / "b", recipe, calib=calib_file,
                 block_tune="float_parts", tune_epochs=3, tune_lr=1e-3, **FAST)
    assert a["block_tune"] is None and a["seconds_block_tune"] == 0.0
    assert b["block_tune"]["mode"] == "float_parts" and b["block_tune"]["epochs"] == 3
    assert b["seconds_block_tune"] > 0 and b["seconds_solver"] > 0
    assert b["seconds_solver"] + b["seconds_block_tune"] == pytest.approx(
        b["seconds_quantize"], abs=0.05)
    recs = b["block_tune_losses"]
    assert [r["block"] for r in recs] == [0, 1]
    assert all(r["loss_after"] <= r["loss_before"] or not r["accepted"] for r in recs)
    saved = json.loads((tmp_path / "b" / "bitpress_summary.json").read_text())
    assert saved["block_tune_losses"] == recs
    ta, tb = load_file(tmp_path / "a" / "model.safetensors"), \
        load_file(tmp_path / "b" / "model.safetensors")
    pre = "model.layers.0."
    qkeys = [k for k in ta if k.startswith(pre) and k.endswith(".qweight")]
    assert len(qkeys) == 7
    for k in qkeys:
        assert torch.equal(ta[k], tb[k]), k
    if recs[0]["accepted"]:
        assert any(not torch.equal(ta[k.replace("qweight", "scales")],
                                   tb[k.replace("qweight", "scales")]) for k in qkeys)


@pytest.mark.parametrize("arch", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_bqpo_keeps_mask_and_never_raises_loss(request, tmp_path, calib_file, arch):
    src = request.getfixturevalue(arch)
    spy = Spy(make_block_tuner("bqpo", epochs=3, lr=1e-3, progress=False))
    out = tmp_path / "q"
    compress(src, out, Recipe(method="gqsa", bits=4, group_size=16, sparsity=0.5),
             calib=calib_file, block_hook=spy, **FAST)
    for r in spy.rows:
        assert r["loss1"] <= r["loss0"] * (1 + 1e-6)
        if not r["new"]:
            continue
        for n, (codes, scale, zero, keep) in r["before"].items():
            q = r["new"][n]
            assert torch.equal(q.keep, keep)  # the mask is fixed
            assert int(q.codes.min()) >= -8 and int(q.codes.max()) <= 7
            pruned = ~keep.repeat_interleave(16, dim=1)[:, :codes.shape[1]]
            assert torch.equal(q.codes[pruned], codes[pruned])  # pruned groups untouched
            assert not bool(q.dequantize()[pruned].any())
            # fp16 storage: the tuned parameters are representable
            assert torch.equal(q.scale, q.scale.half().float())
    model = bitpress.load(out)
    mods = [m for m in model.modules() if type(m).__name__ == "GroupSparseLinear"]
    assert mods and all(abs(m.sparsity - 0.5) < 0.02 for m in mods)


def test_bqpo_changes_codes_when_it_helps(tiny_llama_dir, tmp_path, calib_file):
    """With a large latent learning rate some codes move (the straight-through path is live)
    whenever the tuned block is accepted."""
    spy = Spy(make_block_tuner("bqpo", epochs=4, lr=1e-3, latent_lr=5e-2, progress=False))
    compress(tiny_llama_dir, tmp_path / "q", Recipe(method="rtn", bits=4, group_size=16,
                                                    sparsity=0.5),
             calib=calib_file, block_hook=spy, **FAST)
    assert all(r["new"] for r in spy.rows)  # RTN leaves plenty to recover here
    for r in spy.rows:
        assert r["loss1"] < r["loss0"]
        assert any(not torch.equal(r["new"][n].codes, b[0]) for n, b in r["before"].items())


def test_rejected_tuning_keeps_untuned_block(tiny_llama_dir, tmp_path, calib_file):
    """An absurd learning rate makes the block worse: the hook keeps everything as it was."""
    spy = Spy(make_block_tuner("float_parts", epochs=1, lr=5.0, progress=False))
    compress(tiny_llama_dir, tmp_path / "q", Recipe(method="rtn", bits=4, group_size=32),
             calib=calib_file, block_hook=spy, **FAST)
    assert spy.tuner.records and not any(r.accepted for r in spy.tuner.records)
    for r in spy.rows:
        assert r["new"] is None
        assert r["loss1"] == pytest.approx(r["loss0"], rel=1e-6)
        assert all(torch.equal(r["norms1"][k], v) for k, v in r["norms0"].items())


@pytest.mark.parametrize("lr", [1e-3, 5.0])  # accepted / rejected tuning
def test_block_outputs_are_handed_over_not_recomputed(tiny_llama_dir, tmp_path, calib_file, lr):
    """The pipeline gives the hook the quantized block's outputs (``ctx.outputs``) and the
    tuner hands back the outputs of the block as it leaves it (``ctx.outputs_after``), so
    neither is recomputed; both equal a fresh forward of the block."""
    tuner = make_block_tuner("float_parts", epochs=1, lr=lr, progress=False)
    seen = []

    def fresh(ctx):
        return [ctx.inputs.call(ctx.block, ctx.index, h) for h in ctx.hidden]

    def hook(ctx):
        assert ctx.outputs is not None
        for a, b in zip(ctx.outputs, fresh(ctx)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        new = tuner(ctx)
        for n, qw in (new or {}).items():
            w = qw.dequantize()
            torch.testing.assert_close(ctx.block.get_submodule(n).weight.data, w, rtol=0, atol=0)
        assert ctx.outputs_after is not None
        for a, b in zip(ctx.outputs_after, fresh(ctx)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        seen.append(bool(new))
        return new

    compress(tiny_llama_dir, tmp_path / "q", Recipe(method="rtn", bits=2, group_size=32),
             calib=calib_file, block_hook=hook, **FAST)
    assert seen and (any(seen) if lr < 1 else not any(seen))


def test_micro_batches_slice_the_block_call(tiny_qwen2_dir, tmp_path, calib_file):
    """Micro-batches smaller than the calibration batch (sliced masks / rotary tables) and
    whole calibration batches both work."""
    for mb in (1, None):
        t = make_block_tuner("float_parts", epochs=1, lr=1e-3, micro_batch=mb, progress=False)
        compress(tiny_qwen2_dir, tmp_path / f"q{mb}", Recipe(method="rtn", bits=3, group_size=32),
                 calib=calib_file, block_hook=t, **FAST)
        assert [r.steps for r in t.records] == [8 if mb == 1 else 2] * 2


def test_steps_cap_the_adam_steps(tiny_llama_dir, tmp_path, calib_file):
    """``steps`` stops each block's tuning after that many micro-batches (a random subset),
    also across epochs; a cap above one pass changes nothing."""
    for steps, epochs, want in ((3, 1, 3), (10, 2, 10), (50, 1, 8)):
        t = make_block_tuner("float_parts", epochs=epochs, lr=1e-3, steps=steps, progress=False)
        compress(tiny_llama_dir, tmp_path / f"q{steps}", Recipe(method="rtn", bits=3,
                                                                group_size=32),
                 calib=calib_file, block_hook=t, **FAST)
        assert [r.steps for r in t.records] == [want] * 2
        assert t.options()["steps"] == steps
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="steps"):
            make_block_tuner("float_parts", steps=bad)


@pytest.mark.parametrize("kw,msg", [
    (dict(block_tune="sometimes"), "unknown block tuning"),
    (dict(block_tune="float_parts", tune_epochs=0), "epochs"),
    (dict(block_tune="bqpo", tune_lr=-1.0), "lr"),
    (dict(block_tune="float_parts", block_hook=lambda ctx: None), "either"),
])
def test_bad_block_tune_options(tiny_llama_dir, tmp_path, calib_file, kw, msg):
    out = tmp_path / "q"
    with pytest.raises(ConfigError, match=msg):
        compress(tiny_llama_dir, out, Recipe(method="rtn", bits=4, group_size=32),
                 calib=calib_file, **FAST, **kw)
    assert not out.exists()


def test_cli_block_tune(tiny_llama_dir, tmp_path, calib_file, capsys):
    from bitpress.cli import main

    out = tmp_path / "q"
    assert main(["compress", str(tiny_llama_dir), "--out", str(out), "--calib", str(calib_file),
                 "--nsamples", "4", "--seqlen", "32", "--method", "rtn", "--bits", "3",
                 "--group-size", "32", "--block-tune", "float_parts", "--tune-epochs", "1",
                 "--tune-lr", "1e-3", "--tune-steps", "3"]) == 0
    s = json.loads((out / "bitpress_summary.json").read_text())
    assert s["block_tune"]["mode"] == "float_parts" and s["block_tune"]["lr"] == 1e-3
    assert s["block_tune"]["steps"] == 3
    assert [r["steps"] for r in s["block_tune_losses"]] == [3, 3]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse refuses the choice
        main(["compress", str(tiny_llama_dir), "--out", str(tmp_path / "r"),
              "--block-tune", "bogus"])
    assert e.value.code == 2
    assert main(["compress", str(tiny_llama_dir), "--out", str(tmp_path / "r"),
                 "--tune-epochs", "2"]) == 2  # rtn: no block tuning to configure
    assert "need block tuning" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_relative_parameters_start_at_the_grid_and_scale_with_it():
    """``relative=True`` trains δ, ε with s = s0·(1+δ), z = z0 + s0·ε: at δ = ε = 0 the block is
    exactly the untuned one, and the same step moves a group's scale in proportion to it."""
    from bitpress.formats import quantize_rtn
    from bitpress.quant.tunable import TunedLinear as _TunedLinear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g) * torch.tensor([1e-3, 1e-2, 1e-1, 1.0, 1.0, 1.0])[:, None]
    keep = torch.rand(6, 4, generator=g) > 0.3
    qw = quantize_rtn(w, 4, 16, keep=keep)
    a = _TunedLinear(qw, None, "bqpo", True, "code", relative=False)
    r = _TunedLinear(qw, None, "bqpo", True, "code", relative=True)
    assert torch.equal(a.weight(), r.weight()) and torch.allclose(r.weight(), qw.dequantize())
    ra, rr = a.result(qw, torch.float16), r.result(qw, torch.float16)
    assert torch.equal(ra.codes, rr.codes) and torch.equal(ra.scale, rr.scale)
    assert [p.shape for p in r.trainable_params()] == [qw.scale.shape, qw.zero.shape]
    with torch.no_grad():
        r.d_scale.fill_(0.01)
    s1 = r.result(qw, None).scale
    kept = keep & (qw.scale != 0)
    assert torch.allclose(s1[kept], qw.scale[kept] * 1.01, rtol=1e-5)


def test_token_loss_weighs_every_token_by_its_own_norm():
    """``loss="token"``: each token's ‖e‖²/‖y‖², averaged over tokens — a token with a
    massive target (SmolLM2's first token) counts like any other at the same relative error;
    sums and counts of batches add up to the whole-set value."""
    from bitpress.pipeline.blocktune import _loss_terms

    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 5, 8, generator=g)
    y[:, 0] *= 1e4  # a massive first token
    e = 0.01 * torch.randn(2, 5, 8, generator=g)
    e[:, 0] *= 1e4  # same relative error
    sm, n = _loss_terms(y + e, y, "token")
    want = (e.pow(2).sum(-1) / y.pow(2).sum(-1)).mean()
    assert n == 10 and float(sm / n) == pytest.approx(float(want), rel=1e-5)
    mse, m = _loss_terms(y + e, y, "mse")
    assert m == 80 and float(mse / m) == pytest.approx(float(e.pow(2).mean()), rel=1e-5)
    # under mse the first token is almost all of the loss, under token a fifth
    share_mse = float(e[:, 0].pow(2).sum() / e.pow(2).sum())
    r = e.pow(2).sum(-1) / y.pow(2).sum(-1)
    assert share_mse > 0.99 and 0.05 < float(r[:, 0].sum() / r.sum()) < 0.6
    a, na = _loss_terms(y[:1] + e[:1], y[:1], "token")
    b, nb = _loss_terms(y[1:] + e[1:], y[1:], "token")
    assert float((a + b) / (na + nb)) == pytest.approx(float(sm / n), rel=1e-6)


def _token_losses_around(tuner, src, tmp_path, calib_file):
    """Run ``tuner`` in a GQSA-shaped compress (RTN W4 g16 S50); the (before, after) token
    loss of every block as the pipeline leaves it."""
    seen = []

    def hook(ctx):
        l0 = block_output_loss(ctx, loss="token")
        new = tuner(ctx)
        for n, qw in (new or {}).items():
            ctx.block.get_submodule(n).weight.data = qw.dequantize()
        seen.append((l0, block_output_loss(ctx, loss="token")))
        return new

    hook.target = tuner.target
    compress(src, tmp_path / "q", Recipe(method="rtn", bits=4, group_size=16, sparsity=0.5),
             calib=calib_file, block_hook=hook, **FAST)
    return seen


def test_bqpo_token_loss_never_raises_it(tiny_llama_dir, tmp_path, calib_file):
    """Training and acceptance use the token loss: it never rises, the records say so."""
    tuner = make_block_tuner("bqpo", epochs=4, lr=1e-3, loss="token", progress=False)
    seen = _token_losses_around(tuner, tiny_llama_dir, tmp_path, calib_file)
    assert seen and all(l1 <= l0 * (1 + 1e-6) for l0, l1 in seen)
    recs = tuner.records
    assert all(r.loss == "token" for r in recs) and any(r.accepted for r in recs)
    assert [r.loss_before for r in recs] == pytest.approx([l0 for l0, _ in seen], rel=1e-6)
    assert tuner.options()["loss"] == "token"
    with pytest.raises(ConfigError, match="loss"):
        make_block_tuner("bqpo", loss="l1")


def test_cli_tune_loss(tiny_llama_dir, tmp_path, calib_file):
    from bitpress.cli import main

    # bqpo (gqsa's default tuning) defaults to the token loss; --tune-loss overrides it
    for extra, want in (([], "token"), (["--tune-loss", "mse"], "mse")):
        out = tmp_path / f"q{want}"
        assert main(["compress", str(tiny_llama_dir), "--out", str(out), "--calib",
                     str(calib_file), "--nsamples", "4", "--seqlen", "32", "--method", "gqsa",
                     "--bits", "4", "--sparsity", "0.5", "--tune-steps", "2", *extra]) == 0
        s = json.loads((out / "bitpress_summary.json").read_text())
        assert s["block_tune"]["mode"] == "bqpo" and s["block_tune"]["loss"] == want
        assert all(r["loss"] == want for r in s["block_tune_losses"])
    assert make_block_tuner("float_parts").options()["loss"] == "mse"
    assert make_block_tuner("bqpo").options()["loss"] == "token"


class _TargetSpy:
    """A hook that only records what it is trained towards (``target`` as a tuner has it)."""

    def __init__(self, target):
        self.target, self.targets, self.hidden = target, [], []

    def __call__(self, ctx):
        self.targets.append(torch.cat(ctx.targets).clone())
        self.hidden.append(torch.cat(ctx.hidden).clone())
        return None


def test_model_target_is_the_float_models_hidden_state(tiny_llama_dir, tmp_path, calib_file):
    """``target="model"``: block i is handed the float model's own output of block i (the
    float model run separately), not the float block on the quantized inputs."""
    from transformers import AutoModelForCausalLM

    from bitpress.pipeline.calib import calibration_windows
    from bitpress.pipeline.checkpoint import load_tokenizer
    from bitpress.pipeline.evaluate import read_text

    spies = {t: _TargetSpy(t) for t in ("block", "model")}
    for t, spy in spies.items():
        compress(tiny_llama_dir, tmp_path / t, Recipe(method="rtn", bits=2, group_size=16),
                 calib=calib_file, block_hook=spy, **FAST)
    ids = calibration_windows(load_tokenizer(tiny_llama_dir), read_text(calib_file),
                              FAST["nsamples"], FAST["seqlen"])
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hs = ref(ids, output_hidden_states=True).hidden_states
    L = len(spies["model"].targets)
    assert L >= 2
    for i in range(L - 1):  # HF's last hidden state is after the final norm
        assert torch.allclose(spies["model"].targets[i], hs[i + 1], atol=1e-4, rtol=1e-4), i
    # block 0 sees the same inputs either way; later blocks' quantized inputs differ from the
    # float model's, so the two kinds of target part ways
    assert torch.equal(spies["block"].targets[0], spies["model"].targets[0])
    assert not torch.allclose(spies["block"].targets[1], spies["model"].targets[1], atol=1e-3)
    # the quantized inputs are the same in both runs (no tuning happened)
    for a, b in zip(spies["block"].hidden, spies["model"].hidden):
        assert torch.equal(a, b)


def test_bqpo_towards_the_model_target(tiny_llama_dir, tmp_path, calib_file):
    """A real tuner with ``target="model"``: never accepts a rise of its loss, records the
    option; the CLI passes ``--tune-target``; a bad target fails early."""
    from bitpress.cli import main

    tuner = make_block_tuner("bqpo", epochs=3, lr=1e-3, target="model", progress=False)
    seen = _token_losses_around(tuner, tiny_llama_dir, tmp_path, calib_file)
    assert seen and all(l1 <= l0 * (1 + 1e-6) for l0, l1 in seen)
    assert any(r.accepted for r in tuner.records)
    assert tuner.options()["target"] == "model"
    assert make_block_tuner("bqpo").options()["target"] == "model"
    assert make_block_tuner("float_parts").options()["target"] == "block"
    assert make_block_tuner("bqpo", target="block").options()["target"] == "block"
    with pytest.raises(ConfigError, match="target"):
        make_block_tuner("bqpo", target="teacher")
    out = tmp_path / "cli"
    assert main(["compress", str(tiny_llama_dir), "--out", str(out), "--calib", str(calib_file),
                 "--nsamples", "4", "--seqlen", "32", "--method", "gqsa", "--bits", "4",
                 "--sparsity", "0.5", "--tune-steps", "2", "--tune-target", "model"]) == 0
    s = json.loads((out / "bitpress_summary.json").read_text())
    assert s["block_tune"]["target"] == "model"
