"""End-to-end float-part fine-tuning (decoupleQ item 4, GQSA E2E-OQP) of packed tiny models:
the loss drops, only scales/zeros/norms change, the checkpoint is rewritten atomically with
codes byte-identical, the reload reproduces the tuned logits, bad input writes nothing."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import bitpress
from bitpress.errors import ConfigError
from bitpress.nn import Recipe
from bitpress.pipeline.compress import compress
from bitpress.pipeline.blocktune import norm_parameters
from bitpress.pipeline.finetune import finetune_float_parts, lm_loss, write_float_parts

from conftest import TEXT

FAST = dict(nsamples=4, seqlen=32, batch_size=4, progress=False, dtype=torch.float32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def packed_dirs(tiny_llama_dir, tiny_gpt2_dir, tmp_path_factory):
    """RTN W3 g32 (dense) of tiny Llama and RTN W4 g16 S50 (block-sparse) of tiny GPT-2;
    norms stored in float16 so the write-back rounding is exercised."""
    d = tmp_path_factory.mktemp("ft")
    out = {}
    compress(tiny_llama_dir, d / "dense", Recipe(method="rtn", bits=3, group_size=32),
             progress=False, dtype=torch.float16)
    compress(tiny_gpt2_dir, d / "bsr", Recipe(method="rtn", bits=4, group_size=16,
                                              sparsity=0.5), progress=False,
             dtype=torch.float16)
    out["dense"], out["bsr"] = d / "dense", d / "bsr"
    return out


def _ids(n=6, L=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 400, (n, L), generator=g)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("kind", ["dense", "bsr"])
def test_finetune_lowers_loss_writes_back_codes_identical(packed_dirs, tmp_path, kind):
    d = _copy(packed_dirs[kind], tmp_path / "ck")
    before = load_file(d / "model.safetensors")
    model = bitpress.load(d)
    data = _ids()
    loss0 = lm_loss(model, data)
    res = finetune_float_parts(model, data, steps=12, lr=3e-3, batch_size=2, progress=False,
                               evaluate=True)
    assert res["steps"] == 12 and len(res["losses"]) == 12
    assert res["loss_before"] == pytest.approx(loss0, rel=1e-6)
    assert res["loss_after"] < res["loss_before"]
    assert res["trainable_parameters"] > 0 and res["norm_tensors"] > 0
    # back to buffers in the storage dtype, nothing left trainable
    assert not any(p.requires_grad for m in model.modules() if hasattr(m, "scales")
                   for p in m.parameters(recurse=False))
    assert all(m.scales.dtype == torch.float16 for m in model.modules() if hasattr(m, "scales")
               and hasattr(m, "float_parts_trainable"))
    write_float_parts(model, d, record=res)
    after = load_file(d / "model.safetensors")
    assert set(after) == set(before)
    trainable = {k for k in before if k.endswith((".scales", ".zeros"))} | \
        set(norm_parameters(model))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable, changed - trainable
    for k, t in before.items():  # codes, indices, biases, embeddings: byte-identical
        if k not in trainable:
            assert after[k].dtype == t.dtype
            assert after[k].numpy().tobytes() == t.numpy().tobytes(), k
    rec = json.loads((d / "bitpress_finetune.json").read_text())
    assert rec["runs"][-1]["steps"] == 12
    # the reloaded checkpoint reproduces the tuned model exactly
    again = bitpress.load(d)
    x = _ids(2, 24, seed=5)
    with torch.no_grad():
        a, b = model(x).logits, again(x).logits
    assert torch.equal(a, b)
    assert lm_loss(again, data) == pytest.approx(res["loss_after"], rel=1e-3)


def test_finetune_without_norms_and_to_new_dir(packed_dirs, tmp_path):
    src = packed_dirs["dense"]
    model = bitpress.load(src)
    norms0 = {k: v.detach().clone() for k, v in norm_parameters(model).items()}
    finetune_float_parts(model, _ids().flatten(), seqlen=16, steps=3, lr=1e-3,
                         train_norms=False, progress=False)
    assert all(torch.equal(norm_parameters(model)[k], v) for k, v in norms0.items())
    src_bytes = {f.name: f.read_bytes() for f in src.iterdir()}
    out = write_float_parts(model, src, tmp_path / "new", norms=False)
    assert {f.name: f.read_bytes() for f in src.iterdir()} == src_bytes  # source untouched
    assert (out / "config.json").read_bytes() == src_bytes["config.json"]
    assert (out / "tokenizer.json").exists()
    with pytest.raises(bitpress.OutputExistsError):
        write_float_parts(model, src, out)


def test_cli_finetune_in_place(packed_dirs, tmp_path, capsys):
    from bitpress.cli import main

    d = _copy(packed_dirs["dense"], tmp_path / "ck")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    q0 = load_file(d / "model.safetensors")
    assert main(["finetune", str(d), "--text", str(text), "--steps", "3", "--lr", "1e-3",
                 "--nsamples", "4", "--seqlen", "32"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] == 3 and res["out"] == str(d)
    q1 = load_file(d / "model.safetensors")
    assert all(torch.equal(q0[k], q1[k]) for k in q0 if k.endswith("qweight"))
    assert any(not torch.equal(q0[k], q1[k]) for k in q0 if k.endswith("scales"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ck")]  # no temp dirs left


@pytest.mark.parametrize("argv,msg", [
    (["--steps", "0"], "--steps must be positive"),
    (["--lr", "-1"], "--lr"),
    (["--seqlen", "100000"], "exceeds the model's context"),
])
def test_cli_finetune_bad_input_writes_nothing(packed_dirs, tmp_path, capsys, argv, msg):
    from bitpress.cli import main

    d = _copy(packed_dirs["dense"], tmp_path / "ck")
    snap = {f.name: f.read_bytes() for f in d.iterdir()}
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["finetune", str(d), "--text", str(text), *argv]) == 2
    assert msg in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in d.iterdir()} == snap
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "t.txt"]


def test_bad_input_raises_config_error(packed_dirs, tiny_llama_dir, tmp_path):
    from bitpress.pipeline.source import open_source

    model = bitpress.load(packed_dirs["dense"])
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    for data, kw in [(torch.zeros(0, 16, dtype=torch.long), {}),
                     (torch.zeros(5, dtype=torch.long), dict(seqlen=8)),  # shorter than a window
                     (torch.rand(2, 8), {}),
                     (_ids(), dict(steps=0)),
                     (_ids(), dict(lr=0.0))]:
        with pytest.raises(ConfigError):
            finetune_float_parts(model, data, progress=False, **kw)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd0.items())
    fp = open_source(tiny_llama_dir).load_model()
    with pytest.raises(ConfigError, match="no packed"):
        finetune_float_parts(fp, _ids(), progress=False)
    with pytest.raises(ConfigError, match="no packed"):
        write_float_parts(fp, packed_dirs["dense"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cosine_schedule_decays_every_group_to_zero(packed_dirs, monkeypatch):
    import math

    model = bitpress.load(packed_dirs["dense"])
    seen = []
    orig = torch.optim.Adam.step

    def step(self, *a, **k):
        seen.append([g["lr"] for g in self.param_groups])
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    res = finetune_float_parts(model, _ids(), steps=5, lr=1e-3, norm_lr=2e-3,
                               schedule="cosine", progress=False)
    assert res["schedule"] == "cosine"
    fac = [0.5 * (1 + math.cos(math.pi * i / 5)) for i in range(5)]
    assert [a for a, _ in seen] == pytest.approx([1e-3 * f for f in fac])
    assert [b for _, b in seen] == pytest.approx([2e-3 * f for f in fac])
    seen.clear()
    finetune_float_parts(model, _ids(), steps=3, lr=1e-3, progress=False)  # constant: default
    assert [lr for g in seen for lr in g] == pytest.approx([1e-3] * 6)
    with pytest.raises(ConfigError, match="schedule"):
        finetune_float_parts(model, _ids(), steps=1, schedule="linear", progress=False)


def _kl(model, teacher, data):
    """Reference: mean over positions of sum_v p_t (log p_t - log p_s), in float64."""
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=data).logits.double(), -1)
        s = torch.log_softmax(model(input_ids=data).logits.double(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_kd_loss_matches_the_kl_formula(packed_dirs, tiny_llama_dir):
    from bitpress.pipeline.source import open_source
    from bitpress.pipeline.finetune import _kd_loss

    teacher = open_source(tiny_llama_dir).load_model()
    model = bitpress.load(packed_dirs["dense"])
    data = _ids(3, 20, seed=2)
    got = float(_kd_loss(model, teacher, data).detach())
    assert got > 1e-4  # a W3 model differs from its source
    assert got == pytest.approx(_kl(model, teacher, data), rel=1e-4)
    twin = open_source(tiny_llama_dir).load_model()
    assert float(_kd_loss(twin, teacher, data).detach()) == pytest.approx(0.0, abs=1e-6)


def test_kd_finetune_moves_the_model_towards_the_teacher(packed_dirs, tiny_llama_dir, tmp_path):
    from bitpress.pipeline.source import open_source

    teacher = open_source(tiny_llama_dir).load_model().train()  # left as it was found
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags0 = [p.requires_grad for p in teacher.parameters()]
    d = _copy(packed_dirs["dense"], tmp_path / "ck")
    before = load_file(d / "model.safetensors")
    model = bitpress.load(d)
    data = _ids(8, 32, seed=3)
    kl0 = _kl(model, teacher, data)
    res = finetune_float_parts(model, data, steps=16, lr=1e-4, batch_size=2, teacher=teacher,
                               progress=False)
    assert res["loss"] == "kd" and len(res["losses"]) == 16
    first = torch.randperm(8, generator=torch.Generator().manual_seed(0))[:2]
    # the first step's loss: its batch's KL (the summary rounds losses to 5 decimals)
    assert res["losses"][0] == pytest.approx(_kl(bitpress.load(d), teacher, data[first]),
                                             rel=1e-3, abs=6e-6)
    kl1 = _kl(model, teacher, data)
    assert kl1 < 0.5 * kl0
    # the teacher is untouched: same weights, nothing left trainable or with a gradient
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t0.items())
    assert all(p.grad is None for p in teacher.parameters())
    assert teacher.training and [p.requires_grad for p in teacher.parameters()] == flags0
    write_float_parts(model, d, record=res)
    after = load_file(d / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith("qweight"))
    assert json.loads((d / "bitpress_finetune.json").read_text())["runs"][-1]["loss"] == "kd"


def test_kd_bad_input(packed_dirs, tiny_llama_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    from bitpress.pipeline.source import open_source

    model = bitpress.load(packed_dirs["dense"])
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = open_source(tiny_llama_dir).load_model()
    with pytest.raises(ConfigError, match="needs a teacher"):
        finetune_float_parts(model, _ids(), steps=1, loss="kd", progress=False)
    with pytest.raises(ConfigError, match="only used by the distillation"):
        finetune_float_parts(model, _ids(), steps=1, loss="ce", teacher=teacher, progress=False)
    with pytest.raises(ConfigError, match="packed"):
        finetune_float_parts(model, _ids(), steps=1, teacher=model, progress=False)
    with pytest.raises(ConfigError, match="must be a torch model"):
        finetune_float_parts(model, _ids(), steps=1, teacher=str(tiny_llama_dir), progress=False)
    shared = open_source(tiny_llama_dir).load_model()
    shared.model.norm = model.model.norm  # a norm the fine-tuning would train
    with pytest.raises(ConfigError, match="shares tensors"):
        finetune_float_parts(model, _ids(), steps=1, teacher=shared, progress=False)
    with pytest.raises(ConfigError, match="loss must be one of"):
        finetune_float_parts(model, _ids(), steps=1, loss="mse", progress=False)
    cfg = AutoConfig.for_model("llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=2)
    other = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ConfigError, match="same vocabulary"):
        finetune_float_parts(model, torch.randint(3, 300, (2, 8)), steps=1, teacher=other,
                             progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd0.items())
    assert not any(p.requires_grad for m in model.modules() if hasattr(m, "scales")
                   for p in m.parameters(recurse=False))


def test_cli_finetune_with_teacher(packed_dirs, tiny_llama_dir, tmp_path, capsys):
    from bitpress.cli import main

    d = _copy(packed_dirs["dense"], tmp_path / "ck")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    snap = {f.name: f.read_bytes() for f in d.iterdir()}
    # a packed checkpoint is no teacher; nothing is written
    assert main(["finetune", str(d), "--text", str(text), "--steps", "2", "--nsamples", "4",
                 "--seqlen", "32", "--teacher", str(d)]) == 2
    assert "full-precision source" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in d.iterdir()} == snap
    # a teacher with another vocabulary: refused from the configs, nothing written
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "other")
    assert main(["finetune", str(d), "--text", str(text), "--steps", "2", "--nsamples", "4",
                 "--seqlen", "32", "--teacher", str(tmp_path / "other"),
                 "--out", str(tmp_path / "no")]) == 2
    assert "vocabulary of 300 tokens" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
    assert main(["finetune", str(d), "--text", str(text), "--steps", "3", "--lr", "1e-3",
                 "--nsamples", "4", "--seqlen", "32", "--teacher", str(tiny_llama_dir),
                 "--out", str(tmp_path / "kd")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["loss"] == "kd" and res["teacher"] == str(tiny_llama_dir)
    assert {f.name: f.read_bytes() for f in d.iterdir()} == snap  # source untouched
    rec = json.loads((tmp_path / "kd" / "bitpress_finetune.json").read_text())["runs"][-1]
    assert rec["loss"] == "kd" and len(rec["losses"]) == 3


def test_kd_loss_ignores_tokens_the_teacher_rules_out():
    """Logits masked to -inf by the teacher (padded vocabularies) add 0, not NaN."""
    from types import SimpleNamespace

    from bitpress.pipeline.finetune import _kd_loss

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, use_cache=False):
            return SimpleNamespace(logits=self.logits)

    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 11, generator=g)
    st = torch.randn(2, 5, 11, generator=g)
    masked = t.clone()
    masked[..., -3:] = float("-inf")
    got = float(_kd_loss(Fixed(st), Fixed(masked), torch.zeros(2, 5, dtype=torch.long)))
    lt = torch.log_softmax(masked[..., :-3].double(), -1)
    ls = torch.log_softmax(st.double(), -1)[..., :-3]
    assert got == pytest.approx(float((lt.exp() * (lt - ls)).sum(-1).mean()), rel=1e-5)


def test_cli_offers_exactly_the_schedules():
    """``bitpress finetune --schedule`` restates SCHEDULES (the parser must not import
    torch); the two lists stay one."""
    from bitpress.cli import _SCHEDULES, build_parser
    from bitpress.pipeline.finetune import SCHEDULES

    assert tuple(_SCHEDULES) == tuple(SCHEDULES)
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["finetune"]
    act = next(a for a in sub._actions if a.dest == "schedule")
    assert tuple(act.choices) == tuple(SCHEDULES)


def test_perplexity_and_the_training_loss_share_one_evaluator():
    """perplexity (``pipeline.evaluate``) and fine-tuning's loss (``lm_loss``) both go through
    ``next_token_loss``: on the same windows they give the same mean negative log-likelihood,
    and the training loss is that evaluator's value exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitpress.pipeline.evaluate import make_windows, next_token_loss, perplexity
    from bitpress.pipeline.finetune import _lm_loss

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2)).eval()

    class Tok:
        def __call__(self, text, **kw):
            return {"input_ids": [ord(c) % 300 for c in text]}

    text = "a stream of characters to score, " * 20
    res = perplexity(m, Tok(), text, seqlen=32, batch_size=2, progress=False)
    win = make_windows(torch.tensor([ord(c) % 300 for c in text]), 32)
    assert lm_loss(m, win, batch_size=3) == pytest.approx(res["nll"], rel=1e-6)
    with torch.no_grad():
        s, logits = next_token_loss(m, win[:2], reduction="sum")
        assert torch.equal(_lm_loss(m, win[:2]), next_token_loss(m, win[:2])[0])
    assert logits.dtype == torch.float32 and logits.shape[:2] == win[:2].shape
    assert float(s) / win[:2, 1:].numel() == pytest.approx(float(_lm_loss(m, win[:2])), rel=1e-6)
