"""sar_fast: SAR post-training for scale-wise autoregressive image models (VAR, FlexVAR)."""
from .schedules import STANDARD_SCHEDULE, random_flexvar_schedule, validate_schedule

__version__ = "0.1.0"

__all__ = ["STANDARD_SCHEDULE", "random_flexvar_schedule", "validate_schedule", "__version__"]
