"""GPTQ's Hessian preparation: the in-place version computes exactly the textbook numbers,
and holds about one n² float64 buffer (not four)."""
import importlib
import sys

import pytest
import torch

from bitpress.pipeline.memory import proc_status, reset_peak_rss
from bitpress.quant import prepare_hessian

gptq_mod = importlib.import_module("bitpress.quant.gptq")


def _textbook(H, damp=0.01, act_order=False, perm=None):
    """The straightforward sequence, with every intermediate its own n² matrix."""
    Hd = H.double()
    Hd = (Hd + Hd.T) * 0.5
    dead = torch.diagonal(Hd) <= 0
    Hd[dead, :] = 0.0
    Hd[:, dead] = 0.0
    Hd[dead, dead] = 1.0
    if perm is None and act_order:
        perm = torch.argsort(torch.diagonal(Hd), descending=True, stable=True)
    if perm is not None:
        Hd = Hd[perm][:, perm]
    mean = float(torch.diagonal(Hd).mean())
    rel = damp
    while True:
        A = Hd.flip(0, 1).clone()
        torch.diagonal(A).add_(rel * mean)
        M, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            Minv = torch.linalg.solve_triangular(M, torch.eye(len(A), dtype=A.dtype),
                                                 upper=False)
            return Minv.flip(0, 1).float(), perm, dead, rel * mean
        rel = max(rel * 10, 1e-6)


@pytest.mark.parametrize("n", [1, 7, 200, 700, 1100])
@pytest.mark.parametrize("case", ["plain", "dead", "asym", "act_order", "perm"])
def test_prepare_hessian_equals_the_textbook_sequence(n, case):
    g = torch.Generator().manual_seed(n)
    X = torch.randn(2 * n + 5, n, generator=g) * torch.exp(torch.randn(n, generator=g))
    H = X.T @ X / X.shape[0]
    kw = {}
    if case == "dead" and n > 1:
        d = torch.randperm(n, generator=g)[: max(1, n // 8)]
        H[d, :] = 0.0
        H[:, d] = 0.0
    if case == "asym":
        H = H + 1e-3 * torch.randn(n, n, generator=g)
        torch.diagonal(H).abs_()
    if case == "act_order":
        kw["act_order"] = True
    if case == "perm":
        kw["perm"] = torch.randperm(n, generator=g)
    H0 = H.clone()
    f = prepare_hessian(H, **kw)
    U, perm, dead, damp = _textbook(H, **kw)
    assert torch.equal(H, H0)  # input untouched
    assert torch.equal(f.U, U)
    assert f.damp == damp
    assert torch.equal(f.dead, dead)
    assert (f.perm is None) == (perm is None) and (perm is None or torch.equal(f.perm, perm))


def test_prepare_hessian_retries_damping_in_place():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 60, dtype=torch.float64, generator=g)
    H = (X.T @ X).float()  # rank 10: the undamped Cholesky fails
    f = prepare_hessian(H, damp=0.0)
    U, _, _, damp = _textbook(H, damp=0.0)
    assert f.damp == damp > 0
    assert torch.equal(f.U, U)




@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS via /proc")
def test_prepare_hessian_holds_one_float64_copy():
    """Peak RSS above the start while preparing a 2048² Hessian: one float64 work buffer
    (33.5 MB, narrowed in place to the float32 result) + slabs, where the chain of out-of-place
    steps (float64 copy, flipped copy, LAPACK's column-major copy, inverse) held ≥ 4."""
    if not reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    try:  # as the streamed pipeline does: large buffers mmap-ed, given back when freed (else
        import ctypes  # glibc's heap may keep freed slabs resident and blur the figure)

        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pytest.skip("glibc's mallopt is not available")
    n = 2048
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, n, generator=g)
    H = X.T @ X / 512
    del X
    prepare_hessian(H[:300, :300].contiguous())  # load LAPACK's code and buffers first
    reset_peak_rss()
    start = proc_status()["VmRSS"]
    f = prepare_hessian(H)
    grew = proc_status()["VmHWM"] - start
    f64 = 8 * n * n
    assert f.U.shape == (n, n)
    # 1 float64 n² (U is narrowed into its first half) + slabs/chunks (the out-of-place
    # chain: 176 MiB; with a separate float32 U: 60 MiB)
    assert grew < f64 + 28 * 2**20, f"peak grew {grew / 2**20:.0f} MiB"  # measured 52 MiB
    assert f.U.untyped_storage().nbytes() == f64  # the work buffer's own pages
    held = proc_status()["VmRSS"] - start  # its other half went back to the OS (Linux madvise)
    assert held < f64 // 2 + 16 * 2**20, f"U holds {held / 2**20:.0f} MiB"


def test_chunked_error_report_matches_the_direct_formula():
    from bitpress.quant.gptq import hessian_error_terms

    g = torch.Generator().manual_seed(3)
    for out, n, chunk in ((70, 300, 64), (5, 1030, 512), (600, 9, 512)):
        X = torch.randn(2 * n, n, generator=g)
        H = X.T @ X / (2 * n)
        W = torch.randn(out, n, generator=g)
        What = W + 0.01 * torch.randn(out, n, generator=g)
        num, den = hessian_error_terms(W, What, H, chunk=chunk)
        E, Hd = (What.double() - W.double()), H.double()
        num0, den0 = ((E @ Hd) * E).sum(), ((W.double() @ Hd) * W.double()).sum()
        assert abs(float(num / num0) - 1) < 1e-10 and abs(float(den / den0) - 1) < 1e-10
