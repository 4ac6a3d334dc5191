"""Lazy tensor stores: a source checkpoint's tensors under the model's state-dict names,
read one at a time (safetensors shards with ``pread``, or a memory-mapped GGUF).

GGUF sources are streamed tensor by tensor with the ``gguf`` package's memory-mapped
``GGUFReader``: each tensor is dequantised on demand and passed through transformers'
own GGUF name map and tensor processor (which undoes llama.cpp's q/k row permutation),
so a tensor read here equals the one ``from_pretrained(gguf_file=...)`` would produce —
without converting the file or holding the whole float model.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import FormatError, SourceError
from ..formats import SafetensorsDir
from ..formats.checkpoint import check_finite


class TensorStore(abc.ABC):
    """Lazy access to a source checkpoint's tensors under the model's state-dict names.

    ``reads`` counts tensors read and ``log`` lists their names in read order (tests use
    them to prove that blocks are read lazily, one at a time)."""

    def __init__(self) -> None:
        self.reads = 0
        self.log: list[str] = []

    @abc.abstractmethod
    def __contains__(self, name: str) -> bool:
        """Whether the source holds ``name``."""

    @abc.abstractmethod
    def _read(self, name: str) -> torch.Tensor:
        """Read one tensor (counted by :meth:`get`)."""

    def shape(self, name: str) -> Optional[tuple[int, ...]]:
        """The stored shape when known without reading the tensor."""
        return None

    def get(self, name: str) -> torch.Tensor:
        t = self._read(name)
        check_finite(t, name, getattr(self, "where", "the source checkpoint"))
        self.reads += 1
        self.log.append(name)
        return t


class SafetensorsStore(TensorStore):
    """Tensors of an HF safetensors directory; file names may lack or add the base-model
    prefix (``transformer.``, ``model.``) relative to the model's state-dict names."""

    def __init__(self, directory: str | Path, model_keys: list[str]):
        super().__init__()
        self.files = SafetensorsDir(directory)
        self.where = self.files.dir
        self._headers: dict[str, tuple[int, dict]] = {}
        self._map: dict[str, str] = {}
        for k in model_keys:
            for cand in _name_variants(k):
                if cand in self.files:
                    self._map[k] = cand
                    break

    def __contains__(self, name: str) -> bool:
        return name in self._map

    def shape(self, name: str) -> Optional[tuple[int, ...]]:
        return tuple(self.files.shapes[self._map[name]])

    def _read(self, name: str) -> torch.Tensor:
        """One tensor read with ``pread`` into fresh memory — no memory map, so the pages
        of tensors already used are not counted in (and do not pile up in) this process's
        resident set while a checkpoint larger than RAM streams through."""
        from ..formats.checkpoint import read_safetensors_header
        from ..formats.stwriter import header_base, read_tensor

        key = self._map[name]
        f = self.files._where[key]
        if f not in self._headers:
            path = self.files.dir / f
            self._headers[f] = (header_base(path), read_safetensors_header(path))
        base, header = self._headers[f]
        t = read_tensor(self.files.dir / f, base, header[key])
        return t if t is not None else self.files.get(key)  # an unusual dtype


def _name_variants(k: str) -> list[str]:
    out = [k]
    for pre in ("model.", "transformer."):
        if k.startswith(pre):
            out.append(k[len(pre):])
        else:
            out.append(pre + k)
    return out


class GGUFStore(TensorStore):
    """Tensors of a ``.gguf`` file, memory-mapped and dequantised one at a time."""

    def __init__(self, path: str | Path, skeleton: nn.Module):
        super().__init__()
        try:
            from gguf import GGUFReader
            from gguf.quants import dequantize
            from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS,
                                                                  TensorProcessor,
                                                                  get_gguf_hf_weights_map)
        except ImportError:
            raise SourceError("reading GGUF files needs the gguf package: pip install gguf") \
                from None
        self._dequantize, self.where = dequantize, path
        try:
            self.reader = GGUFReader(str(path))
        except Exception as e:  # noqa: BLE001 - gguf raises plain errors
            raise FormatError(f"cannot read GGUF {path}: {e}") from None
        arch_field = self.reader.fields.get("general.architecture")
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else ""
        cls = TENSOR_PROCESSORS.get(arch, TensorProcessor)
        self.processor = cls(config=skeleton.config.to_dict())
        try:
            g2h = get_gguf_hf_weights_map(skeleton, self.processor)
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"cannot map the tensors of {path} to a {arch} model: {e}") from None
        self._tensors = {t.name: t for t in self.reader.tensors}
        self._map = {hf: gg for gg, hf in g2h.items() if gg in self._tensors}

    def __contains__(self, name: str) -> bool:
        return name in self._map

    def _read(self, name: str) -> torch.Tensor:
        import numpy as np

        t = self._tensors[self._map[name]]
        w = self._dequantize(t.data, t.tensor_type)
        parsed: dict[str, Any] = {"tensors": {}, "config": {}}
        res = self.processor.process(weights=w, name=t.name, tensor_key_mapping={},
                                     parsed_parameters=parsed)
        if res.name is None and len(parsed["tensors"]) == 1:  # stored aside by the processor
            return next(iter(parsed["tensors"].values())).clone()
        return torch.from_numpy(np.ascontiguousarray(res.weights).copy())
