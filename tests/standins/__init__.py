"""Minimal stand-ins for the VAR / FlexVAR / SAR model classes that sar_fast.patch targets.

The original projects' code cannot be committed here. These classes are written from scratch:
they reproduce only the facts the patch relies on (class names, attribute names, module tree,
call signatures, the dense-mask numerics), read from FoundationVision/VAR,
jiaosiyu1999/FlexVAR and GengzeZhou/SAR.
"""
