"""Class names for a model's outputs: the 1000 ImageNet classes (shipped with meshci, in
torchvision's order) or a user's file of one name per line."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

from meshci.errors import MeshciError


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The ImageNet-1k class names, index i naming output i of a torchvision-trained model."""
    text = resources.files("meshci.images").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(text.splitlines())


def read_labels(path: Path) -> tuple[str, ...]:
    """One class name per line (blank lines are names too: the line number is the index)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        # a --labels file we cannot read: the user's to fix, one line
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise MeshciError(f"cannot read labels file {path}: {reason}") from exc
    return tuple(text.splitlines())


def top_labels(top: Sequence[Sequence[float]], n_classes: int, labels: Sequence[str] | None = None
               ) -> list[str | None]:
    """The name of each top-5 entry's class: from `labels`, else the ImageNet names when the
    model has 1000 outputs, else None (a model whose classes we do not know)."""
    if labels is None and n_classes == len(imagenet_classes()):
        labels = imagenet_classes()
    names: list[str | None] = []
    for entry in top:
        index = int(entry[0])
        names.append(labels[index] if labels is not None and 0 <= index < len(labels) else None)
    return names
