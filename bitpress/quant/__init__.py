"""Quantization passes over matrices: RTN, GPTQ, decoupleQ; and the float-part recovery
shared by decoupleQ and GQSA: block-wise minimisation (:func:`make_block_tuner`, a block hook
of the streaming pipeline) and end-to-end float-part fine-tuning
(:func:`finetune_float_parts`, :func:`write_float_parts`).

``PASSES`` maps a method name (``--method``) to its pass function ``(W, H, spec) ->
QuantizedWeight``.
"""
from typing import Callable, Optional

import torch

from ..formats import QuantizedWeight
from .gptq import (HessianFactor, NumericalError, gptq, gptq_round_fixed_grid, hessian_loss,
                   prepare_hessian)
from .decoupleq import (DecoupleQReport, box_relaxed_codes, decoupleq, decoupleq_solve,
                        least_squares_params)
from .rtn import rtn
from .blocktune import BlockTuner, BlockTuneRecord, block_output_loss, make_block_tuner, norm_parameters
from .finetune import finetune_float_parts, float_part_names, lm_loss, write_float_parts
from .spec import QuantSpec

PassFn = Callable[[torch.Tensor, Optional[torch.Tensor], QuantSpec], QuantizedWeight]

PASSES: dict[str, PassFn] = {"rtn": rtn, "gptq": gptq, "decoupleq": decoupleq}

__all__ = ["QuantSpec", "rtn", "gptq", "PASSES", "PassFn", "HessianFactor", "NumericalError",
           "prepare_hessian", "gptq_round_fixed_grid", "hessian_loss", "decoupleq",
           "decoupleq_solve", "DecoupleQReport", "box_relaxed_codes", "least_squares_params",
           "make_block_tuner", "BlockTuner", "BlockTuneRecord", "block_output_loss",
           "norm_parameters", "finetune_float_parts", "write_float_parts", "float_part_names",
           "lm_loss"]
