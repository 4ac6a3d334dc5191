"""The logical weight format, bit packing, block-sparse rows and checkpoint I/O."""
from .packing import SUPPORTED_BITS, check_bits, pack_codes, pack_factor, packed_words, unpack_codes
from .qweight import (QuantizedWeight, check_group_size, dequantize_bsr, dequantize_codes,
                      dequantize_dense, effective_group_size, expand_groups, num_groups,
                      validate_bsr, bsr_to_keep_bits, keep_bits_bytes, keep_bits_to_bsr)
from .quantize import (PARAM_DTYPES, check_grid_fields, check_integer_zeros, integer_zero_params, integer_zero_scale,
                       keep_mask_from_scores, magnitude_keep_mask, minmax_params, qrange,
                       quantize_rtn, round_to_grid, zero_points)
from .checkpoint import (FORMAT_VERSION, SafetensorsDir, atomic_output_dir,
                         make_quantization_config, validate_quantization_config, write_shards)

__all__ = [
    "SUPPORTED_BITS", "check_bits", "pack_codes", "pack_factor", "packed_words", "unpack_codes",
    "QuantizedWeight", "check_group_size", "dequantize_codes", "dequantize_dense",
    "dequantize_bsr", "effective_group_size", "expand_groups", "num_groups",
    "validate_bsr", "bsr_to_keep_bits", "keep_bits_bytes", "keep_bits_to_bsr", "keep_mask_from_scores", "magnitude_keep_mask", "minmax_params", "qrange",
    "quantize_rtn", "round_to_grid", "PARAM_DTYPES", "check_grid_fields", "check_integer_zeros", "integer_zero_params",
    "integer_zero_scale", "zero_points", "FORMAT_VERSION", "SafetensorsDir", "atomic_output_dir",
    "make_quantization_config", "validate_quantization_config", "write_shards",
]
