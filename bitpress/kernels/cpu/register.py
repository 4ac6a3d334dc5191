"""Registration of the ``cpu_*`` implementations of ``bitpress::dense_qmm`` and
``bitpress::sparse_qmm`` (one per activation mode, plus the GEMM path ``cpu_blas``)."""
from __future__ import annotations

from typing import Optional

from ..ops import register_impl
from .calls import dense_qmm_cpu, sparse_qmm_cpu
from .plans import dense_plan, sparse_plan
from .support import dense_supports, sparse_supports


def _native(mode: Optional[str]):
    def dense(x, qweight, scales, zeros, bias, bits, group_size, in_features):
        return dense_qmm_cpu(x, qweight, scales, zeros, bias, bits, group_size, in_features,
                             mode=mode)

    def sparse(x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits, group_size, in_features):
        return sparse_qmm_cpu(x, row_ptr, col_idx, qvalues, scales, zeros, bias, bits,
                              group_size, in_features, mode=mode)

    # modules (bitpress.nn) bind a weight once through ``plan`` when it is there
    dense.plan = lambda args: dense_plan(args, mode)
    sparse.plan = lambda args: sparse_plan(args, mode)
    return dense, sparse


for _name, _mode_arg, _prio in (("cpu_native", None, 10), ("cpu_lut", "lut", 6),
                                ("cpu_int8", "int8", 5), ("cpu_exact", "exact", 4),
                                ("cpu_lut63", "lut63", 3), ("cpu_blas", "blas", 2)):
    _d, _s = _native(_mode_arg)
    register_impl("dense_qmm", "cpu", _name, _d, _prio, dense_supports)
    register_impl("sparse_qmm", "cpu", _name, _s, _prio, sparse_supports)
