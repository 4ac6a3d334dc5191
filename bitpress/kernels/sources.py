"""Sources the kernels compile at run time (``bitpress/csrc/cuda/*.cu``, NVRTC through CuPy or
the driver API), found as package data through :mod:`importlib.resources` so that editable
installs, wheels and zipped installs all read the copy that ships inside the package
(``[tool.setuptools.package-data]`` in pyproject.toml lists them)."""
from __future__ import annotations

from importlib import resources

from ..errors import BitpressError


class MissingSourceError(BitpressError, ImportError):
    """A CUDA source that ships with the package is not where the package says (a broken or
    hand-copied install)."""


def _cuda_dir():
    return resources.files("bitpress").joinpath("csrc", "cuda")


def cuda_source_path(name: str) -> str:
    """Where ``bitpress/csrc/cuda/<name>`` lies (for messages and tools; read it with
    :func:`read_cuda_source`, which also works from a zipped install)."""
    return str(_cuda_dir().joinpath(name))


def cuda_sources() -> list[str]:
    """The names of the shipped CUDA sources (``*.cu``)."""
    d = _cuda_dir()
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".cu")) if d.is_dir() else []


def read_cuda_source(name: str) -> str:
    f = _cuda_dir().joinpath(name)
    if not f.is_file():
        raise MissingSourceError(f"{cuda_source_path(name)} not found: the CUDA sources ship "
                                 f"inside the package (bitpress/csrc/cuda/*.cu); reinstall "
                                 f"bitpress (pip install --force-reinstall bitpress)")
    return f.read_text(encoding="utf-8")
