"""Sparsity passes over matrices: GQSA (group-sparse + group-quantized) and the 2:4 /
unstructured SparseGPT-style baselines.

``SPARSE_PASSES`` maps a method name to its pass ``(W, H, spec)``: ``gqsa`` returns a
group-sparse :class:`~bitpress.formats.QuantizedWeight`; the baselines return a
:class:`MaskedQuantizedWeight` ``(qweight, elem_mask)`` (element masks are not part of the
logical format; the baselines are evaluated as fake-quantised float models).
"""
from .baselines import (MaskedQuantizedWeight, bits_per_weight_24, bits_per_weight_gqsa,
                        bits_per_weight_unstructured, semi_structured_24, unstructured)
from .gqsa import (GQSA_DEFAULT_GROUP, gqsa, gqsa_keep_mask, gqsa_spec, gqsa_with_mask,
                   group_scores, obs_group_scores)
from .lsq import MaskedLeastSquares
from .sweep import prune_quantize_sweep

SPARSE_PASSES = {"gqsa": gqsa, "sparsegpt24": semi_structured_24, "unstructured": unstructured}

__all__ = ["SPARSE_PASSES", "gqsa", "gqsa_spec", "gqsa_keep_mask", "gqsa_with_mask",
           "group_scores", "obs_group_scores", "GQSA_DEFAULT_GROUP", "MaskedLeastSquares",
           "prune_quantize_sweep", "semi_structured_24", "unstructured", "MaskedQuantizedWeight",
           "bits_per_weight_24", "bits_per_weight_unstructured", "bits_per_weight_gqsa"]
