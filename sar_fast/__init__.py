"""sar_fast: SAR post-training for scale-wise autoregressive image models (VAR, FlexVAR).

The library is at the top (sar, schedules, sampling, rng, nn, ops/, models/, patch/), data/
and metrics/ serve the trainer (train/) and the applications (evaluate, sample, cache,
memory, convert, study/); docs/design.md draws the tree."""
import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys

from .schedules import STANDARD_SCHEDULE, Schedule, random_flexvar_schedule

__version__ = "0.1.0"

__all__ = ["STANDARD_SCHEDULE", "Schedule", "random_flexvar_schedule", "__version__"]


class _CheckoutKernels(_abc.MetaPathFinder):
    """Finds sar_fast.kernels in the checkout's top-level kernels/ (where setup.py installs it
    from): a run from a source tree, with nothing installed, imports the same Triton kernels
    an install would."""

    def __init__(self, kernels_dir: str):
        self.kernels_dir = kernels_dir

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "sar_fast.kernels":
            return None
        return _util.spec_from_file_location(fullname, _os.path.join(self.kernels_dir, "__init__.py"),
                                             submodule_search_locations=[self.kernels_dir])


def _bind_checkout_kernels() -> None:
    """An install holds sar_fast/kernels (a regular install a copy, a developer checkout may
    link it); a bare checkout does not: there its kernels/ beside sar_fast/ is bound first,
    ahead of any other tree's editable install, so kernels and package come from one tree."""
    package_dir = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isdir(_os.path.join(package_dir, "kernels")):
        return
    root = _os.path.dirname(package_dir)
    kernels_dir = _os.path.join(root, "kernels")
    is_checkout = _os.path.isfile(_os.path.join(root, "setup.py"))
    if not (is_checkout and _os.path.isfile(_os.path.join(kernels_dir, "__init__.py"))):
        return  # an editable install's own finder maps sar_fast.kernels
    if not any(isinstance(f, _CheckoutKernels) and f.kernels_dir == kernels_dir for f in _sys.meta_path):
        _sys.meta_path.insert(0, _CheckoutKernels(kernels_dir))


_bind_checkout_kernels()
