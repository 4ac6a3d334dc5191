"""In-tree PEP 517 backend: setuptools' own, plus one optional build requirement.

``simde-py`` (the SIMDe headers) only adds the ``avx512-emu`` kernel build, which lets the
tests run the AVX-512 code on CPUs without AVX-512; users do not need it. It is asked for
only when ``BITPRESS_SIMDE=1`` (``make setup`` / CI set it), so an install from an index
or mirror without simde-py still works. setup.py builds without it either way.
"""
import os

from setuptools import build_meta as _meta
from setuptools.build_meta import *  # noqa: F401,F403  (the standard hooks)


def _optional() -> list:
    return ["simde-py"] if os.environ.get("BITPRESS_SIMDE") == "1" else []


def get_requires_for_build_wheel(config_settings=None):
    return _meta.get_requires_for_build_wheel(config_settings) + _optional()


def get_requires_for_build_editable(config_settings=None):
    return _meta.get_requires_for_build_editable(config_settings) + _optional()
