"""Triton kernels (@triton.jit + launch helpers) only: no autograd, no validation.

Installed as sar_fast.kernels; the user-facing ops live in sar_fast.ops.
"""
