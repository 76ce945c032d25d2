"""captioner: image captioning with spatial attention (Show, Attend and Tell)."""

__version__ = "0.1.0"
