"""torch.library ops (``bitpress::dense_qmm``, ``bitpress::sparse_qmm``), their reference
implementations, per-device dispatch and the native-extension loader."""
from . import native, reference
from .ops import dense_qmm, register_impl, registered_impls, select_impl, sparse_qmm, use_impl

__all__ = ["dense_qmm", "sparse_qmm", "register_impl", "registered_impls", "select_impl",
           "use_impl", "native", "reference"]
