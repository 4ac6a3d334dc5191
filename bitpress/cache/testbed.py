"""Checksummed, compact diffusers model folders (the CacheQuant testbed ships as one).

The repository's DDPM testbed (``bench/testbed/ddpm-fmnist``, made by
``bench/ddpm_train.py --export``) is a diffusers pipeline folder whose U-Net weights are
stored in float16 to keep git small, with a ``SHA256SUMS`` file in the format of
``sha256sum`` (``<hex>  <relative path>`` per line; ``sha256sum -c SHA256SUMS`` checks it
by hand). Whoever loads such a folder through :func:`bitpress.cache.cli.load_unet_and_scheduler`
(the ``bitpress compress --method cachequant`` path and ``bench/diffusion.py``) gets:

* every listed file checked against its digest first; a missing or changed file raises
  :class:`~bitpress.errors.SourceError` naming it, before anything is loaded;
* the weights upcast to float32 (the calibration, DEC fits and int8 kernels work in fp32).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from ..errors import SourceError

CHECKSUM_FILE = "SHA256SUMS"
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_checksums(folder: str | os.PathLike) -> dict[str, str]:
    """``{relative path: hex digest}`` from ``folder/SHA256SUMS``."""
    path = Path(folder) / CHECKSUM_FILE
    out: dict[str, str] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line.strip())
        rel = m.group(2) if m else ""
        if not m or rel.startswith("/") or ".." in Path(rel).parts:
            raise SourceError(f"{path}:{i} is not a '<sha256>  <relative path>' line: {line!r}")
        out[rel] = m.group(1)
    if not out:
        raise SourceError(f"{path} lists no files")
    return out


def write_checksums(folder: str | os.PathLike, files: list[str]) -> dict[str, str]:
    """Write ``folder/SHA256SUMS`` for ``files`` (paths relative to ``folder``), sorted."""
    folder = Path(folder)
    sums = {rel: sha256_file(folder / rel) for rel in sorted(files)}
    (folder / CHECKSUM_FILE).write_text("".join(f"{h}  {rel}\n" for rel, h in sums.items()))
    return sums


def verify_checksums(folder: str | os.PathLike) -> dict[str, str] | None:
    """Check every file listed in ``folder/SHA256SUMS``; ``None`` when the folder has none.

    Raises :class:`SourceError` on a missing or changed file, before any weights are read.
    """
    folder = Path(folder)
    if not (folder / CHECKSUM_FILE).is_file():
        return None
    sums = read_checksums(folder)
    for rel, want in sums.items():
        f = folder / rel
        if not f.is_file():
            raise SourceError(f"{f} is listed in {folder / CHECKSUM_FILE} but missing: the model folder "
                              "is incomplete (restore it, e.g. `git checkout -- <folder>`)")
        got = sha256_file(f)
        if got != want:
            raise SourceError(f"checksum mismatch for {f}: SHA-256 {got}, {folder / CHECKSUM_FILE} expects "
                              f"{want}; the file was changed or corrupted (restore it, e.g. "
                              "`git checkout -- <folder>`, or retrain and re-export with bench/ddpm_train.py)")
    return sums


def upcast_(module: torch.nn.Module) -> torch.nn.Module:
    """float16 / bfloat16 parameters and buffers -> float32, in place (other dtypes kept)."""
    low = (torch.float16, torch.bfloat16)
    if any(t.dtype in low for t in (*module.parameters(), *module.buffers())):
        module.float()
    return module


__all__ = ["CHECKSUM_FILE", "sha256_file", "read_checksums", "write_checksums", "verify_checksums", "upcast_"]
