"""The kernels' runtime-layout allocator (bitpress.kernels.cpu.hugebuf): huge-page chunks,
views that keep their memory alive, the plain fallback, and kernels that read from both."""
from __future__ import annotations

import gc
import mmap
import sys

import pytest
import torch

pytest.importorskip("bitpress._C")
from bitpress.kernels import cpu  # noqa: E402
from bitpress.kernels.cpu import hugebuf  # noqa: E402

linux = pytest.mark.skipif(not sys.platform.startswith("linux") or
                           not hasattr(mmap, "MADV_HUGEPAGE"), reason="Linux madvise only")


@pytest.fixture
def chunked(monkeypatch):
    """The chunk path whatever this machine's THP setting (madvise succeeds either way)."""
    monkeypatch.setenv("BITPRESS_HUGEPAGES", "1")
    monkeypatch.setattr(hugebuf, "_thp_mode", lambda: "madvise")
    hugebuf.reset()
    yield
    hugebuf.reset()


@linux
def test_buffers_are_disjoint_aligned_and_survive_their_chunk(chunked):
    g = torch.Generator().manual_seed(0)
    sizes = [int(v) for v in torch.randint(1, 3 << 20, (40,), generator=g)] + [70 << 20, 5]
    bufs = [hugebuf.empty(n) for n in sizes]
    assert hugebuf.empty(4096).data_ptr() % hugebuf.ALIGN == 0
    for i, (b, n) in enumerate(zip(bufs, sizes)):
        assert b.dtype == torch.uint8 and b.numel() == n and b.is_contiguous()
        assert b.data_ptr() % hugebuf.ALIGN == 0
        b.fill_(i % 251)
    spans = sorted((b.data_ptr(), b.data_ptr() + b.numel()) for b in bufs)
    assert all(e0 <= s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))
    # a chunk starts on a 2 MiB boundary; the 70 MiB buffer got a chunk of its own
    hugebuf.reset()
    assert hugebuf.empty(100).data_ptr() % hugebuf.HUGE == 0
    hugebuf.reset()
    for _ in range(3):  # new chunks do not disturb live views of old ones
        hugebuf.empty(1 << 20).fill_(255)
    gc.collect()
    for i, b in enumerate(bufs):
        assert int(b.min()) == int(b.max()) == i % 251


@linux
def test_a_chunk_is_unmapped_with_its_last_view(chunked):
    import weakref
    b = hugebuf.empty(1 << 20)
    ref = hugebuf._current[0].ref
    assert isinstance(ref, weakref.ref) and ref() is not None
    del b
    gc.collect()
    assert ref() is None
    assert hugebuf.empty(10).numel() == 10  # the allocator starts a new chunk


def test_fallback_is_plain_torch_memory(monkeypatch):
    monkeypatch.setenv("BITPRESS_HUGEPAGES", "0")
    assert not hugebuf.enabled()
    b = hugebuf.empty(12345)
    assert b.dtype == torch.uint8 and b.numel() == 12345
    assert hugebuf.empty(0).numel() == 0
    monkeypatch.setenv("BITPRESS_HUGEPAGES", "1")
    monkeypatch.setattr(hugebuf, "_thp_mode", lambda: "never")
    assert not hugebuf.enabled()


@pytest.mark.parametrize("huge", ["0", "1"])
def test_kernels_read_either_memory_alike(monkeypatch, huge):
    """Dense and sparse kernels give the same outputs on chunk-backed and plain layouts."""
    from bitpress.kernels import reference
    monkeypatch.setenv("BITPRESS_HUGEPAGES", huge)
    cpu.clear_cache()
    g = torch.Generator().manual_seed(1)
    out, inf, gs = 40, 96, 32
    qw = torch.randint(-2 ** 31, 2 ** 31 - 1, (out, inf // 8), dtype=torch.int32, generator=g)
    sc = (torch.rand(out, inf // gs, generator=g) * 0.1 + 0.01).half()
    zr = (torch.rand(out, inf // gs, generator=g) * 0.1).half()
    x = torch.randn(3, inf, generator=g)
    ref = reference.dense_qmm_ref(x, qw, sc, zr, None, 4, gs, inf)
    y = cpu.dense_qmm_cpu(x, qw, sc, zr, None, 4, gs, inf, mode="exact")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    keep = torch.rand(out, inf // gs, generator=g) < 0.5
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.int32), keep.sum(1).cumsum(0).int()])
    col_idx = keep.nonzero()[:, 1].int().contiguous()
    nnz = col_idx.numel()
    qv = torch.randint(-2 ** 31, 2 ** 31 - 1, (nnz, gs // 8), dtype=torch.int32, generator=g)
    ssc = (torch.rand(nnz, generator=g) * 0.1 + 0.01).half()
    szr = (torch.rand(nnz, generator=g) * 0.1).half()
    ref = reference.sparse_qmm_ref(x, row_ptr, col_idx, qv, ssc, szr, None, 4, gs, inf)
    y = cpu.sparse_qmm_cpu(x, row_ptr, col_idx, qv, ssc, szr, None, 4, gs, inf, mode="exact")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    cpu.clear_cache()
