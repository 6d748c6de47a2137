"""capcli: train, align, evaluate and serve an image captioner from the command line."""

__version__ = "0.1.0"
