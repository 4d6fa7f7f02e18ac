"""sar_fast: SAR post-training for scale-wise autoregressive image models (VAR, FlexVAR)."""
import os as _os

__version__ = "0.1.0"

# kernels/ sits at the repository top level (Triton only) and is installed as
# sar_fast.kernels; from a source checkout, let `import sar_fast.kernels` find it there.
_here = _os.path.dirname(_os.path.abspath(__file__))
_top = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
        _os.path.join(_top, "kernels", "__init__.py")):
    __path__.append(_top)  # noqa: F821 - package __path__

from .schedules import STANDARD_SCHEDULE, random_flexvar_schedule, validate_schedule  # noqa: E402

__all__ = ["STANDARD_SCHEDULE", "random_flexvar_schedule", "validate_schedule", "__version__"]
