"""sar_fast.ops: the fused ops, each validated and dispatched to its kernel or its reference.

Backend: SAR_FAST_BACKEND=auto|kernel|reference, or set_backend()/use_backend().
Deterministic mode (bit-identical across ranks and runs): SAR_FAST_DETERMINISTIC=1, or
set_deterministic()/use_deterministic() (see sar_fast.ops.gpu).
"""
from . import reference
from .attention import ScaleLayout, cached_attention, scale_causal_attention, scale_layout
from .backend import BACKENDS, BackendError, get_backend, set_backend, use_backend
from .cross_entropy import fused_linear_cross_entropy, fused_linear_kl_div
from .gpu import is_deterministic, set_deterministic, use_deterministic
from .padded_attention import padded_cached_attention, padded_scale_causal_attention
from .quantize import msq_decode, msq_encode
from .sample import sample_survivors
from .scale_shift import resize_pos_table, scale_shift, ssr_inputs, transition_rows

__all__ = [
    "BACKENDS", "BackendError", "get_backend", "set_backend", "use_backend",
    "is_deterministic", "set_deterministic", "use_deterministic",
    "scale_shift", "ssr_inputs", "transition_rows", "resize_pos_table", "scale_causal_attention", "cached_attention",
    "ScaleLayout", "scale_layout", "padded_scale_causal_attention", "padded_cached_attention",
    "fused_linear_cross_entropy", "fused_linear_kl_div", "msq_encode", "msq_decode", "sample_survivors", "reference",
]
