"""Builds csrc/ into bitpress._C with pybind11 whenever a C++ compiler is present.

The extension takes raw pointers from Python (no torch C++ headers), so it builds in
seconds and works with any installed torch. Without a compiler bitpress still installs
and runs on its pure-torch paths, several times slower: this script then prints a banner
saying what is missing and how to fix it (pip shows it with ``pip install -v``), and
``bitpress inspect DIR`` / ``python -c "from bitpress.kernels import native;
print(native.describe())"`` tell which kernels a run gets. ``BITPRESS_REQUIRE_EXT=1`` makes a
failed build fatal; ``BITPRESS_REQUIRE_NATIVE=1`` makes a run without the kernels fail.
"""
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

_FIX = """\
Fix: install a C++17 compiler with OpenMP, then reinstall without pip's wheel cache:
       Debian/Ubuntu: apt install g++        Fedora/RHEL: dnf install gcc-c++
       macOS: xcode-select --install; brew install libomp (or CXX=g++-14 from brew gcc)
       pip install --force-reinstall --no-deps --no-cache-dir bitpress
       (in a clone: python setup.py build_ext --inplace)
     BITPRESS_REQUIRE_EXT=1 makes this build fail instead of falling back."""


def _banner(what: str, detail: str = "") -> None:
    """The message a user must not miss: what is missing, what it costs, how to fix it."""
    bar = "!" * 78
    lines = [bar, f"bitpress: the native CPU kernels (bitpress._C) are NOT built: {what}."]
    if detail:
        lines.append(detail)
    lines += ["Consequence: bitpress installs and runs, but packed layers fall back to",
              "  pure-torch reference ops: generation is several times SLOWER than the",
              "  float model. `bitpress inspect DIR` reports which kernels are active.",
              _FIX, bar]
    print("\n" + "\n".join(lines) + "\n", file=sys.stderr, flush=True)


def _skip(what: str, detail: str = "") -> list:
    _banner(what, detail)
    if os.environ.get("BITPRESS_REQUIRE_EXT") == "1":
        sys.exit(f"bitpress: BITPRESS_REQUIRE_EXT=1 and the native kernels cannot be built: {what}")
    return []


def _extensions():
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:  # pybind11 is a build requirement; missing with --no-build-isolation
        return _skip("pybind11 is not installed in the build environment",
                     "  (pip install pybind11, or build with pip's default build isolation)")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        return _skip(f"no C++ compiler found ({cxx!r} and 'g++' are not on PATH)")
    # no FMA contraction: the dequantising GEMM path must round like the reference op
    # (the AVX2 kernels use explicit FMA intrinsics, which this flag does not touch)
    args = ["-O3", "-fopenmp", "-ffp-contract=off"]
    include_dirs, macros = [], []
    try:  # SIMDe (header-only, optional: BITPRESS_SIMDE=1): the emulated AVX-512 test ISA
        import simde_py
        include_dirs.append(simde_py.get_include())
        macros.append(("BITPRESS_HAVE_SIMDE", "1"))
    except ImportError:
        print("bitpress: simde-py not in the build environment: building without the "
              "test-only 'avx512-emu' ISA (BITPRESS_SIMDE=1 asks for it); the kernels users run "
              "are unaffected", file=sys.stderr)
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
            _banner("compiling it failed",
                    f"  error: {e}\n  (a compiler without OpenMP support is the usual cause; "
                    f"the compiler's own messages are above)")


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
