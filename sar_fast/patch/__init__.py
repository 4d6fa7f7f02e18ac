"""Drop sar_fast's fused ops into users' own models: VAR and FlexVAR / SAR (var.py) and
Infinity (infinity.py), per instance and reversibly; core.py holds the swap machinery and
the table of every upstream attribute the patches rely on."""
from .core import REQUIRED, PatchError, PatchReport, is_patched, unpatch
from .infinity import install_flash_attn_shim, patch_infinity
from .var import hidden_states, patch_flexvar, patch_model, patch_var

__all__ = ["PatchError", "PatchReport", "REQUIRED", "patch_model", "patch_var", "patch_flexvar", "patch_infinity",
           "install_flash_attn_shim", "unpatch", "is_patched", "hidden_states"]
