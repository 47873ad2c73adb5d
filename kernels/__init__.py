"""memcomp's Triton kernels (installed as ``memcomp.kernels``), one op per file, each with its eager
reference and a ``torch.library`` registration under the ``memcomp::`` namespace. Never imports
transformers."""

from memcomp.kernels.backend import BACKENDS, current_backend, use_backend
from memcomp.kernels.segment_mean_proj import segment_mean_proj, segment_mean_proj_reference

__all__ = ["BACKENDS", "current_backend", "use_backend", "segment_mean_proj", "segment_mean_proj_reference"]
