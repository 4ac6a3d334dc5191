"""A CuPy-free way to run the tensor-core kernels: NVRTC (or nvcc) → cubin cached on disk →
``cuModuleLoadData`` / ``cuLaunchKernel`` through ctypes on torch's CUDA context.

Used by :mod:`.cuda_mma` when CuPy is missing (or ``BITPRESS_CUDA_LOADER=driver``):

* **compile once per machine**: the cubin of an entry point is cached under
  ``$BITPRESS_CUDA_CACHE`` (default ``~/.cache/bitpress/cuda``), keyed by a hash of the source,
  the architecture and the options; NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel or the
  system's ``libnvrtc``, else ``nvcc -cubin`` is run;
* **launch**: one preallocated parameter block per function; a call writes the argument values
  into it and calls ``cuLaunchKernel`` on the given stream.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence

CUDA_SUCCESS = 0


def cache_dir() -> str:
    d = os.environ.get("BITPRESS_CUDA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "bitpress", "cuda")
    os.makedirs(d, exist_ok=True)
    return d


def _find_nvrtc() -> Optional[ctypes.CDLL]:
    cands = []
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations if spec else []):
        for sub in ("cu13/lib", "cuda_nvrtc/lib", "cu12/lib"):
            cands += sorted(glob.glob(os.path.join(base, sub, "libnvrtc.so*")))
    cands += ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]
    for c in cands:
        if "builtins" in os.path.basename(c):
            continue
        try:
            return ctypes.CDLL(c)
        except OSError:
            continue
    return None


def nvrtc_cubin(src: str, arch: str, options: Sequence[str] = ("--std=c++17",)) -> bytes:
    """Compile ``src`` to a cubin for ``arch`` (e.g. ``sm_90a``) with NVRTC."""
    lib = _find_nvrtc()
    if lib is None:
        raise RuntimeError("NVRTC not found (pip install nvidia-cuda-nvrtc)")
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"bitpress.cu", 0, None,
                              None) != 0:
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        opts = [o.encode() for o in options] + [f"--gpu-architecture={arch}".encode()]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if rc != 0:
            n = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
            log = ctypes.create_string_buffer(n.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC failed:\n{log.value.decode(errors='replace')[-4000:]}")
        n = ctypes.c_size_t()
        if lib.nvrtcGetCUBINSize(prog, ctypes.byref(n)) != 0 or n.value == 0:
            raise RuntimeError("NVRTC produced no cubin (use a real architecture, sm_XY)")
        buf = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetCUBIN(prog, buf)
        return buf.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def nvcc_cubin(src: str, arch: str, options: Sequence[str] = ("--std=c++17",)) -> bytes:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("neither NVRTC nor nvcc is available to compile the CUDA kernels")
    with tempfile.TemporaryDirectory() as d:
        cu, out = os.path.join(d, "k.cu"), os.path.join(d, "k.cubin")
        with open(cu, "w") as f:
            f.write(src)
        subprocess.run([nvcc, *options, f"-arch={arch}", "-cubin", "-O3", "-o", out, cu],
                       check=True, capture_output=True, text=True)
        with open(out, "rb") as f:
            return f.read()


def cubin(src: str, arch: str, options: Sequence[str] = ("--std=c++17",)) -> bytes:
    """The cubin of ``src`` for ``arch``, from the disk cache or compiled (then cached)."""
    key = hashlib.sha256("\0".join([src, arch, *options]).encode()).hexdigest()[:32]
    path = os.path.join(cache_dir(), f"{key}-{arch}.cubin")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return f.read()
    try:
        data = nvrtc_cubin(src, arch, options)
    except RuntimeError as e:
        if "not found" not in str(e):
            raise
        data = nvcc_cubin(src, arch, options)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)   # atomic: concurrent processes never read a partial file
    return data


class ParamBlock:
    """Storage for a kernel's arguments plus the ``void*[]`` that ``cuLaunchKernel`` reads;
    ``types``: ``"p"`` (64-bit pointer / int) or ``"i"`` (32-bit int) per parameter."""

    def __init__(self, types: str) -> None:
        self.slots = [ctypes.c_uint64(0) if t == "p" else ctypes.c_int32(0) for t in types]
        self.array = (ctypes.c_void_p * len(types))(
            *[ctypes.cast(ctypes.byref(s), ctypes.c_void_p) for s in self.slots])

    def set(self, args: Sequence) -> None:
        for s, v in zip(self.slots, args):
            s.value = int(v)

    def values(self) -> list[int]:
        return [s.value for s in self.slots]


_libcuda = None


def libcuda() -> ctypes.CDLL:
    global _libcuda
    if _libcuda is None:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        _libcuda = lib
    return _libcuda


class DriverFunction:
    """A loaded entry point: ``fn(grid, block, args, stream_ptr)`` launches it."""

    def __init__(self, image: bytes, name: str, types: str) -> None:
        import torch
        torch.cuda.init()
        torch.cuda.current_blas_handle()   # makes torch's primary context current here
        lib = libcuda()
        self._image = ctypes.create_string_buffer(image, len(image))
        mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
        rc = lib.cuModuleLoadData(ctypes.byref(mod), self._image)
        if rc != CUDA_SUCCESS:
            raise RuntimeError(f"cuModuleLoadData failed ({rc})")
        rc = lib.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode())
        if rc != CUDA_SUCCESS:
            raise RuntimeError(f"cuModuleGetFunction({name}) failed ({rc})")
        self.module, self.handle, self.name = mod, fn, name
        self.params = ParamBlock(types)
        self._launch = lib.cuLaunchKernel

    def __call__(self, grid: int, block: int, args: Sequence, stream: int) -> None:
        self.params.set(args)
        rc = self._launch(self.handle, grid, 1, 1, block, 1, 1, 0, stream, self.params.array,
                          None)
        if rc != CUDA_SUCCESS:
            raise RuntimeError(f"cuLaunchKernel({self.name}) failed ({rc})")
