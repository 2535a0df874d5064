"""Input images for the command-line client: reading, preprocessing, class names.

Torch-free (numpy, and Pillow imported only when a camera format is read), so `meshci
infer` starts without importing torch."""

from meshci.images.labels import imagenet_classes, read_labels, top_labels
from meshci.images.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREPROCESSING,
    InputImageError,
    Preprocessing,
    preprocess,
    read_image,
)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PREPROCESSING", "InputImageError", "Preprocessing", "imagenet_classes",
           "preprocess", "read_image", "read_labels", "top_labels"]
