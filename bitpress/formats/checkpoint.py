"""Tensor-level checkpoint I/O: sharded safetensors, the ``quantization_config`` dict, and
atomic output directories. Model-level save/load (which knows transformers) lives in
:mod:`bitpress.pipeline.checkpoint`.

Nothing here unpickles: tensors are safetensors, metadata is JSON.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch

from ..errors import ConfigError, FormatError, OutputExistsError, SourceError
from .packing import SUPPORTED_BITS
from .qweight import check_group_size

#: Version written. 2: the index of block-sparse ("bsr") modules is stored as a keep bitmask
#: ``keep_bits`` uint8 ``[out, ceil(n_groups/8)]`` (one bit per group) instead of
#: ``row_ptr`` + ``col_idx`` (int32 per row and per kept group); everything else as in 1.
#: 3: every packed module also stores a guard tensor ``<module>.weight`` = int32
#: ``[out_features, in_features, bits, group_size]`` (shape ``[4]``). Its name is the one the architecture's
#: own float weight has, so a loader that does not know bitpress (transformers without the
#: bitpress quantizer) sees a size mismatch and refuses instead of initialising the linear
#: randomly; bitpress checks its value against ``quantization_config``. Otherwise as 2.
FORMAT_VERSION = 3
#: Versions this code reads.
READ_VERSIONS = (1, 2, 3)
#: Name (suffix) of the format-3 guard tensor of a packed module.
GUARD_SUFFIX = "weight"
QUANT_METHOD = "bitpress"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


# ---- atomic output ---------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; rename it to ``out_dir`` when the
    block exits cleanly, delete it otherwise. An existing ``out_dir`` is an error unless
    ``overwrite`` (it is then replaced only after the new output is complete)."""
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {out} already exists; choose another path "
                                f"or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "x", out)  # put the previous output back
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


# ---- sharded safetensors ---------------------------------------------------------------
def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_shards(tensors: Mapping[str, torch.Tensor], out_dir: str | os.PathLike,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: Optional[dict[str, str]] = None) -> list[str]:
    """Write tensors as ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` plus
    the standard index. Returns the file names written."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nb = tensor_nbytes(t)
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nb
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata=meta)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(tensor_nbytes(t) for t in tensors.values())
    write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + [INDEX_FILE]


class SafetensorsDir:
    """Lazy, validated access to the tensors of a (possibly sharded) safetensors checkpoint.

    Headers are read up front (so names, shapes and dtypes are known without reading any
    data); :meth:`get` reads one tensor. Truncated or corrupt files raise
    :class:`FormatError` naming the file. ``reads`` counts tensors read (tests use it to
    prove lazy loading)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise SourceError(f"{self.dir} is not a directory")
        idx = self.dir / INDEX_FILE
        files: list[str]
        if idx.exists():
            try:
                weight_map = json.loads(idx.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise FormatError(f"{idx} is not a valid safetensors index: {e}") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise SourceError(f"no .safetensors files in {self.dir}")
        self.files = files
        self._where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for f in files:
            header = read_safetensors_header(self.dir / f)
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                self._where[k] = f
                self.shapes[k] = tuple(v["shape"])
                self.dtypes[k] = v["dtype"]
        self.reads = 0
        self._handles: dict[str, Any] = {}

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _handle(self, f: str):
        from safetensors import safe_open

        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(self.dir / f), framework="pt")
            except Exception as e:  # safetensors raises its own error type
                raise FormatError(f"cannot read {self.dir / f}: {e}") from None
        return self._handles[f]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise FormatError(f"tensor {name!r} is missing from {self.dir}")
        f = self._where[name]
        try:
            t = self._handle(f).get_tensor(name)
        except Exception as e:
            raise FormatError(f"cannot read tensor {name!r} from {self.dir / f}: {e}") from None
        self.reads += 1
        return t

    def nbytes(self) -> int:
        return sum((self.dir / f).stat().st_size for f in self.files)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and sanity-check a safetensors header; catches truncated files before any
    tensor is read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file is shorter than a safetensors header")
            n = int.from_bytes(raw, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length is larger than the file")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        raise FormatError(f"{path} is not a valid safetensors file ({e}); re-export or "
                          f"re-download it") from None
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            end = max(end, int(v["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise FormatError(f"{path}: malformed header entry for {k!r}") from None
    if 8 + n + end > size:
        raise FormatError(f"{path} is truncated: header promises {8 + n + end} bytes, file "
                          f"has {size}; re-export or re-download it")
    return header


# ---- quantization_config -----------------------------------------------------------------
def make_quantization_config(method: str, bits: int, group_size: int,
                             modules: Mapping[str, Mapping[str, Any]],
                             sparsity: Optional[float] = None,
                             ignore: Optional[list[str]] = None,
                             param_dtype: str = "float16",
                             **extra: Any) -> dict[str, Any]:
    """``modules`` maps each replaced module's name to its scheme:
    ``{"format": "dense" | "bsr", "bits": b, "group_size": g, "in_features": i,
    "out_features": o}`` (plus ``nnz`` for block-sparse rows)."""
    cfg = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "sparsity": sparsity,
        "ignore": list(ignore or []),
        "param_dtype": param_dtype,
        **extra,
        "modules": {k: dict(v) for k, v in modules.items()},
    }
    validate_quantization_config(cfg)
    return cfg


def validate_quantization_config(cfg: Mapping[str, Any]) -> None:
    if not isinstance(cfg, Mapping) or cfg.get("quant_method") != QUANT_METHOD:
        raise FormatError("config.json has no bitpress quantization_config; is this a bitpress "
                          "checkpoint (made by `bitpress compress`)?")
    v = cfg.get("format_version")
    if isinstance(v, bool) or v not in READ_VERSIONS:
        raise FormatError(f"checkpoint format_version {v} is not supported by this bitpress "
                          f"(reads {', '.join(map(str, READ_VERSIONS))}); upgrade bitpress")
    mods = cfg.get("modules")
    if not isinstance(mods, Mapping):
        raise FormatError("quantization_config.modules is missing")
    for name, m in mods.items():
        fmt = m.get("format")
        if fmt not in ("dense", "bsr"):
            raise FormatError(f"module {name}: unknown format {fmt!r}")
        if m.get("bits") not in SUPPORTED_BITS:
            raise FormatError(f"module {name}: unsupported bits {m.get('bits')!r}")
        try:
            check_group_size(int(m.get("group_size")))
            if int(m["in_features"]) <= 0 or int(m["out_features"]) <= 0:
                raise ValueError("in/out features must be positive")
        except (TypeError, ValueError, KeyError, ConfigError) as e:
            raise FormatError(f"module {name}: bad scheme {dict(m)} ({e})") from None
