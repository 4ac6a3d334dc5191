"""Builds csrc/ into bitpress._C with pybind11 whenever a C++ compiler is present.

The extension takes raw pointers from Python (no torch C++ headers), so it builds in
seconds and works with any installed torch. Without a compiler bitpress still installs
and runs on its pure-torch paths; `python -c "import bitpress._C"` tells which you got.
"""
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _extensions():
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:  # pragma: no cover - pybind11 is a build requirement
        print("bitpress: pybind11 missing, building without bitpress._C", file=sys.stderr)
        return []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        print("bitpress: no C++ compiler found, building without bitpress._C", file=sys.stderr)
        return []
    # no FMA contraction: the dequantising GEMM path must round like the reference op
    # (the AVX2 kernels use explicit FMA intrinsics, which this flag does not touch)
    args = ["-O3", "-fopenmp", "-ffp-contract=off"]
    include_dirs, macros = [], []
    try:  # SIMDe (header-only, a build requirement): the emulated AVX-512 build for the tests
        import simde_py
        include_dirs.append(simde_py.get_include())
        macros.append(("BITPRESS_HAVE_SIMDE", "1"))
    except ImportError:
        print("bitpress: simde-py missing, building without the 'avx512-emu' test ISA",
              file=sys.stderr)
    sources = ["csrc/bitpress_ext.cpp", "csrc/cpu/qmm.cpp", "csrc/cpu/qmm_avx2.cpp",
               "csrc/cpu/qmm_avx512.cpp", "csrc/cpu/qmm_avx512_emu.cpp",
               "csrc/cpu/engine.cpp"]
    return [Pybind11Extension("bitpress._C", sources, cxx_std=17, include_dirs=include_dirs,
                              define_macros=macros, extra_compile_args=args,
                              extra_link_args=["-fopenmp"])]


class OptionalBuildExt(build_ext):
    """A failed native build degrades to the pure-torch paths with a loud message instead of
    failing the install (set BITPRESS_REQUIRE_EXT=1 to make it fatal)."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001
            if os.environ.get("BITPRESS_REQUIRE_EXT") == "1":
                raise
            print(f"bitpress: WARNING: building bitpress._C failed ({e}); "
                  f"continuing without native kernels", file=sys.stderr)


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
