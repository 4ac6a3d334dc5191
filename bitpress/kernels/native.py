"""Loader for the native CPU extension ``bitpress._C`` (built from csrc/ by setup.py), and the
one place that says which kernels are active.

``available()`` says whether it was built; callers fall back to pure torch when not.
:func:`status` / :func:`describe` report what runs (the extension and the ISA its dispatcher
chose for this CPU, or the pure-torch fallback and why); ``bitpress inspect`` and ``bitpress
generate`` print them. A machine without a C++ compiler at install time gets the fallback,
which decodes several times slower than the float model: set ``BITPRESS_REQUIRE_NATIVE=1``
(or call :func:`require`) to make that an error at the first packed call instead.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import os
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch

from ..errors import BitpressError, ConfigError
from ..formats.packing import check_bits, packed_words, unpack_codes as unpack_codes_torch

#: environment variable: ``1`` makes the first packed CPU call (or decode-engine use) raise
#: :class:`NativeKernelsMissing` when the compiled kernels are not active
REQUIRE_ENV = "BITPRESS_REQUIRE_NATIVE"
_FIX = ("install a C++ compiler with OpenMP (Debian/Ubuntu: apt install g++; Fedora: dnf install "
        "gcc-c++; macOS: xcode-select --install) and reinstall bitpress "
        "past pip's wheel cache (pip install --force-reinstall --no-deps --no-cache-dir bitpress,"
        " or `python setup.py build_ext --inplace` in a clone); docs/install.md")
_load_error: Optional[str] = None


class NativeKernelsMissing(BitpressError, RuntimeError):
    """The compiled CPU kernels are required (:func:`require`, ``BITPRESS_REQUIRE_NATIVE=1``)
    but not active."""


def _import() -> Any:
    from .. import _C  # type: ignore[attr-defined]

    return _C


def _package_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def _built_files() -> list[Path]:
    d = _package_dir()
    return sorted(p for s in importlib.machinery.EXTENSION_SUFFIXES for p in d.glob(f"_C{s}"))


@functools.lru_cache(maxsize=None)
def _module() -> Optional[Any]:
    global _load_error
    try:
        return _import()
    except ImportError as e:
        built = _built_files()
        if built:
            _load_error = f"{built[0]} does not load: {e}"
        else:
            _load_error = ("no compiled extension: bitpress._C was not built when bitpress was "
                           "installed (no C++ compiler, or its build failed)")
        return None


def available() -> bool:
    return _module() is not None


def reason() -> Optional[str]:
    """Why the native CPU kernels are not active (``None`` when they are)."""
    m = _module()
    if m is None:
        return _load_error or "bitpress._C is not available"
    if not hasattr(m, "qmm_dense"):
        return (f"{getattr(m, '__file__', 'bitpress._C')} is an old build without the CPU qmm "
                f"kernels (rebuild it)")
    return None


def require(what: str = "this") -> Any:
    """The extension module, or :class:`NativeKernelsMissing` saying why it is not active
    and how to get it."""
    why = reason()
    if why is not None:
        raise NativeKernelsMissing(f"{what} needs bitpress's compiled CPU kernels, which are not "
                                   f"active: {why}. Fix: {_FIX}.")
    return _module()


def required() -> bool:
    """``BITPRESS_REQUIRE_NATIVE`` is set to a true value."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def require_if_asked(what: str = "this") -> None:
    """:func:`require` when ``BITPRESS_REQUIRE_NATIVE=1``; nothing otherwise (the callers
    then fall back to pure torch)."""
    if required():
        require(f"{what} ({REQUIRE_ENV}=1)")


def status() -> dict[str, Any]:
    """Which kernels run packed layers in this process, for result files and ``bitpress
    inspect``/``generate``: ``native`` (bool), the extension's file, the ISA the run-time
    dispatcher chose (``avx512`` / ``avx2`` / ``scalar``, or what :func:`bitpress.kernels.cpu.
    set_isa` forced) and the others this CPU and build offer, OpenMP, the decode engine,
    and a one-line ``summary``; in the fallback, the ``reason`` and the ``fix``."""
    why = reason()
    out: dict[str, Any] = {"native": why is None}
    if why is None:
        m = _module()
        isas = list(m.qmm_available_isas())
        feats = dict(m.cpu_features())
        out.update(extension=getattr(m, "__file__", None), isa=m.qmm_get_isa(), isas=isas,
                   openmp=bool(feats.get("openmp")), decode_engine=hasattr(m, "DecodeEngine"))
        try:
            from . import cpu

            out["act_mode"] = cpu.get_act_mode()
        except ImportError:  # pragma: no cover - reason() saw qmm_dense
            pass
        out["summary"] = (f"native C++ kernels (bitpress._C), ISA {out['isa']} (this CPU and "
                          f"build: {', '.join(isas)}), OpenMP {'on' if out['openmp'] else 'off'}"
                          f", decode engine {'on' if out['decode_engine'] else 'off'}")
    else:
        out.update(reason=why, fix=_FIX,
                   summary=f"pure-torch fallback: {why}; packed layers run the reference ops, "
                           f"several times slower than the float model")
    if torch.cuda.is_available():
        from .ops import registered_impls

        out["cuda"] = registered_impls("dense_qmm", "cuda")
    return out


def describe(st: Optional[dict[str, Any]] = None, prefix: str = "kernels: ") -> str:
    """:func:`status` as one human line (``kernels: ...``)."""
    st = status() if st is None else st
    line = f"{prefix}{st['summary']}"
    if not st["native"]:
        line += f". Fix: {st['fix']}"
    if "cuda" in st:
        line += f"; cuda: {', '.join(st['cuda'])}"
    return line


def kernel_mode(mode: Optional[str]) -> ContextManager[Any]:
    """:class:`bitpress.kernels.cpu.kernel_mode` when the native kernels are active; without
    them ``None`` changes nothing and an explicit mode is a :class:`ConfigError`."""
    try:
        from . import cpu
    except ImportError:
        if mode is not None:
            raise ConfigError(f"kernel mode {mode!r} selects a compiled CPU kernel, but "
                              f"those are not active: {reason()}. Fix: {_FIX}") from None
        return contextlib.nullcontext()
    return cpu.kernel_mode(mode)


def describe_mode() -> str:
    """:func:`bitpress.kernels.cpu.describe_mode`, or the fallback's name."""
    try:
        from . import cpu
    except ImportError:
        return "reference (pure torch; bitpress._C not active)"
    return cpu.describe_mode()


def cpu_features() -> dict[str, bool]:
    m = _module()
    return dict(m.cpu_features()) if m is not None else {}


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Fast unpack of canonical int32 words ``[rows, w]`` to int8 codes ``[rows, n]`` on CPU
    (multi-threaded C++); same result as :func:`bitpress.formats.unpack_codes`, which it
    falls back to without the extension or for non-CPU tensors."""
    m = _module()
    if m is None or packed.device.type != "cpu" or packed.dim() != 2:
        return unpack_codes_torch(packed, bits, n)
    check_bits(bits)
    if packed.dtype != torch.int32 or packed.shape[1] != packed_words(n, bits):
        return unpack_codes_torch(packed, bits, n)  # raises the canonical error
    packed = packed.contiguous()
    out = torch.empty(packed.shape[0], n, dtype=torch.int8)
    m.unpack_codes(packed.data_ptr(), out.data_ptr(), packed.shape[0], packed.shape[1], n, bits,
                   torch.get_num_threads())
    return out
