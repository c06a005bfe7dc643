"""qsae: sparse autoencoders for a language model residual stream, from rollouts to release."""
__version__ = "0.1.0"
