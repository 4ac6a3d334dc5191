"""The lean per-call path of QuantLinear (kernel plans) and bitpress.nn.fuse (one packed
call for linears sharing an input, packed output head)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bitpress.errors import ConfigError
from bitpress.kernels import use_impl
from bitpress.nn import GroupSparseLinear, HalfLinear, QuantLinear, Recipe, replace_linears
from bitpress.nn.fuse import fuse_linears, fuse_norms, pack_output_head, unfuse_linears
from bitpress.pipeline.arch import FUSED_PROJECTIONS

QKV_GATE_UP = FUSED_PROJECTIONS["llama"]

cpu = pytest.importorskip("bitpress.kernels.cpu", reason="bitpress._C CPU kernels not built")


class Block(nn.Module):
    """Llama-like sibling names: q/k/v share x, gate/up share h."""

    def __init__(self, d: int = 96, kv: int = 32, ff: int = 160, bias: bool = False):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=bias), nn.Linear(d, kv, bias=bias)
        self.v_proj, self.o_proj = nn.Linear(d, kv, bias=bias), nn.Linear(d, d, bias=bias)
        self.gate_proj, self.up_proj = nn.Linear(d, ff, bias=bias), nn.Linear(d, ff, bias=bias)
        self.down_proj = nn.Linear(ff, d, bias=bias)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        h = self.o_proj(q) + torch.cat([k, v], -1).sum(-1, keepdim=True)
        return self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


def _model(bits=2, gs=32, bias=False, seed=0):
    torch.manual_seed(seed)
    m = Block(bias=bias)
    replace_linears(m, Recipe(bits=bits, group_size=gs))
    return m.eval()


@pytest.mark.parametrize("mode", ["lut", "int8", "exact"])
@pytest.mark.parametrize("bits,bias", [(2, False), (4, True), (3, False)])
def test_fused_equals_unfused_bit_for_bit(mode, bits, bias):
    m = _model(bits, 32, bias)
    prev = cpu.get_act_mode()
    cpu.set_act_mode(mode)
    try:
        with torch.inference_mode():
            xs = [torch.randn(1, 96), torch.randn(1, 1, 96), torch.randn(3, 5, 96)]
            ref = [m(x) for x in xs]
            parts = [(m.q_proj(x), m.k_proj(x), m.v_proj(x)) for x in xs]
            assert fuse_linears(m, QKV_GATE_UP) == 2
            for x, r, p in zip(xs, ref, parts):
                assert torch.equal(m(x), r)
                got = (m.q_proj(x), m.k_proj(x), m.v_proj(x))
                for a, b in zip(got, p):
                    assert torch.equal(a, b) and a.is_contiguous() and a.shape == b.shape
            # members called out of order, or alone, still get their own rows
            x = xs[2]
            assert torch.equal(m.v_proj(x), parts[2][2])
            assert torch.equal(m.q_proj(x), parts[2][0])
            assert torch.equal(m.v_proj(x), parts[2][2])
    finally:
        cpu.set_act_mode(prev)


def test_fused_state_dict_unchanged_and_unfuse():
    m = _model()
    keys = {k: v.clone() for k, v in m.state_dict().items()}
    fuse_linears(m, QKV_GATE_UP)
    with torch.no_grad():
        m(torch.randn(2, 96))
    assert set(m.state_dict()) == set(keys)
    assert all(torch.equal(v, keys[k]) for k, v in m.state_dict().items())
    assert unfuse_linears(m) == 5 and unfuse_linears(m) == 0


def test_fused_group_sees_weight_updates_and_new_inputs():
    m = _model(bits=2)
    fuse_linears(m, QKV_GATE_UP)
    x = torch.randn(1, 96)
    with torch.no_grad():
        m(x)
        m.k_proj.scales.mul_(2)  # in-place update of one member: the group rebuilds
        got = m.q_proj(x), m.k_proj(x), m.v_proj(x)
        unfuse_linears(m)
        want = m.q_proj(x), m.k_proj(x), m.v_proj(x)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        fuse_linears(m, QKV_GATE_UP)
        m.q_proj(x)
        x.mul_(3)  # same tensor, new version: no stale hand-out
        assert torch.equal(m.k_proj(x), want[1] * 0 + m.k_proj.__dict__["_fused"]._fused(x)[:, 96:128])
        unfuse_linears(m)
        assert torch.equal(m.v_proj(x), m.v_proj(x.clone()))


def test_fused_falls_back_for_autograd_reference_and_other_dtypes():
    m = _model(bits=4)
    fuse_linears(m, QKV_GATE_UP)
    x = torch.randn(2, 96, requires_grad=True)
    with use_impl("reference"):
        y = m(x)  # autograd through the op
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad(), use_impl("reference"):
        xr = torch.randn(2, 96)
        torch.testing.assert_close(m.q_proj(xr), xr @ m.q_proj.dequantize().t())
    with torch.no_grad():
        xb = torch.randn(2, 96).bfloat16()
        assert m(xb).dtype == torch.bfloat16
    m.k_proj.float_parts_trainable(True)  # parameters, not buffers: the group stays unfused
    with torch.no_grad():
        xf = torch.randn(1, 96)
        assert torch.equal(m.k_proj(xf), m.k_proj(xf))
        assert m.k_proj.__dict__["_fused"].fused() is None


def _check_mode_and_impl_reroute(q, x, y0):
    """A bound kernel plan follows the activation mode and a forced implementation: the
    ``exact`` mode is F.linear over the dequantised weight, back in the previous mode the
    plan gives ``y0`` again, and the reference implementation is F.linear."""
    prev = cpu.get_act_mode()
    try:
        cpu.set_act_mode("exact")
        torch.testing.assert_close(q(x), nn.functional.linear(x, q.dequantize(), q.bias),
                                   rtol=1e-5, atol=1e-5)
    finally:
        cpu.set_act_mode(prev)
    assert torch.equal(q(x), y0)
    with use_impl("reference"):
        torch.testing.assert_close(q(x), nn.functional.linear(x, q.dequantize(), q.bias))


def test_fast_path_revalidates():
    """The bound kernel plan of a module: same numbers as the regular path; mode, forced
    implementation, in-place updates and replaced buffers all re-route the call."""
    torch.manual_seed(1)
    q = QuantLinear.from_linear(nn.Linear(128, 40), bits=2, group_size=64)
    x = torch.randn(3, 128)
    with torch.no_grad():
        y0 = q(x)
        assert "_fast" in q.__dict__
        assert torch.equal(q(x), cpu.dense_qmm_cpu(x, q.qweight, q.scales, q.zeros, q.bias, 2,
                                                    64, 128))
        _check_mode_and_impl_reroute(q, x, y0)
        q.zeros.add_(0.01)
        torch.testing.assert_close(q(x), cpu.dense_qmm_cpu(x, q.qweight, q.scales, q.zeros,
                                                           q.bias, 2, 64, 128))
        q.bias = torch.zeros(40)
        torch.testing.assert_close(q(x), cpu.dense_qmm_cpu(x, q.qweight, q.scales, q.zeros,
                                                           None, 2, 64, 128))
        assert q(x[:, :0].new_empty(0, 128)).shape == (0, 40)
        with pytest.raises(RuntimeError, match="expected 128"):
            q(torch.randn(2, 127))


@pytest.mark.parametrize("bits", [2, 4])
def test_sparse_fast_path_revalidates(bits):
    """GroupSparseLinear binds its kernel plan too: same numbers as the regular path; mode,
    forced implementation, in-place updates, replaced buffers and GEMM-sized calls re-route."""
    torch.manual_seed(3)
    q = GroupSparseLinear.from_linear(nn.Linear(160, 44), bits=bits, group_size=16,
                                      sparsity=0.5)
    args = lambda: (q.row_ptr, q.col_idx, q.qvalues, q.scales, q.zeros, q.bias, bits, 16, 160)
    x = torch.randn(3, 160)
    with torch.no_grad():
        y0 = q(x)
        assert "_fast" in q.__dict__
        assert torch.equal(y0, cpu.sparse_qmm_cpu(x, *args()))
        _check_mode_and_impl_reroute(q, x, y0)
        q.zeros.add_(0.01)
        torch.testing.assert_close(q(x), cpu.sparse_qmm_cpu(x, *args()))
        q.bias = torch.zeros(44)
        torch.testing.assert_close(q(x), cpu.sparse_qmm_cpu(x, *args()))
        big = torch.randn(cpu.get_gemm_rows(), 160)  # the exact GEMM path, bit for bit
        with use_impl("reference"):
            ref = q(big)
        assert torch.equal(q(big), ref)
        assert q(x[:, :0].new_empty(0, 160)).shape == (0, 44)
        with pytest.raises(RuntimeError, match="expected 160"):
            q(torch.randn(2, 159))


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.head = nn.Linear(64, 50, bias=False)
        self.head.weight = self.emb.weight  # tied

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, m):
        self.head = m

    def forward(self, ids):
        return self.head(self.emb(ids))


def test_pack_output_head_keeps_embedding_float():
    torch.manual_seed(2)
    m = _Head()
    w = m.emb.weight.detach().clone()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        ref = m(ids)
        q = pack_output_head(m, bits=4, group_size=32)
        assert isinstance(m.head, QuantLinear) and q is m.head
        assert torch.equal(m.emb.weight, w)
        out = m(ids)
    assert (out - ref).norm() < 0.2 * ref.norm()
    with pytest.raises(ConfigError):
        pack_output_head(nn.Linear(3, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pack_output_head_16_bit(dtype):
    torch.manual_seed(4)
    m = _Head()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref = m(ids)
        wh = m.head.weight.detach().to(dtype).float()
        h = pack_output_head(m, bits=16, param_dtype=dtype)
        assert isinstance(m.head, HalfLinear) and h is m.head and h.weight.dtype == dtype
        out = m(ids)  # 4 rows: the native kernel
        exact = torch.nn.functional.linear(m.emb(ids).double(), wh.double(),
                                           None if m.head.bias is None else m.head.bias.double())
        assert (out.double() - exact).abs().max() < 1e-5 * exact.abs().max() + 1e-6
        assert (out - ref).abs().max() < (2e-3 if dtype == torch.float16 else 2e-2) * ref.abs().max()
        big = torch.randint(0, 50, (1, HalfLinear.KERNEL_ROWS + 3))  # torch path
        torch.testing.assert_close(m(big), torch.nn.functional.linear(
            m.emb(big), wh, m.head.bias), rtol=1e-5, atol=1e-5)
    x = m.emb(ids).detach().requires_grad_()  # autograd reaches x through the torch path
    m.head(x).sum().backward()
    torch.testing.assert_close(x.grad, wh.sum(0).expand_as(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError):
        HalfLinear.from_linear(nn.Linear(4, 4), dtype=torch.float32)
    big_w = nn.Linear(4, 2)
    with torch.no_grad():
        big_w.weight[0, 0] = 1e6
    with pytest.raises(ConfigError):
        HalfLinear.from_linear(big_w)
    HalfLinear.from_linear(big_w, dtype=torch.bfloat16)  # bf16 has the range


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fuse_norms_replaces_rmsnorm_same_outputs_and_state_dict(arch):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    torch.manual_seed(3)
    m = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    with torch.no_grad():  # non-trivial norm weights
        for mod in m.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.uniform_(0.5, 1.5)
    ids = torch.randint(0, 512, (2, 9))
    keys = sorted(m.state_dict())
    with torch.no_grad():
        ref = m(ids).logits
        n = fuse_norms(m)
        out = m(ids).logits
    assert n == 2 * 2 + 1  # two per block, the final norm
    assert sum(isinstance(x, nn.RMSNorm) for x in m.modules()) == n
    assert sorted(m.state_dict()) == keys
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert fuse_norms(m) == 0  # already fused
    # the weight is shared, not copied: training or loading still reaches it
    w = m.model.norm.weight
    with torch.no_grad():
        w.mul_(2.0)
    assert torch.equal(m.state_dict()["model.norm.weight"], w)


class GemmaLikeRMSNorm(nn.Module):
    """(1 + weight) scaling: must fail the probe and stay."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * 0.1)
        self.variance_epsilon = 1e-6

    def forward(self, x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(v + self.variance_epsilon)) * (1.0 + self.weight)


def test_fuse_norms_keeps_modules_whose_formula_differs():
    m = nn.Sequential(GemmaLikeRMSNorm(32), nn.Linear(32, 4))
    assert fuse_norms(m) == 0
    assert isinstance(m[0], GemmaLikeRMSNorm)
