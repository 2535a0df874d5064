"""The preprocessing a model declares for its input pictures.

Built-in models (and built-ins with trained weights, `MODEL@DIGEST`) are ImageNet
classifiers: `IMAGENET` (torchvision's evaluation transform), without importing anything.
A user model (`package.module:callable`) declares its own by an attribute of its callable
(or, failing that, of its module) named ``meshci_preprocessing``: a `Preprocessing` or a
dict with its fields, e.g.

    def small_net() -> nn.Module: ...
    small_net.meshci_preprocessing = {"size": [96, 128], "mean": [0.5, 0.5, 0.5],
                                      "std": [0.25, 0.25, 0.25], "resize": "stretch"}

A user model that declares nothing gets `IMAGENET`. Reading the declaration imports the
user's module in the client (only for a picture given with ``--input``): the client holds
that module anyway, as the model's owner.
"""

from __future__ import annotations

import importlib

from meshci.errors import UnknownModelError
from meshci.images.preprocess import IMAGENET, Preprocessing

ATTRIBUTE = "meshci_preprocessing"


def declared_preprocessing(model: str) -> Preprocessing:
    """The preprocessing `model` declares (see the module docstring); UnknownModelError
    when a user model cannot be imported, InputImageError when its declaration is wrong."""
    name = model.partition("@")[0]
    if ":" not in name:
        return IMAGENET  # a built-in model: an ImageNet classifier
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # the picture cannot be prepared for a model whose code is not here: one line
        raise UnknownModelError(f"cannot import {module_name!r} for model {name!r}: {exc}") from exc
    target: object = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise UnknownModelError(f"model {name!r}: {module_name!r} has no attribute {attr!r}")
    for holder, where in ((target, name), (module, module_name)):
        declared = getattr(holder, ATTRIBUTE, None)
        if declared is not None:
            return Preprocessing.of(declared, f"{where}.{ATTRIBUTE}")
    return IMAGENET


__all__ = ["ATTRIBUTE", "declared_preprocessing"]
