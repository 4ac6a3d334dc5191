"""Quantization passes over matrices: RTN, GPTQ, decoupleQ; and the trainable stand-in of one
quantized linear (:mod:`~bitpress.quant.tunable`) that float-part recovery trains. The
model-level recovery stages live with the pipeline: block-wise minimisation
(:mod:`bitpress.pipeline.blocktune`) and end-to-end float-part fine-tuning
(:mod:`bitpress.pipeline.finetune`).

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
from .spec import QuantSpec

PassFn = Callable[[torch.Tensor, Optional[torch.Tensor], QuantSpec], QuantizedWeight]

PASSES: dict[str, PassFn] = {"rtn": rtn, "gptq": gptq, "decoupleq": decoupleq}

__all__ = ["QuantSpec", "rtn", "gptq", "PASSES", "PassFn", "HessianFactor", "NumericalError",
           "prepare_hessian", "gptq_round_fixed_grid", "hessian_loss", "decoupleq",
           "decoupleq_solve", "DecoupleQReport", "box_relaxed_codes", "least_squares_params"]
