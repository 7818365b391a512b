"""DSS animal classification: camera-trap images -> pickles -> fine-tuned ResNet18."""

__version__ = "0.1.0"
