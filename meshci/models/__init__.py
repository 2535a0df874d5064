"""The model zoo (VGG, ResNet with torchvision key names) and user models."""

from meshci.models.registry import MODEL_NAMES, WeightsError, build_model, load_weights

__all__ = ["MODEL_NAMES", "WeightsError", "build_model", "load_weights"]
