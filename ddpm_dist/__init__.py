"""ddpm-dist: distributed training and evaluation of DDPM (Ho, Jain & Abbeel, 2020)."""

__version__ = "0.1.0"
