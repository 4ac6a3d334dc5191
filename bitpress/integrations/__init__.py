"""Bridges to other tools: transformers (:mod:`.hf_quantizer`), compressed-tensors / vLLM
(:mod:`.compressed_tensors`), lm-eval (:mod:`.lm_eval`), llama.cpp (:mod:`.gguf_export`),
ONNX Runtime and OpenVINO (:mod:`.onnx_export`, :mod:`.onnx_runtime`). Each submodule
imports its tool lazily and says which extra to install when it is missing.

Importing :mod:`bitpress` installs :func:`install_transformers_hook`, which registers the
bitpress quantizer with transformers as soon as transformers' quantizer registry is imported
(or at once if it already is), without importing transformers itself.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

log = logging.getLogger(__name__)

#: the loader module copied into every checkpoint, and its class as ``auto_map`` names it
REMOTE_CODE_FILE = "modeling_bitpress.py"
REMOTE_CODE_CLASS = "modeling_bitpress.BitpressAutoModelForCausalLM"

_TARGET = "transformers.quantizers.auto"


def _register() -> None:
    try:
        from .hf_quantizer import register
    except ImportError as e:  # transformers too old / broken: bitpress.load still works
        log.debug("bitpress quantizer not registered with transformers: %s", e)
        return
    register()


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``transformers.quantizers.auto`` so the registration runs right
    after that module is executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        return spec


def install_transformers_hook() -> None:
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
