"""safetransfer: run, compare and reproduce regularized fine-tuning."""

__version__ = "0.1.0"
