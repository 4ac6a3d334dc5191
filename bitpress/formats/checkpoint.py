"""Tensor-level checkpoint I/O: sharded safetensors, the ``quantization_config`` dict, and
atomic output directories. Model-level save/load (which knows transformers) lives in
:mod:`bitpress.pipeline.checkpoint`.

Nothing here unpickles: tensors are safetensors, metadata is JSON.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

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

log = logging.getLogger(__name__)


# ---- output paths ----------------------------------------------------------------------
#: hidden siblings that :func:`atomic_output_dir` creates: ``.<name>.tmp-<pid>-<random>``
#: (the output being written) and ``.<name>.old-<pid>-<random>`` (the output it replaces)
_SCRATCH_KINDS = ("tmp", "old")
#: a scratch folder without a readable pid (older bitpress) is removed after this long
STALE_SCRATCH_SECONDS = 24 * 3600


def check_output_path(out: str | os.PathLike, inputs: Iterable[Any] = (),
                      overwrite: bool = False, kind: str = "directory") -> Path:
    """Check an output path before any work is done, and return it (absolute).

    Refused, with a :class:`ConfigError` / :class:`OutputExistsError`: an output that is,
    contains or lies inside one of ``inputs`` (``None`` entries skipped; symlinks resolved),
    so that ``--force`` can never replace a source; an existing output without
    ``overwrite``; an existing output of the other kind (a file where a directory is written
    or the reverse); and a location where nothing can be created (read-only, not a
    directory, no permission), found by creating and removing a probe folder there."""
    out_abs = Path(out).expanduser().absolute()
    o = out_abs.resolve()
    for inp in inputs:
        if inp is None:
            continue
        i = Path(inp).expanduser().resolve()
        if o == i:
            raise ConfigError(f"the output {out} is the input {inp}; writing it would destroy "
                              f"the input: choose another output path")
        if o in i.parents:
            raise ConfigError(f"the output {out} contains the input {inp}; replacing it would "
                              f"delete the input: choose another output path")
        if i in o.parents and i.is_file():
            raise ConfigError(f"the output {out} lies inside the input file {inp}")
        if i in o.parents:
            raise ConfigError(f"the output {out} lies inside the input {inp}; write it "
                              f"elsewhere so that the input is never modified")
    if out_abs.exists() or out_abs.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output {kind} {out} already exists; choose another path "
                                    f"or pass --force to replace it")
        is_dir = out_abs.is_dir()
        if kind == "directory" and not is_dir:
            raise OutputExistsError(f"output path {out} exists and is not a directory; --force "
                                    f"replaces directories only: remove it or choose another path")
        if kind != "directory" and is_dir:
            raise OutputExistsError(f"output path {out} is a directory, not a {kind}; choose "
                                    f"another path")
    parent = out_abs.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot create {out}: {parent} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".bitpress-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise ConfigError(f"cannot write the output {out}: {parent} is not writable "
                          f"({e.strerror or e}); choose a writable location") from None
    return out_abs


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_scratch(out: str | os.PathLike, max_age: float = STALE_SCRATCH_SECONDS
                         ) -> list[Path]:
    """Remove the hidden scratch folders that killed writes of ``out`` left beside it
    (``kill -9``, power loss): those whose writer process is gone, and those of unknown
    writer older than ``max_age`` seconds. A folder of a live process is left alone (two
    runs may write the same output; the second one to finish wins). Returns what was
    removed."""
    out = Path(out).absolute()
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    now = time.time()
    for p in sorted(entries, key=lambda q: ".tmp-" in q.name):  # "old" ones first
        for k in _SCRATCH_KINDS:
            prefix = f".{out.name}.{k}-"
            if not p.name.startswith(prefix) or not p.is_dir() or p.is_symlink():
                continue
            pid_s, sep, _ = p.name[len(prefix):].partition("-")
            try:
                stale = not _pid_alive(int(pid_s)) if sep and pid_s.isdigit() else \
                    now - p.stat().st_mtime > max_age
            except OSError:
                continue
            if not stale:
                continue
            if k == "old" and (p / "x").exists() and not out.exists() and not out.is_symlink():
                # killed between moving the previous output aside and renaming the new one
                # in: the previous output is the only complete one; put it back
                try:
                    os.replace(p / "x", out)
                    log.warning("restored %s, which a killed run had moved aside", out)
                except OSError:
                    continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.info("removed %d stale scratch folder(s) of %s left by killed runs: %s",
                 len(removed), out, ", ".join(q.name for q in removed))
    return removed


# ---- atomic output ---------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; rename it to ``out_dir`` when the
    block exits cleanly, delete it otherwise. An existing ``out_dir`` is an error unless
    ``overwrite`` (it is then replaced only after the new output is complete).

    Scratch folders are named ``.<name>.tmp-<pid>-*``; those left by killed writes of the same
    output are removed first (:func:`remove_stale_scratch`). Interrupts that Python sees
    (Ctrl-C, and SIGTERM under the ``bitpress`` command, which turns it into an exception)
    remove the scratch folder; only ``kill -9`` can leave one, for the next write to clean."""
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {out} already exists; choose another path "
                                f"or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(out)
    pid = os.getpid()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{pid}-", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{pid}-", dir=out.parent))
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
        save_safetensors(shards[0], out / SINGLE_FILE, metadata=meta)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_safetensors(shard, out / fname, metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(tensor_nbytes(t) for t in tensors.values())
    write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + [INDEX_FILE]


def check_finite(t: torch.Tensor, name: str, where: Any) -> None:
    """Raise :class:`FormatError` naming the tensor when a floating tensor holds NaN or Inf
    (a corrupt or mis-edited checkpoint would otherwise run and produce NaN everywhere)."""
    if t.is_floating_point() and t.numel() and t.device.type != "meta" \
            and not bool(torch.isfinite(t).all()):
        bad = ~torch.isfinite(t)
        kinds = "/".join(k for k, m in (("NaN", torch.isnan(t)), ("Inf", torch.isinf(t)))
                         if bool(m.any()))
        raise FormatError(f"tensor {name!r} in {where} holds {int(bad.sum())} non-finite "
                          f"value(s) ({kinds}); the checkpoint is corrupt or was edited: "
                          f"re-create or re-download it")


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Optional[dict[str, str]] = None) -> None:
    """``safetensors.torch.save_file`` with a reproducible header: the safetensors library
    writes the ``__metadata__`` entries in hash order, which changes from run to run, so
    the header is rewritten in place with them sorted (same length, same tensors)."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata=metadata)
    if metadata and len(metadata) > 1:
        canonicalize_safetensors_header(Path(path))


def canonicalize_safetensors_header(path: Path) -> None:
    """Sort the ``__metadata__`` keys of a safetensors file's header, in place."""
    with open(path, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        raw = fh.read(n)
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=lambda kv: dict(kv))
        meta = header.get("__metadata__")
        if not isinstance(meta, dict):
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(body) > n or body.rstrip() == text.rstrip().encode("utf-8"):
            return
        fh.seek(8)
        fh.write(body + b" " * (n - len(body)))


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


#: bytes per element of the safetensors dtypes
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                   "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


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
    if not isinstance(header, dict):
        raise FormatError(f"{path} is not a valid safetensors file (its header is not a JSON "
                          f"object); re-export or re-download it")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            if v is not None and not (isinstance(v, dict)
                                      and all(isinstance(x, str) for x in v.values())):
                raise FormatError(f"{path}: malformed __metadata__ (must map names to strings)")
            continue
        try:
            dtype, shape, offsets = v["dtype"], v["shape"], v["data_offsets"]
            if not isinstance(dtype, str) or not isinstance(shape, list) \
                    or not isinstance(offsets, list) or len(offsets) != 2:
                raise ValueError
            if not all(type(d) is int and d >= 0 for d in shape + offsets) \
                    or offsets[0] > offsets[1]:
                raise ValueError
            item = _ST_DTYPE_BYTES.get(dtype)
            if item is not None and math.prod(shape) * item != offsets[1] - offsets[0]:
                raise ValueError
            end = max(end, offsets[1])
        except (KeyError, TypeError, IndexError, ValueError):
            raise FormatError(f"{path}: malformed header entry for {k!r} (dtype, shape and "
                              f"data offsets must agree); re-export or re-download it") from None
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
    for key in ("bits", "group_size"):  # the recipe's headline values, when present
        v = cfg.get(key)
        if v is None:
            continue
        if not _is_int(v) or (key == "bits" and v not in SUPPORTED_BITS):
            raise FormatError(f"quantization_config.{key} is {v!r}, not a supported value")
        if key == "group_size":
            try:
                check_group_size(v)
            except ConfigError as e:
                raise FormatError(f"quantization_config.group_size: {e}") from None
    mods = cfg.get("modules")
    if not isinstance(mods, Mapping):
        raise FormatError("quantization_config.modules is missing")
    for name, m in mods.items():
        if not isinstance(m, Mapping):
            raise FormatError(f"module {name}: the scheme must be an object, got {m!r}")
        fmt = m.get("format")
        if fmt not in ("dense", "bsr"):
            raise FormatError(f"module {name}: unknown format {fmt!r}")
        if not _is_int(m.get("bits")) or m.get("bits") not in SUPPORTED_BITS:
            raise FormatError(f"module {name}: unsupported bits {m.get('bits')!r}")
        try:
            for key in ("group_size", "in_features", "out_features") + \
                    (("nnz",) if fmt == "bsr" else ()):
                if not _is_int(m.get(key)):
                    raise ValueError(f"{key} must be an integer, got {m.get(key)!r}")
            check_group_size(m["group_size"])
            if m["in_features"] <= 0 or m["out_features"] <= 0:
                raise ValueError("in/out features must be positive")
            if fmt == "bsr":
                if m["group_size"] == -1:
                    raise ValueError("block-sparse modules need a group size")
                n_groups = -(-m["in_features"] // m["group_size"])
                if not 0 <= m["nnz"] <= m["out_features"] * n_groups:
                    raise ValueError(f"nnz {m['nnz']} is outside [0, out x groups]")
        except (TypeError, ValueError, KeyError, ConfigError) as e:
            raise FormatError(f"module {name}: bad scheme {dict(m)} ({e})") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
