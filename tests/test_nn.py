"""Drop-in modules and recipe-driven replacement."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bitpress.errors import ConfigError
from bitpress.formats import QuantizedWeight, quantize_rtn
from bitpress.nn import GroupSparseLinear, QuantLinear, Recipe, replace_linears
from bitpress.kernels import use_impl
from bitpress.nn.modules import packed_module_from_scheme


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128), (4, 128), (4, -1), (8, 32)])
def test_quant_linear_matches_fake_quant(bits, group):
    torch.manual_seed(0)
    lin = nn.Linear(576, 70, bias=True)
    q = QuantLinear.from_linear(lin, bits=bits, group_size=group)
    expect_w = quantize_rtn(lin.weight.detach(), bits, group).dequantize()
    torch.testing.assert_close(q.dequantize(), expect_w)
    x = torch.randn(2, 5, 576)
    expect = nn.functional.linear(x, expect_w, lin.bias)
    with use_impl("reference"):
        torch.testing.assert_close(q(x), expect, rtol=1e-4, atol=1e-4)
    # whatever fast kernel is registered stays close (its exact bound is tested with it)
    assert (q(x) - expect).abs().max() <= 0.02 * expect.abs().max()
    assert set(q.state_dict()) == {"qweight", "scales", "zeros", "bias"}
    assert q.qweight.dtype == torch.int32 and q.scales.dtype == torch.float16


def test_group_sparse_linear_prunes_and_matches():
    torch.manual_seed(0)
    lin = nn.Linear(200, 40, bias=False)
    m = GroupSparseLinear.from_linear(lin, bits=4, group_size=16, sparsity=0.5)
    assert abs(m.sparsity - 0.5) < 0.01
    assert set(m.state_dict()) == {"row_ptr", "col_idx", "qvalues", "scales", "zeros"}
    w = m.dequantize()
    # whole groups are zero and the kept groups are the largest ones
    zero_groups = (nn.functional.pad(w, (0, 8)).reshape(40, 13, 16) == 0).all(-1)
    assert abs(zero_groups.float().mean().item() - 0.5) < 0.02
    x = torch.randn(3, 200)
    with use_impl("reference"):
        torch.testing.assert_close(m(x), x @ w.t(), rtol=1e-4, atol=1e-4)
    assert (m(x) - x @ w.t()).abs().max() <= 0.02 * (x @ w.t()).abs().max()


def test_conv1d_is_transposed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 96)  # nx=96 in, nf=48 out; weight [96, 48]
    q = QuantLinear.from_linear(conv, bits=8, group_size=32)
    x = torch.randn(2, 96)
    with use_impl("reference"):
        torch.testing.assert_close(q(x), conv(x), rtol=0.02, atol=0.02)


def test_replace_linears_patterns():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(64, 64)
            self.up_proj = nn.Linear(64, 128)
            self.emb = nn.Embedding(10, 64)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])
            self.lm_head = nn.Linear(64, 10)

    m = Model()
    schemes = replace_linears(m, Recipe(bits=4, group_size=32, ignore=["lm_head", "re:layers\\.1\\."]))
    assert set(schemes) == {"layers.0.q_proj", "layers.0.up_proj"}
    assert isinstance(m.layers[0].q_proj, QuantLinear)
    assert isinstance(m.layers[1].q_proj, nn.Linear) and isinstance(m.lm_head, nn.Linear)
    m2 = Model()
    replace_linears(m2, Recipe(bits=4, group_size=16, sparsity=0.25, targets=["*up_proj"]))
    assert isinstance(m2.layers[1].up_proj, GroupSparseLinear)
    assert isinstance(m2.layers[1].q_proj, nn.Linear)


def test_recipe_json_round_trip(tmp_path):
    r = Recipe(method="rtn", bits=3, group_size=64, sparsity=0.3, ignore=["lm_head"])
    p = tmp_path / "r.json"
    p.write_text(json.dumps(r.to_dict()))
    assert Recipe.from_json(p) == r
    with pytest.raises(ConfigError, match="unknown recipe keys"):
        Recipe.from_dict({"bitz": 4})
    for bad in (dict(bits=5), dict(group_size=1024), dict(sparsity=1.5),
                dict(group_size=-1, sparsity=0.5), dict(param_dtype="int8")):
        with pytest.raises(ConfigError):
            Recipe(**bad)


def test_scheme_rebuilds_module_and_float_parts_train():
    torch.manual_seed(0)
    lin = nn.Linear(96, 32)
    q = QuantLinear.from_linear(lin, bits=2, group_size=32)
    empty = packed_module_from_scheme(q.scheme(), 96, 32, True, torch.float16)
    empty.load_state_dict(q.state_dict())
    x = torch.randn(4, 96)
    torch.testing.assert_close(empty(x), q(x))
    with use_impl("reference"):  # autograd below runs through the op's backward formula
        params = q.float_parts_trainable()
        assert {p.shape for p in params} == {(32, 3), (32,)}
        loss = q(x).pow(2).sum()
        loss.backward()
    assert all(p.grad is not None for p in params)
    q.float_parts_trainable(False)
    assert q.scales.dtype == torch.float16 and not isinstance(q.scales, nn.Parameter)


def test_from_quantized_any_pass():
    torch.manual_seed(0)
    w = torch.randn(20, 64)
    qw = QuantizedWeight(torch.randint(-2, 2, (20, 64), dtype=torch.int8),
                         torch.rand(20, 2) + 0.5, torch.zeros(20, 2), 2, 32)
    m = QuantLinear.from_quantized(qw, param_dtype=torch.float32)
    torch.testing.assert_close(m.dequantize(), qw.dequantize())
    del w


def test_direct_kernel_path_equals_op_and_checks_shapes():
    """Outside autograd the module calls the selected kernel directly; same numbers as the
    op, forced implementations respected, wrong widths rejected."""
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(200, 24), bits=4, group_size=64)
    x = torch.randn(3, 200)
    with torch.no_grad():
        direct = q(x)
    op = torch.ops.bitpress.dense_qmm(x, q.qweight, q.scales, q.zeros, q.bias, 4, 64, 200)
    torch.testing.assert_close(direct, op)
    with torch.no_grad(), use_impl("reference"):
        torch.testing.assert_close(q(x), nn.functional.linear(x, q.dequantize(), q.bias))
    with pytest.raises(RuntimeError, match="expected 200"):
        q(torch.randn(3, 199))
