"""distalex: the two-tower AlexNet of Krizhevsky et al. (2012), trained on real tensor-parallel process groups."""

__version__ = "0.1.0"
