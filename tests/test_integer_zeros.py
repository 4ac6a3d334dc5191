"""Integer zero points (``--integer-zeros``): zeros ``-zp·s`` with an integer ``zp`` in the
code range, exact in the parameter dtype, through every pass and tuning stage, so that the
compressed-tensors export needs no rounding."""
from __future__ import annotations

import json

import pytest
import torch

import bitpress
from bitpress.errors import ConfigError
from bitpress.formats import (QuantizedWeight, integer_zero_params, integer_zero_scale,
                              quantize_rtn, zero_points)
from bitpress.formats.quantize import integer_zero_error_bound
from bitpress.nn import Recipe
from bitpress.pipeline.checkpoint import packed_modules
from bitpress.pipeline.compress import compress
from bitpress.quant import QuantSpec, decoupleq_solve, gptq, hessian_loss

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(nsamples=8, seqlen=48, batch_size=4, progress=False)


def _on_grid(scale: torch.Tensor, zero: torch.Tensor, bits: int,
             dtype: torch.dtype = torch.float16) -> bool:
    """Stored (dtype) scale and zero: -z/s is exactly an integer in the code range."""
    s, z = scale.to(dtype).double(), zero.to(dtype).double()
    if not (torch.equal(s, scale.double()) and torch.equal(z, zero.double())):
        return False  # not exact in the stored dtype
    zp = -z / s
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return bool((zp == zp.round()).all() and (zp >= lo).all() and (zp <= hi).all())


def _problem(out=48, n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1024, n, generator=g) @ torch.randn(n, n, generator=g) * 0.3 \
        + torch.randn(n, generator=g)
    W = torch.randn(out, n, generator=g) * 0.05 + 0.01
    W[:3, :32] = W[:3, :32].abs() + 0.02  # groups of one sign: zero outside the min/max range
    return W, X.T @ X / X.shape[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_integer_zero_scale_is_exact_and_near(dtype):
    g = torch.Generator().manual_seed(1)
    for bits in (2, 3, 4, 8):
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        s = torch.rand(200, 7, generator=g, dtype=torch.float64) * 0.1 + 1e-4
        s[0, 0] = 0.0
        s[1] = -s[1]
        zp = torch.randint(lo, hi + 1, s.shape, generator=g).double()
        t = integer_zero_scale(s, zp, dtype)
        assert torch.equal(t.to(dtype).double(), t)
        assert torch.equal((t * zp).to(dtype).double(), t * zp)
        assert bool((t[1] < 0).all()) and float(t[0, 0]) > 0
        rel = ((t - s).abs() / s.abs())[s != 0]
        steps = float(rel.max()) * ((1 << bits) - 1)
        assert steps <= integer_zero_error_bound(bits, dtype) * 1.0001
        sc, zr = integer_zero_params(s, -zp * s, bits, dtype, zp=zp)
        assert torch.equal(zero_points(sc, zr, bits), zp)


def test_precision_bound_refuses_coarse_combinations():
    Recipe(bits=4, integer_zeros=True)
    Recipe(bits=8, integer_zeros=True, param_dtype="float32")
    Recipe(bits=8, integer_zeros=True, sym=True)  # symmetric: zeros are 0 anyway
    with pytest.raises(ConfigError, match="float32"):
        Recipe(bits=8, integer_zeros=True)
    with pytest.raises(ConfigError, match="float32"):
        QuantSpec(bits=4, param_dtype="bfloat16", integer_zeros=True)
    with pytest.raises(ConfigError, match="true or false"):
        Recipe(integer_zeros="yes")
    assert "integer_zeros" not in Recipe().to_dict()
    assert Recipe.from_dict(Recipe(integer_zeros=True).to_dict()).integer_zeros


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 32), (4, 64), (4, -1)])
def test_rtn_and_gptq_zeros(bits, group):
    """Without the option RTN/GPTQ zeros are integer multiples of the scale up to the fp16
    rounding of z (and may leave the code range for groups of one sign); with it they are
    exact, in range, and cost little."""
    W, H = _problem()
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for fn in ("rtn", "gptq"):
        def run(iz, act_order=True):
            spec = QuantSpec(bits=bits, group_size=group, integer_zeros=iz,
                             options={"act_order": act_order} if fn == "gptq" else {})
            if fn == "rtn":
                return quantize_rtn(W, bits, group, integer_zero=iz)
            return gptq(W, H, spec)
        free, intz = run(False), run(True)
        zp = -free.zero.double() / free.scale.double()
        ulp = torch.finfo(torch.float16).eps * free.zero.double().abs() / free.scale.double()
        assert bool(((zp - zp.round()).abs() <= ulp + 1e-12).all())  # on the grid, up to fp16
        if fn == "rtn" and group == 32:  # one-sign groups: the zero point leaves the range
            assert float(zp[:3, 0].round().max()) < lo
        assert _on_grid(intz.scale, intz.zero, bits)
        assert bool((intz.codes >= lo).all() and (intz.codes <= hi).all())
        if fn == "gptq":
            assert _on_grid(*(lambda q: (q.scale, q.zero))(run(True, act_order=False)), bits)
        lf = float(hessian_loss(W, free.dequantize(), H).sum())
        li = float(hessian_loss(W, intz.dequantize(), H).sum())
        assert li < 1.25 * lf, (fn, li, lf)


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 32), (4, 48)])
def test_decoupleq_integer_zeros(bits, group):
    W, H = _problem()
    free, rf = decoupleq_solve(W, H, QuantSpec(bits=bits, group_size=group))
    intz, ri = decoupleq_solve(W, H, QuantSpec(bits=bits, group_size=group,
                                               integer_zeros=True))
    assert _on_grid(intz.scale, intz.zero, bits)
    assert not _on_grid(free.scale, free.zero, bits)  # the free solver leaves the grid
    assert all(b <= a * (1 + 1e-9) for a, b in zip(ri.losses, ri.losses[1:]))
    # the reported loss is the loss of exactly the stored weights
    exact = float(hessian_loss(W, intz.dequantize(), H).sum())
    assert exact == pytest.approx(ri.losses[-1], rel=1e-4)
    assert ri.losses[-1] >= rf.losses[-1] * 0.98   # a constraint: never much better
    assert ri.losses[-1] < rf.losses[-1] * 1.3
    # and better than round-to-nearest on the same integer grid
    rtn = quantize_rtn(W, bits, group, integer_zero=True)
    assert ri.losses[-1] < float(hessian_loss(W, rtn.dequantize(), H).sum())


def test_gqsa_is_refused(tiny_llama_dir, tmp_path, calib_file):
    with pytest.raises(ConfigError, match="integer zero points"):
        compress(tiny_llama_dir, tmp_path / "g", Recipe(method="gqsa", bits=4, group_size=16,
                                                         sparsity=0.5, integer_zeros=True),
                 calib=calib_file, **FAST)
    assert not (tmp_path / "g").exists()


def _check_exact_export(ck, tmp_path, name="ct"):
    """Export without --allow-rounding: no group off the grid, and the library's
    decompression (float32 scales) equals bitpress's dequantize exactly."""
    pytest.importorskip("compressed_tensors")
    from test_compressed_tensors import assert_library_dequantizes_exactly

    from bitpress.integrations.compressed_tensors import export_compressed_tensors

    rep = export_compressed_tensors(ck, tmp_path / name, progress=False)
    assert rep["zero_points_exact"] and rep["groups_inexact"] == 0 and rep["groups"] > 0
    rep = export_compressed_tensors(ck, tmp_path / f"{name}32", scale_dtype=torch.float32,
                                    progress=False)
    ref = bitpress.load(ck)
    assert_library_dequantizes_exactly(tmp_path / f"{name}32", ref, zero_points=True)
    return ref


@pytest.mark.parametrize("tune", ["float_parts", "bqpo"])
def test_decoupleq_with_block_tuning_exports_exactly(tiny_llama_dir, tmp_path, calib_file,
                                                     capsys, tune):
    from bitpress.cli import main

    ck = tmp_path / "q"
    s = compress(tiny_llama_dir, ck, Recipe(method="decoupleq", bits=2, group_size=32,
                                            integer_zeros=True),
                 calib=calib_file, block_tune=tune, tune_epochs=3, tune_lr=1e-3, **FAST)
    assert s["recipe"]["integer_zeros"] is True and s["block_tune"]["integer_zeros"] is True
    assert any(r["accepted"] for r in s["block_tune_losses"]), "tuning changed nothing"
    saved = json.loads((ck / "bitpress_summary.json").read_text())
    assert saved["recipe"]["integer_zeros"] is True
    qcfg = json.loads((ck / "config.json").read_text())["quantization_config"]
    assert qcfg["integer_zeros"] is True
    ref = _check_exact_export(ck, tmp_path)
    for m in packed_modules(ref).values():
        assert _on_grid(m.scales.float(), m.zeros.float(), 2)
    # the CLI export prints that the zero points are exact (no --allow-rounding needed)
    assert main(["export", str(ck), "--format", "compressed-tensors", "--out",
                 str(tmp_path / "cli")]) == 0
    assert "zero points: exact" in capsys.readouterr().out


def test_cli_flag_gptq(tiny_llama_dir, tmp_path, calib_file, capsys):
    from bitpress.cli import main

    ck = tmp_path / "g"
    assert main(["compress", str(tiny_llama_dir), "--out", str(ck), "--method", "gptq",
                 "--bits", "4", "--group-size", "32", "--integer-zeros", "--calib",
                 str(calib_file), "--nsamples", "8", "--seqlen", "48"]) == 0
    assert json.loads((ck / "bitpress_summary.json").read_text())["recipe"]["integer_zeros"]
    _check_exact_export(ck, tmp_path)


def test_finetune_keeps_zeros_tied(tiny_llama_dir, tmp_path, calib_file):
    """E2E fine-tuning with integer zeros trains the scales only (the gradient of the tied
    zeros included) and ends on the grid; off-grid checkpoints are moved onto it."""
    from bitpress.pipeline.finetune import finetune_float_parts, write_float_parts

    ck = tmp_path / "q"
    compress(tiny_llama_dir, ck, Recipe(method="rtn", bits=3, group_size=32,
                                        integer_zeros=True), **{**FAST, "progress": False})
    model = bitpress.load(ck)
    zp0 = {n: zero_points(m.scales, m.zeros, 3) for n, m in packed_modules(model).items()}
    s0 = {n: m.scales.clone() for n, m in packed_modules(model).items()}
    ids = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(0))
    res = finetune_float_parts(model, ids, steps=6, lr=3e-3, progress=False, evaluate=True,
                               integer_zeros=True)
    assert res["integer_zeros"] and res["loss_after"] < res["loss_before"]
    for n, m in packed_modules(model).items():
        assert m.scales.dtype == torch.float16
        assert _on_grid(m.scales.float(), m.zeros.float(), 3)
        assert torch.equal(zero_points(m.scales, m.zeros, 3), zp0[n])
    assert any(not torch.equal(m.scales, s0[n]) for n, m in packed_modules(model).items())
    out = write_float_parts(model, ck, tmp_path / "ft")
    _check_exact_export(out, tmp_path)
    # the chain rule through z = -zp·s: one plain-SGD-like step direction check
    m2 = bitpress.load(ck)
    mod = next(iter(packed_modules(m2).values()))
    for p in mod.float_parts_trainable(True):
        p.requires_grad_(True)
    x = torch.randn(3, mod.in_features, generator=torch.Generator().manual_seed(1))
    mod(x).pow(2).sum().backward()
    zp = zero_points(mod.scales, mod.zeros, 3).float()
    tied = mod.scales.grad - zp * mod.zeros.grad
    with torch.no_grad():
        w = QuantizedWeight(mod.quantized_weight().codes, mod.scales.detach(),
                            mod.zeros.detach(), 3, 32)
    s = mod.scales.detach().clone().requires_grad_(True)
    from bitpress.formats import expand_groups
    wt = expand_groups(s, 32, mod.in_features) * w.codes.float() \
        + expand_groups(-zp * s, 32, mod.in_features)
    (x @ wt.T).pow(2).sum().backward()
    torch.testing.assert_close(tied, s.grad, rtol=1e-4, atol=1e-5)
    mod.float_parts_trainable(False)


def test_cli_finetune_follows_the_checkpoint(tiny_llama_dir, tmp_path, calib_file, capsys):
    """`bitpress finetune` keeps the zeros tied on its own for a checkpoint compressed with
    integer zeros (its quantization_config says so)."""
    from bitpress.cli import main

    ck = tmp_path / "q"
    assert main(["compress", str(tiny_llama_dir), "--out", str(ck), "--bits", "2",
                 "--group-size", "32", "--integer-zeros"]) == 0
    out = tmp_path / "ft"
    assert main(["finetune", str(ck), "--text", str(calib_file), "--out", str(out),
                 "--steps", "3", "--nsamples", "4", "--seqlen", "32", "--lr", "3e-3"]) == 0
    assert '"integer_zeros": true' in capsys.readouterr().out
    model = bitpress.load(out)
    for m in packed_modules(model).values():
        assert _on_grid(m.scales.float(), m.zeros.float(), 2)
    assert any(not torch.equal(a.scales, b.scales) for a, b in
               zip(packed_modules(model).values(), packed_modules(bitpress.load(ck)).values()))
