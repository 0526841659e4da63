"""The GPU stage: AlphaFold2 inference with compilation reused across models and proteins.

This package is the only place that imports jax and `alphafold.model`, always lazily inside
functions, so importing `parafold.fold.settings` or `parafold.fold.buckets` stays cheap.
"""
