"""rrome: edit facts in causal language models with R-ROME."""

__version__ = "0.1.0"
