"""namm-transfer: Neural Attention Memory Models (Cetin et al., "An Evolved Universal Transformer Memory",
ICLR 2025): evolve them on text, load them, attach them to other transformers, and measure the transfer."""

__version__ = "0.1.0"
