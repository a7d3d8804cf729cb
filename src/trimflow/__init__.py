"""trimflow: fine-tune, prune, quantize and measure BERT-family encoders, reproducibly."""

__version__ = "0.1.0"
