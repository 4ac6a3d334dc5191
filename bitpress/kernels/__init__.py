"""torch.library ops (``bitpress::dense_qmm``, ``bitpress::sparse_qmm``), their reference
implementations, per-device dispatch and the native-extension loader."""
from . import native, reference
from .ops import dense_qmm, register_impl, registered_impls, select_impl, sparse_qmm, use_impl
try:  # CPU fast paths (need bitpress._C); without them the reference runs
    from . import cpu  # noqa: F401
except ImportError:  # pragma: no cover
    pass
try:  # GPU fast paths (Triton, CuPy CUDA GEMV): register for cuda only when a GPU exists
    from . import triton as _gpu  # noqa: F401
except ImportError:  # pragma: no cover
    pass
try:  # tensor-core CUDA kernels (NVRTC via CuPy): registers only with a GPU and CuPy
    from . import cuda_mma as _mma  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["dense_qmm", "sparse_qmm", "register_impl", "registered_impls", "select_impl",
           "use_impl", "native", "reference"]
