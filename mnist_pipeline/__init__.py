"""A reproducible MNIST training pipeline: PyTorch models driven by DVC stages."""

__version__ = "0.1.0"
