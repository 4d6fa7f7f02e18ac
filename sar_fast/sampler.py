"""The sampling API under its first name (`from sar_fast.sampler import generate`):
generation lives next to the model (sar_fast.models.generate) and the helpers in the leaf
module sar_fast.sampling. Nothing inside the package imports this module.
"""
from .models.generate import Samples, generate
from .sampling import CFG_RAMPS, FLEXVAR_TRAINED_SIDES, guidance_weight, sample_top_k_top_p

__all__ = ["CFG_RAMPS", "FLEXVAR_TRAINED_SIDES", "Samples", "generate", "guidance_weight", "sample_top_k_top_p"]
