"""Streamed, resumable output of ``bitpress compress``.

While a compression runs, its output lives in a work directory beside the requested one,
``.OUT.partial/``:

* ``rest.safetensors``: the tensors outside the decoder blocks (embeddings, final norm,
  head), copied from the source one tensor at a time before the first block;
* ``block-NNNNN.safetensors``: each block's packed (or, outside ``--blocks``, float)
  tensors, written as soon as the block is finished — the block is then dropped from
  memory;
* ``acts-NNNNN-rR.safetensors``: rank ``R``'s calibration hidden states entering block
  ``NNNNN`` (the last finished block's outputs), so a resumed run continues exactly;
* ``state.json``: the commit point — the number of finished blocks, their schemes, errors
  and tuning records, and a fingerprint of everything the result depends on.

Every file is written under a temporary name, ``fsync``-ed and renamed, and ``state.json``
is replaced last, so a run killed at any instant (SIGKILL included) leaves a state that
``--resume`` continues from the last finished block. At the end the parts become the
checkpoint's shards (hard links; merged into one ``model.safetensors`` when the whole
checkpoint is at most one shard), ``config.json``, tokenizer and summary are written, the
output directory appears atomically, and the work directory is removed.

All tensor files are written by :mod:`bitpress.formats.stwriter` (sorted headers, no
randomness), so an interrupted and resumed run gives the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConfigError, OutputExistsError, SourceError
from ..formats.checkpoint import (DEFAULT_SHARD_BYTES, INDEX_FILE, SINGLE_FILE,
                                  atomic_output_dir, read_safetensors_header, write_json)
from ..formats.stwriter import (SafetensorsWriter, fsync_dir, header_base, read_tensor,
                               write_safetensors)

log = logging.getLogger(__name__)

STATE = "state.json"
REST = "rest.safetensors"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def partial_dir(out: str | os.PathLike) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}.partial"


def _diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class StreamOutput:
    def __init__(self, out: str | os.PathLike, fingerprint: dict[str, Any], resume: bool,
                 overwrite: bool, dtype: Optional[torch.dtype], dist,
                 format_version: int, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out = Path(out).absolute()
        self.work = partial_dir(self.out)
        self.fp = json.loads(json.dumps(fingerprint))  # as it reads back from JSON
        self.dtype, self.dist, self.max_shard_bytes = dtype, dist, max_shard_bytes
        self.meta = {"format": "pt", "bitpress_format_version": str(format_version)}
        self.state: Optional[dict[str, Any]] = None
        self.tuple_out: Optional[bool] = None
        self.resumed_from = 0
        if self.work.exists():
            if resume:
                self.state = self._read_state()
                if self.state is not None and self.state.get("fingerprint") != self.fp:
                    diff = _diff(self.state.get("fingerprint") or {}, self.fp)
                    raise ConfigError(
                        f"--resume: the interrupted run in {self.work} was started with other "
                        f"inputs or options ({', '.join(diff)}); rerun it with the same ones, "
                        f"or pass --force instead of --resume to start over")
            elif overwrite:
                if dist.rank == 0:
                    shutil.rmtree(self.work)
            else:
                raise OutputExistsError(
                    f"an interrupted compression left {self.work}; continue it with --resume "
                    f"(same command otherwise), or pass --force to start over")
        elif resume:
            log.warning("--resume: nothing to resume (no %s); starting from the first block",
                        self.work)
        dist.barrier()

    # -- state ---------------------------------------------------------------------------
    def _read_state(self) -> Optional[dict[str, Any]]:
        p = self.work / STATE
        if not p.exists():
            return None  # killed before the first commit: start over in the same directory
        try:
            return json.loads(p.read_text())
        except ValueError as e:
            raise SourceError(f"{p} is damaged ({e}); pass --force to start over") from None

    def _commit(self) -> None:
        p = self.work / STATE
        tmp = p.with_name(STATE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        fsync_dir(self.work)

    # -- the run -------------------------------------------------------------------------
    def begin(self, model: nn.Module, store, keys: list[str], block_prefix: str
              ) -> dict[str, Any]:
        """Write the tensors outside the blocks (first run) and return the state."""
        self.model, self.store, self.block_prefix = model, store, block_prefix
        self.sd = model.state_dict(keep_vars=True)
        if self.state is None:
            if self.dist.rank == 0:
                self.work.mkdir(parents=True, exist_ok=True)
                for f in self.work.iterdir():  # leftovers of a run killed before its commit
                    if f.is_file():
                        f.unlink()
                seen: set[int] = set()
                rest = []
                for k in keys:
                    if k.startswith(block_prefix) or id(self.sd[k]) in seen:
                        continue
                    seen.add(id(self.sd[k]))
                    if k in store or self.sd[k].device.type != "meta":
                        rest.append(k)
                self._copy(self.work / REST, rest)
                self.state = {"fingerprint": self.fp, "done": 0, "blocks": [], "groups": [],
                              "stash": None, "tuple_out": None}
                self._commit()
            self.dist.barrier()
            if self.dist.rank != 0:
                self.state = self._read_state()
        self.resumed_from = self.state["done"]
        self.tuple_out = self.state.get("tuple_out")
        if self.resumed_from:
            log.info("resuming after block %d of a run in %s", self.resumed_from - 1, self.work)
        return self.state

    def _value(self, k: str) -> torch.Tensor:
        t = self.store.get(k) if k in self.store else self.sd[k].detach()
        if t.is_floating_point():
            t = t.float()
            if self.dtype is not None:
                t = t.to(self.dtype)
        return t

    def _disk_dtype(self, k: str) -> torch.dtype:
        if k in self.store:
            files = getattr(self.store, "files", None)
            stored = _ST_DTYPES.get(files.dtypes[self.store._map[k]]) if files is not None \
                else torch.float32  # GGUF tensors read as float
        else:
            stored = self.sd[k].dtype
        if stored is not None and stored.is_floating_point:
            return self.dtype or torch.float32
        return stored

    def _copy(self, path: Path, names: list[str]) -> int:
        """Copy source tensors ``names`` to a part file, one tensor in memory at a time."""
        w = SafetensorsWriter(path, [(k, self._disk_dtype(k), tuple(self.sd[k].shape))
                                     for k in names], self.meta)
        try:
            for k in names:
                w.write(k, self._value(k))
        except BaseException:
            w.abort()
            raise
        w.close()
        return len(names)

    def copy_block(self, i: int, names: list[str]) -> int:
        """A block left as it is (outside ``--blocks``): copied from the source."""
        if self.dist.rank == 0:
            self._copy(self.work / f"block-{i:05d}.safetensors", names)
        return len(names)

    def block_done(self, i: int, block: Optional[nn.Module], info: dict[str, Any],
                   hid: Optional[list[torch.Tensor]], fhid: Optional[list[torch.Tensor]],
                   groups: list[list[str]], stash: Optional[bool]) -> None:
        from .checkpoint import _dedup_state_dict, _disk_index

        if block is not None and self.dist.rank == 0:
            pre = self._block_prefix(i)
            sd = _disk_index(block, _dedup_state_dict(block, self.dtype))
            write_safetensors(self.work / f"block-{i:05d}.safetensors",
                              {pre + k: v for k, v in sd.items()}, self.meta)
        if hid is not None:
            acts = {f"h.{j:06d}": h for j, h in enumerate(hid)}
            acts.update({f"f.{j:06d}": h for j, h in enumerate(fhid or [])})
            write_safetensors(self._acts(i + 1), acts)
        self.dist.barrier()
        if self.dist.rank == 0:
            self.state["done"] = i + 1
            self.state["blocks"].append(info)
            self.state["groups"] = groups
            self.state["stash"] = stash
            self.state["tuple_out"] = self.tuple_out
            self._commit()
        else:
            self.state["done"] = i + 1
            self.state["blocks"].append(info)
        self.dist.barrier()
        old = self._acts(i)
        if old.exists():
            old.unlink()

    def _block_prefix(self, i: int) -> str:
        return f"{self.block_prefix}{i}."

    def _acts(self, i: int) -> Path:
        return self.work / f"acts-{i:05d}-r{self.dist.rank}.safetensors"

    def load_acts(self, i: int) -> tuple[list[torch.Tensor], Optional[list[torch.Tensor]]]:
        """The hidden states (and float-path states) entering block ``i`` on this rank."""
        from safetensors import safe_open

        p = self._acts(i)
        if not p.exists():
            raise SourceError(f"--resume: {p} is missing (the calibration states after block "
                              f"{i - 1}); pass --force to start over")
        with safe_open(str(p), "pt") as f:
            keys = sorted(f.keys())
            hid = [f.get_tensor(k) for k in keys if k.startswith("h.")]
            fh = [f.get_tensor(k) for k in keys if k.startswith("f.")]
        return hid, (fh or None)

    # -- the end -------------------------------------------------------------------------
    def finalize(self, config: dict[str, Any], tokenizer, generation_config,
                 summary: dict[str, Any], overwrite: bool, n_blocks: int) -> None:
        """Assemble the checkpoint (rank 0) and remove the work directory."""
        if self.dist.rank != 0:
            self.dist.barrier()
            return
        parts = [self.work / REST] + [self.work / f"block-{i:05d}.safetensors"
                                      for i in range(n_blocks)]
        headers = [read_safetensors_header(p) for p in parts]
        data = sum(max((v["data_offsets"][1] for k, v in h.items() if k != "__metadata__"),
                       default=0) for h in headers)
        with atomic_output_dir(self.out, overwrite=overwrite) as tmp:
            if data <= self.max_shard_bytes:
                specs = [(k, _ST_DTYPES[v["dtype"]], tuple(v["shape"]))
                         for h in headers for k, v in _in_data_order(h)]
                w = SafetensorsWriter(tmp / SINGLE_FILE, specs, self.meta)
                for p, h in zip(parts, headers):
                    base = header_base(p)
                    for k, ent in _in_data_order(h):
                        w.write(k, read_tensor(p, base, ent))
                w.close()
            else:
                n = len(parts)
                weight_map: dict[str, str] = {}
                for j, (p, h) in enumerate(zip(parts, headers)):
                    name = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
                    try:
                        os.link(p, tmp / name)
                    except OSError:
                        shutil.copyfile(p, tmp / name)
                    weight_map.update({k: name for k, _ in _in_data_order(h)})
                write_json(tmp / INDEX_FILE, {"metadata": {"total_size": data},
                                              "weight_map": weight_map})
            from .checkpoint import write_model_files

            write_model_files(tmp, config, generation_config, tokenizer)
            summary["size_on_disk_bytes"] = sum(f.stat().st_size for f in tmp.iterdir()
                                                if f.is_file())
            write_json(tmp / "bitpress_summary.json", summary)
        shutil.rmtree(self.work, ignore_errors=True)
        self.dist.barrier()


def _in_data_order(header: dict[str, Any]) -> list[tuple[str, dict]]:
    items = [(k, v) for k, v in header.items() if k != "__metadata__"]
    return sorted(items, key=lambda kv: kv[1]["data_offsets"][0])
