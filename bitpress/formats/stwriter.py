"""A streaming, deterministic safetensors writer.

The header (names, dtypes, shapes, offsets) is written first from the tensors' specs;
then each tensor's bytes are appended as it becomes available, so a file of any size is
written holding one tensor at a time. The output is a function of the specs, the bytes
and the metadata only (names sorted in the header, metadata keys sorted, no padding
randomness): the same tensors always give the same bytes. The file appears under its
name only when complete (written as ``NAME.tmp`` and renamed after an ``fsync``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch

from ..errors import FormatError

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
          torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
          torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """``specs``: ``(name, dtype, shape)`` in the order their data will be written."""

    def __init__(self, path: str | os.PathLike, specs: Iterable[tuple[str, torch.dtype, tuple]],
                 metadata: Optional[Mapping[str, str]] = None):
        self.path = Path(path)
        self.specs = [(n, d, tuple(int(x) for x in s)) for n, d, s in specs]
        header: dict = {}
        off = 0
        self._expect: dict[str, tuple[torch.dtype, tuple, int]] = {}
        for n, d, s in self.specs:
            if d not in DTYPES:
                raise FormatError(f"tensor {n!r}: dtype {d} cannot be stored in safetensors")
            nb = _nbytes(d, s)
            header[n] = {"dtype": DTYPES[d], "shape": list(s), "data_offsets": [off, off + nb]}
            self._expect[n] = (d, s, nb)
            off += nb
        ordered: dict = {}
        if metadata:
            ordered["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
        for n in sorted(header):
            ordered[n] = header[n]
        raw = json.dumps(ordered, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_bytes = off
        self._order = [n for n, _, _ in self.specs]
        self._next = 0
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._f = open(self.tmp, "wb")
        self._f.write(len(raw).to_bytes(8, "little"))
        self._f.write(raw)

    def write(self, name: str, t: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise FormatError(f"safetensors writer: {name!r} written out of order")
        d, s, nb = self._expect[name]
        if t.dtype != d or tuple(t.shape) != s:
            raise FormatError(f"tensor {name!r}: got {t.dtype} {tuple(t.shape)}, declared "
                              f"{d} {s}")
        t = t.detach().to("cpu").contiguous()
        if nb:
            self._f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> Path:
        if self._next != len(self._order):
            self.abort()
            raise FormatError(f"safetensors writer: {len(self._order) - self._next} tensors "
                              f"of {self.path.name} were never written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``tensors`` (in their mapping order) deterministically and atomically."""
    w = SafetensorsWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()],
                          metadata)
    try:
        for n, t in tensors.items():
            w.write(n, t)
    except BaseException:
        w.abort()
        raise
    return w.close()


ST_DTYPES = {v: k for k, v in DTYPES.items()}


def header_base(path: str | os.PathLike) -> int:
    """Offset of the first data byte of a safetensors file."""
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


def read_tensor(path: str | os.PathLike, base: int, entry: Mapping) -> Optional[torch.Tensor]:
    """One tensor of a safetensors file (``entry``: its header entry) read with ``pread``
    into fresh memory: no memory map, so tensors already used leave nothing behind in the
    process's resident set. ``None`` for a dtype this reader does not know."""
    dtype = ST_DTYPES.get(entry["dtype"])
    if dtype is None:
        return None
    a, b = (int(x) for x in entry["data_offsets"])
    shape = tuple(int(x) for x in entry["shape"])
    if b == a:
        return torch.empty(shape, dtype=dtype)
    buf = bytearray(b - a)
    with open(path, "rb", buffering=0) as fh:
        fh.seek(base + a)
        view, got = memoryview(buf), 0
        while got < len(buf):
            n = fh.readinto(view[got:])
            if not n:
                raise FormatError(f"{path} ended inside a tensor; re-export or re-download it")
            got += n
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
