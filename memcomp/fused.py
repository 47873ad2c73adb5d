"""The public facade for memcomp's fused ops: what trainers and users import.

    from memcomp.fused import segment_mean_proj, use_backend

Every op dispatches per call between its Triton kernel and its eager reference (see
``memcomp.kernels.backend``: ``MEMCOMP_BACKEND`` = auto | triton | reference, or ``use_backend``).
"""

from memcomp.kernels.backend import BACKENDS, current_backend, use_backend
from memcomp.kernels.segment_mean_proj import segment_mean_proj, segment_mean_proj_reference

__all__ = ["BACKENDS", "current_backend", "use_backend", "segment_mean_proj", "segment_mean_proj_reference"]
