"""Experiments built on the pipeline: ``mini_tofu`` (the paper's comparison in miniature, on real TOFU data)."""
