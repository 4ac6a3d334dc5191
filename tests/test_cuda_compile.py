"""Every ``bitpress/csrc/cuda/*.cu`` must compile with ``nvcc`` (for sm_80 and sm_90), so a CUDA
kernel that does not compile cannot land even on a machine without a GPU. With CuPy and a GPU,
the hand-written GEMV is also checked against the reference. The tensor-core kernels
(``qmma.cu``, 96 entry points) are checked in tests/test_cuda_mma.py (a representative subset
fast, every entry point in a slow test)."""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "bitpress" / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")
ARCHS = ("80", "90")


def test_there_are_cuda_sources():
    assert CU_FILES, "bitpress/csrc/cuda/*.cu is empty"


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not installed")
@pytest.mark.parametrize("path", [p for p in CU_FILES if p.name != "qmma.cu"],
                         ids=lambda p: p.name)
def test_cu_file_compiles(path, tmp_path):
    # sm_80: full compile to an object (front end + ptxas); sm_90: to PTX, whose entry
    # points are checked. The two run side by side to keep the suite fast.
    cmds = [
        [NVCC, "-c", "-O3", "--std=c++14", f"-arch=sm_{ARCHS[0]}", "-o", str(tmp_path / "k.o"),
         str(path)],
        [NVCC, "--ptx", "--std=c++14", f"-arch=sm_{ARCHS[1]}", "-o", str(tmp_path / "k.ptx"),
         str(path)],
    ]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    for cmd, p in zip(cmds, procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{out}\n{err}"
    entries = set(re.findall(r"\.entry\s+(\w+)", (tmp_path / "k.ptx").read_text()))
    assert entries, f"{path.name} defines no kernels"
    if path.name == "qgemv.cu":  # the extern "C" entry points cuda_raw asks for
        want = {f"bitpress_qgemv_w{b}_x{x}_s{s}" for b in (2, 4) for x in range(3)
                for s in range(3)}
        assert want <= entries, f"missing entry points: {sorted(want - entries)}"


def _has_cupy_gpu() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_cupy_gpu(), reason="needs CuPy and a CUDA GPU")
@pytest.mark.parametrize("bits,gs,inf", [(2, 64, 4096), (4, 128, 1000), (2, -1, 520),
                                         (4, 32, 264)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_raw_gemv_matches_reference(bits, gs, inf, dtype):
    from bitpress.formats import quantize_rtn
    from bitpress.kernels import cuda_raw, reference

    out = 300
    qw = quantize_rtn(torch.randn(out, inf), bits, gs)
    p = {k: v.cuda() for k, v in qw.pack_dense(torch.float16).items()}
    for m in (1, 3):
        x = torch.randn(m, inf, device="cuda").to(dtype)
        bias = torch.randn(out, device="cuda").to(dtype)
        args = (x, p["qweight"], p["scales"], p["zeros"], bias, bits, qw.gs, inf)
        y = cuda_raw.cuda_raw_dense_qmm(*args)
        ref = reference.dense_qmm_ref(*args)
        mag = x.float().abs() @ qw.dequantize().cuda().abs().t()
        tol = 1e-5 * mag + ref.float().abs() * (2.0 ** -7) + 1e-4
        assert bool(((y.float() - ref.float()).abs() <= tol).all())
