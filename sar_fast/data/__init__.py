"""Training data: image folders (images.py), the embedded digits (digits.py), the code cache
(codes.py: reader and writer) and the batches the trainer draws (loader.py: the resumable
sampler and DataSource)."""
