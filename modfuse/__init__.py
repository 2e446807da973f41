"""modfuse: fused one-pass per-modality gradient statistics for balanced multimodal learning."""

from modfuse import methods, reference
from modfuse.balancer import Balancer
from modfuse.ops import (
    available_backends,
    calibrated_aggregate,
    calibrated_aggregate_samples,
    gram,
    linear_moments,
    moments,
    moments_accumulate_,
    segment_moments,
    segment_scale_,
    segment_sq_norms,
    tensor_sq_norms,
    weighted_sum,
)

__version__ = "0.1.0"
__all__ = [
    "Balancer",
    "methods",
    "available_backends",
    "calibrated_aggregate",
    "calibrated_aggregate_samples",
    "gram",
    "linear_moments",
    "moments",
    "moments_accumulate_",
    "reference",
    "segment_moments",
    "segment_scale_",
    "segment_sq_norms",
    "tensor_sq_norms",
    "weighted_sum",
]
