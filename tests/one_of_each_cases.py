"""Outputs of the passes that share one error-feedback loop, one clipping search and one
dequantizer, on fixed-seed random problems (issue 30, "one of each").

``python tests/one_of_each_cases.py record OUT.safetensors`` writes them;
``python tests/one_of_each_cases.py compare A B`` reports, per tensor, whether two recordings
are bit-identical (``torch.equal``) and the largest difference. Run ``record`` before and
after a refactor of the shared routines to show what changed.
"""
from __future__ import annotations

import sys

import torch

from bitpress.formats import QuantizedWeight
from bitpress.quant import QuantSpec, decoupleq, gptq, gptq_round_fixed_grid, prepare_hessian
from bitpress.sparse import gqsa, semi_structured_24, unstructured


def problem(seed: int, out: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and a correlated, slightly ill-conditioned Hessian ``XᵀX/m``."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g)
    X = torch.randn(4 * n, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))
    X[:, 3] = 0.0                                         # one dead input
    return W, X.T @ X / X.shape[0]


def _qw(prefix: str, q, res: dict[str, torch.Tensor]) -> None:
    if not isinstance(q, QuantizedWeight):               # MaskedQuantizedWeight
        res[prefix + ".mask"] = q.mask.to(torch.uint8)
        q = q.qweight
    res[prefix + ".codes"] = q.codes
    res[prefix + ".scale"] = q.scale
    res[prefix + ".zero"] = q.zero
    if q.keep is not None:
        res[prefix + ".keep"] = q.keep.to(torch.uint8)


def outputs() -> dict[str, torch.Tensor]:
    res: dict[str, torch.Tensor] = {}
    W, H = problem(0, 48, 160)          # 160 = 5 groups of 32, ragged at 64 / block 128
    W2, H2 = problem(1, 40, 96)
    for name, spec in {
        "gptq_g32": QuantSpec(bits=3, group_size=32),
        "gptq_g64_clip": QuantSpec(bits=4, group_size=64, options={"clip_search": True}),
        "gptq_pc_clip": QuantSpec(bits=4, group_size=-1, options={"clip_search": True}),
        "gptq_act": QuantSpec(bits=3, group_size=32, options={"act_order": True}),
        "gptq_act_clip_sym": QuantSpec(bits=4, group_size=32, sym=True,
                                       options={"act_order": True, "clip_search": True}),
        "gptq_bs16": QuantSpec(bits=2, group_size=16, options={"block_size": 40}),
        # float32 parameters: no fp16 rounding hides last-ulp differences of the grids
        "gptq_g32_fp32": QuantSpec(bits=3, group_size=32, param_dtype="float32"),
    }.items():
        _qw(name, gptq(W, H, spec), res)
    q = gptq(W2, H2, QuantSpec(bits=4, group_size=32))
    res["fixed_grid"] = gptq_round_fixed_grid(W2 * 1.1, H2, q.scale, q.zero, 4, 32)
    res["fixed_grid_act"] = gptq_round_fixed_grid(
        W2 * 1.1, prepare_hessian(H2, act_order=True), q.scale, q.zero, 4, 32)
    for name, spec in {
        "dq_g32": QuantSpec(bits=2, group_size=32, options={"iters": 2}),
        "dq_pc": QuantSpec(bits=3, group_size=-1, options={"iters": 2}),
        "dq_g32_sym_pgd": QuantSpec(bits=2, group_size=32, sym=True,
                                    options={"iters": 1, "int_step": "pgd", "pgd_steps": 5}),
        "dq_g64_bs16": QuantSpec(bits=4, group_size=64, options={"iters": 1, "block_size": 16}),
        "dq_g32_fp32": QuantSpec(bits=2, group_size=32, param_dtype="float32",
                                 options={"iters": 2}),
    }.items():
        _qw(name, decoupleq(W, H, spec), res)
    for name, spec in {
        "gqsa": QuantSpec(bits=4, group_size=16, sparsity=0.5),
        "gqsa_clip": QuantSpec(bits=3, group_size=16, sparsity=0.4,
                               options={"clip_search": True, "mask": "global"}),
        "gqsa_fp32": QuantSpec(bits=4, group_size=16, sparsity=0.5, param_dtype="float32"),
        "gqsa_nocomp": QuantSpec(bits=4, group_size=32, sparsity=0.5,
                                 options={"compensate": False, "clip_search": True}),
    }.items():
        _qw(name, gqsa(W, H, spec), res)
    _qw("sgpt24", semi_structured_24(W, H, QuantSpec(bits=4, group_size=32)), res)
    _qw("unstructured", unstructured(W2, H2, QuantSpec(bits=3, group_size=32, sparsity=0.6)),
        res)
    from bitpress.cache.quant import quantize_weight, search_act_range
    g = torch.Generator().manual_seed(5)
    wc = torch.randn(12, 8, 3, 3, generator=g) * torch.rand(12, 1, 1, 1, generator=g)
    for name, (qmin, qmax) in {"w8": (-64, 63), "w4": (-8, 7)}.items():
        c, s = quantize_weight(wc, qmin, qmax)
        res[f"cache_{name}.codes"], res[f"cache_{name}.scale"] = c, s
    x = torch.randn(3, 50_000, generator=g).abs() ** 1.5 - 0.3
    lo, hi = search_act_range(x, generator=torch.Generator().manual_seed(6))
    res["cache_act_range"] = torch.tensor([lo, hi], dtype=torch.float64)
    # dequantizers: dense and group-sparse, through the logical and the packed forms
    from bitpress.kernels import reference as ref
    for name in ("gptq_g32", "gqsa"):
        qw = QuantizedWeight(res[name + ".codes"], res[name + ".scale"], res[name + ".zero"],
                             4 if name == "gqsa" else 3, 16 if name == "gqsa" else 32,
                             None if name == "gptq_g32" else res[name + ".keep"].bool())
        res[name + ".deq"] = qw.dequantize()
        if qw.keep is None:
            p = qw.pack_dense()
            res[name + ".deq_ref"] = ref.dense_weight(p["qweight"], p["scales"], p["zeros"],
                                                      qw.bits, qw.gs, qw.in_features)
        else:
            p = qw.pack_bsr()
            res[name + ".deq_ref"] = ref.sparse_weight(p["row_ptr"], p["col_idx"], p["qvalues"],
                                                       p["scales"], p["zeros"], qw.bits, qw.gs,
                                                       qw.in_features)
    return {k: v.contiguous() for k, v in res.items()}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    lines = []
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            lines.append(f"{k}: only in {'first' if k in a else 'second'}")
            continue
        x, y = a[k], b[k]
        if torch.equal(x, y):
            lines.append(f"{k}: identical")
            continue
        d = (x.double() - y.double()).abs()
        lines.append(f"{k}: DIFFERENT max|diff| {float(d.max()):.3g}, "
                     f"{int((d > 0).sum())}/{d.numel()} entries differ")
    return lines


if __name__ == "__main__":
    torch.set_num_threads(1)
    from safetensors.torch import load_file, save_file
    if sys.argv[1] == "record":
        save_file(outputs(), sys.argv[2])
    else:
        print("\n".join(compare(load_file(sys.argv[2]), load_file(sys.argv[3]))))
