"""Model registry: built-in models by name, user models as `package.module:callable`."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from meshci.errors import MeshciError, UnknownModelError
from meshci.models import convnext, densenet, googlenet, mobile, resnet, shufflenet, squeezenet, vgg
from meshci.weights import held_file, split_model_name

log = logging.getLogger(__name__)

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "vgg11": vgg.vgg11,
    "vgg16": vgg.vgg16,
    "vgg16_bn": vgg.vgg16_bn,
    "vgg19": vgg.vgg19,
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "squeezenet1_1": squeezenet.squeezenet1_1,
    "googlenet": googlenet.googlenet,
    "densenet121": densenet.densenet121,
    "convnext_tiny": convnext.convnext_tiny,
    "shufflenet_v2_x1_0": shufflenet.shufflenet_v2_x1_0,
    "mobilenet_v3_small": mobile.mobilenet_v3_small,
    "efficientnet_b0": mobile.efficientnet_b0,
}
MODEL_NAMES: tuple[str, ...] = tuple(BUILDERS)


class WeightsError(MeshciError):
    """A --weights file that cannot be read or does not fit the model."""


class ModelNotAllowedError(UnknownModelError):
    """A user model (`package.module:callable`) that this node's allowlist does not name."""


def valid_allow_pattern(pattern: str) -> bool:
    """An allowlist entry: an exact `package.module:callable` or a package prefix `pkg.*`."""
    if pattern.endswith(".*"):
        prefix = pattern[:-2]
        return bool(prefix) and ":" not in prefix and all(part.isidentifier() for part in prefix.split("."))
    module, sep, attr = pattern.partition(":")
    return bool(sep) and all(p.isidentifier() for p in module.split(".")) and \
        all(p.isidentifier() for p in attr.split("."))


def model_allowed(name: str, patterns: Sequence[str]) -> bool:
    """Built-in models always; a user model only when a pattern names it exactly or
    `pkg.*` covers its module (`pkg` itself or any module below it); `MODEL@DIGEST` (trained
    weights) only when the patterns hold `@DIGEST` too (the node holds that file)."""
    base, digest = split_model_name(name)
    if digest is not None:
        return f"@{digest}" in patterns and model_allowed(base, patterns)
    if name in BUILDERS:
        return True
    module = name.partition(":")[0]
    for pattern in patterns:
        if pattern.endswith(".*"):
            prefix = pattern[:-2]
            if ":" in name and (module == prefix or module.startswith(prefix + ".")):
                return True
        elif name == pattern:
            return True
    return False


def check_model_allowed(name: str, patterns: Sequence[str]) -> None:
    """Raise ModelNotAllowedError unless `model_allowed(name, patterns)`; nothing is imported."""
    if model_allowed(name, patterns):
        return
    base, digest = split_model_name(name)
    if digest is not None and f"@{digest}" not in patterns:
        raise UnknownModelError(f"this node holds no weights {digest} for {base!r}: start every node with "
                                "--weights FILE, the same file as the client's")
    if digest is not None:
        name = base
    if ":" not in name:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    raise ModelNotAllowedError(f"model {name!r} is not allowed on this node (built-in models: "
                               f"{', '.join(MODEL_NAMES)}; start the node with --allow-model to serve user models)")


def _resolve(name: str) -> Callable[[], nn.Module]:
    if name in BUILDERS:
        return BUILDERS[name]
    if ":" not in name:
        known = ", ".join(MODEL_NAMES)
        raise UnknownModelError(f"unknown model {name!r}; known models: {known} (or package.module:callable)")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # the user named a module that is not importable: say which, in one line
        raise UnknownModelError(f"cannot import {module_name!r} for model {name!r}: {exc}") from exc
    builder = module
    for part in attr.split("."):
        builder = getattr(builder, part, None)
        if builder is None:
            raise UnknownModelError(f"model {name!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(builder):
        raise UnknownModelError(f"model {name!r}: {attr!r} is not callable")
    return builder  # type: ignore[return-value]


def build_model(name: str, *, seed: int = 0, weights: str | Path | None = None) -> nn.Module:
    """The named model in eval mode, initialised deterministically from `seed`.

    `weights` names a file holding a state_dict (torch.save) that is loaded strictly;
    `MODEL@DIGEST` loads the weights file this process holds under that digest
    (`meshci.weights`).
    """
    name, digest = split_model_name(name)
    if digest is not None and weights is None:
        weights = held_file(digest)
        if weights is None:
            raise WeightsError(f"no weights file with digest {digest} here: start the node with --weights FILE")
    builder = _resolve(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder()
        if not isinstance(model, nn.Module):
            raise UnknownModelError(f"model {name!r}: the callable returned {type(model).__name__}, not an nn.Module")
        if name in BUILDERS:
            calibrate_batchnorm(model)
    if weights is not None:
        load_weights(model, weights, name)
    return model.eval()


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, size: int = 96) -> None:
    """Give every batch norm random affine parameters and running statistics measured on noise.

    With torchvision's init alone, eval-mode batch norm is nearly the identity (so folding it
    would go untested) and ResNet activations grow to hundreds. Here each batch norm gets a
    random scale and shift, and its running mean/variance are measured on a random batch, so
    activations stay O(1). Uses the global RNG: call it under a seeded `fork_rng`.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]
    if not norms:
        return
    for bn in norms:
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batch
    was_training = model.training
    model.train()
    model(torch.randn(4, 3, size, size))
    model.train(was_training)
    for bn in norms:
        bn.momentum = 0.1


def load_weights(model: nn.Module, path: str | Path, name: str = "model") -> None:
    """Load a state_dict file into `model` strictly (every key, every shape)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch.load raises many kinds (OSError, EOFError, UnpicklingError, struct.error, ...)
        # on a missing, truncated or foreign file: all are the user's file, reported in one line
        raise WeightsError(f"cannot load weights {str(path)!r}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights {str(path)!r} hold a {type(state).__name__}, not a state_dict")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise WeightsError(f"weights {str(path)!r} do not fit model {name!r}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    log.info("loaded %d tensors from %s into %s", len(state), path, name)
