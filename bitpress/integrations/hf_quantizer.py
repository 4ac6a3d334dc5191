"""transformers integration: the ``bitpress`` quantization config and ``HfQuantizer``.

Registered through transformers' public API (``register_quantization_config`` /
``register_quantizer``) when bitpress is imported (see :mod:`bitpress.integrations`), so that

    import bitpress
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir)

builds the architecture with bitpress modules and fills it exactly as :func:`bitpress.load`
does (the same reader, with the same checks: a missing, extra, mis-shaped or edited tensor
raises, nothing is ever initialised randomly). ``model.save_pretrained(out)`` writes a
bitpress checkpoint (packed tensors, block-sparse bitmasks, guards, ``quantization_config``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING,
                                          AUTO_QUANTIZER_MAPPING, register_quantization_config,
                                          register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import FormatError
from ..formats.checkpoint import GUARD_SUFFIX, QUANT_METHOD, validate_quantization_config


class BitpressConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a bitpress checkpoint (every key of the on-disk dict
    kept as an attribute; validated on construction)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("quant_method", QUANT_METHOD)
        validate_quantization_config(kwargs)
        for k, v in kwargs.items():
            setattr(self, k, copy.deepcopy(v))

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)


class BitpressHfQuantizer(HfQuantizer):
    """Loads pre-quantized bitpress checkpoints (it cannot quantize a float model: use
    ``bitpress compress``)."""

    requires_calibration = True

    def __init__(self, quantization_config: BitpressConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._expected: dict[str, tuple] = {}
        self._checkpoint_dir: Path | None = None

    def validate_environment(self, device_map=None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and len({str(v) for v in device_map.values()}) > 1:
            raise ValueError("bitpress checkpoints load onto one device; pass device_map=None "
                             "or a single device, not a multi-device or offloading map")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from ..pipeline.checkpoint import replace_packed_modules

        if not checkpoint_files:
            raise ValueError("the bitpress quantizer loads from a checkpoint directory of "
                             "safetensors files; from_pretrained got none (state_dict=...?)")
        dirs = {Path(f).parent for f in checkpoint_files}
        if len(dirs) != 1 or any(not str(f).endswith(".safetensors") for f in checkpoint_files):
            raise ValueError(f"bitpress checkpoints are safetensors shards in one directory; "
                             f"got {checkpoint_files}")
        self._checkpoint_dir = dirs.pop()
        qcfg = self.quantization_config.to_dict()
        self._expected = replace_packed_modules(model, qcfg)
        # architectures' _init_weights may touch `parent.<linear>.weight` (GPT-2 scales
        # c_proj.weight) of modules it thinks uninitialised: give each packed module an
        # empty placeholder that transformers' init functions skip; removed after loading
        from ..pipeline.checkpoint import packed_modules

        for m in packed_modules(model).values():
            ph = torch.empty(0, device="meta")
            ph._is_hf_initialized = True
            m.__dict__["weight"] = ph
        # transformers' own loading sees the guards / bitmasks as unexpected and the rebuilt
        # block-sparse index as missing; read_state() below accounts for all of them
        model._keys_to_ignore_on_load_unexpected = set(
            model._keys_to_ignore_on_load_unexpected or ()) | {
            rf"\.{GUARD_SUFFIX}$", r"\.keep_bits$"}
        model._keys_to_ignore_on_load_missing = set(
            model._keys_to_ignore_on_load_missing or ()) | {r"\.row_ptr$", r"\.col_idx$"}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        """Re-read every tensor with bitpress's reader: whatever transformers loaded (or
        initialised for a tensor it did not find) is replaced, and any problem raises."""
        from ..formats import SafetensorsDir
        from ..pipeline.checkpoint import packed_modules, read_state

        for m in packed_modules(model).values():
            m.__dict__.pop("weight", None)
        emb = model.get_input_embeddings().weight
        dtype = emb.dtype if emb.is_floating_point() else None
        read_state(model, SafetensorsDir(self._checkpoint_dir),
                   self.quantization_config.to_dict(), self._expected, device=None, dtype=dtype)
        _drop_remote_code(model.config)
        return model

    def get_state_dict_and_metadata(self, model):
        from ..pipeline.checkpoint import disk_state_dict, packed_modules, quantization_config_of

        if not packed_modules(model):  # unpacked (e.g. by bitpress export): a plain model
            return None, {}
        qcfg = quantization_config_of(model, self.quantization_config.to_dict())
        self.quantization_config = BitpressConfig(**qcfg)
        model.config.quantization_config = self.quantization_config
        return disk_state_dict(model), {"bitpress_format_version": str(qcfg["format_version"])}

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _drop_remote_code(config) -> None:
    from . import REMOTE_CODE_CLASS

    am = getattr(config, "auto_map", None)
    if isinstance(am, dict) and am.get("AutoModelForCausalLM") == REMOTE_CODE_CLASS:
        am = {k: v for k, v in am.items() if k != "AutoModelForCausalLM"}
        if am:
            config.auto_map = am
        else:
            del config.auto_map


def register() -> None:
    """Register the config and quantizer under ``quant_method="bitpress"`` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(BitpressConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(BitpressHfQuantizer)


def attach_quantizer(model, qcfg: dict[str, Any]) -> None:
    """Give a model built by :func:`bitpress.load` the config and quantizer that
    ``from_pretrained`` would have set, so ``save_pretrained`` writes a bitpress checkpoint."""
    register()
    cfg = BitpressConfig(**qcfg)
    model.config.quantization_config = cfg
    model.hf_quantizer = BitpressHfQuantizer(cfg, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def load_with_transformers(path, *model_args, config=None, **kwargs):
    """``from_pretrained`` with the architecture's own transformers class (used by the
    checkpoint's remote-code loader, :mod:`bitpress.integrations.modeling_bitpress`)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    register()
    for k in ("trust_remote_code", "adapter_kwargs", "_from_auto"):
        kwargs.pop(k, None)
    if config is None:
        config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is None:
        raise FormatError(f"{path}: config.json has no quantization_config; not a bitpress "
                          f"checkpoint")
    _drop_remote_code(config)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return cls.from_pretrained(path, *model_args, config=config, **kwargs)
