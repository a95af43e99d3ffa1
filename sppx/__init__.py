"""sppx: prune, tune with sparsity-preserving adapters, merge, evaluate and export LLMs."""

__version__ = "0.1.0"
