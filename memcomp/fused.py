"""The public facade for memcomp's fused ops: what trainers and users import.

    from memcomp.fused import segment_mean_proj, linear_cross_entropy, nf4_quantize, nf4_dequantize, use_backend

Every op dispatches per call between its Triton kernel and its eager reference (see
``memcomp.kernels.backend``: ``MEMCOMP_BACKEND`` = auto | triton | reference, or ``use_backend``);
``linear_cross_entropy``'s Triton path is liger-kernel's fused linear cross-entropy.
"""

from memcomp.kernels.backend import BACKENDS, current_backend, use_backend
from memcomp.kernels.linear_cross_entropy import linear_cross_entropy
from memcomp.kernels.packed_attention import packed_attention
from memcomp.kernels.segment_mean_proj import segment_mean_proj, segment_mean_proj_reference
from memcomp.nf4 import NF4Weight, nf4_lora_linear, nf4_quantize
from memcomp.nf4 import nf4_dequantize_weight as nf4_dequantize

__all__ = ["BACKENDS", "current_backend", "use_backend", "segment_mean_proj", "segment_mean_proj_reference",
           "NF4Weight", "nf4_quantize", "nf4_dequantize", "nf4_lora_linear", "packed_attention", "linear_cross_entropy"]
