"""lightning-ood: train image classifiers with PyTorch Lightning and benchmark post-hoc OOD detection."""

__version__ = "0.1.0"
