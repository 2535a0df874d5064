"""Trained weights on a mesh: every node holds the same file, named on the wire by digest.

A node started with `--weights FILE` registers the file under the digest of its bytes; a
client asks for `MODEL@DIGEST` (`meshci infer --weights FILE` computes the digest of its own
copy). A node serves that name only when it holds a file with that digest, so every tile of
a request is computed with the same weights, or the request is refused with the reason.
Torch-free: the client imports it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from meshci.errors import MeshciError

DIGEST_HEX = 16  # 64 bits of SHA-256: names a file among a mesh's few
ENV_VAR = "MESHCI_WEIGHTS_FILES"  # the files a node holds, for its model-building helper process
_HELD: dict[str, Path] = {}  # digest -> file, in this process


def weights_digest(path: str | os.PathLike[str]) -> str:
    """The digest that names a weights file on the wire (its bytes, not its name)."""
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                sha.update(chunk)
    except OSError as exc:
        # a missing or unreadable --weights file: the user's to fix, one line
        raise MeshciError(f"cannot read weights file {path}: {exc.strerror}") from exc
    return sha.hexdigest()[:DIGEST_HEX]


def with_weights(model: str, digest: str) -> str:
    """The model name a request uses for `model` with the weights of that digest."""
    return f"{model}@{digest}"


def split_model_name(name: str) -> tuple[str, str | None]:
    """`vgg16@0123abcd...` -> ("vgg16", digest); a plain name -> (name, None)."""
    base, sep, digest = name.rpartition("@")
    if not sep or len(digest) != DIGEST_HEX or not all(c in "0123456789abcdef" for c in digest):
        return name, None
    return base, digest


def hold(path: str | os.PathLike[str]) -> str:
    """Register a weights file this process holds; its digest."""
    digest = weights_digest(path)
    _HELD[digest] = Path(path).resolve()
    return digest


def held_file(digest: str) -> Path | None:
    """The file held under `digest`, in this process or handed down by the node (ENV_VAR)."""
    if digest not in _HELD:
        for path in filter(None, os.environ.get(ENV_VAR, "").split(os.pathsep)):
            _HELD.setdefault(weights_digest(path), Path(path))
    return _HELD.get(digest)


def child_env() -> dict[str, str] | None:
    """The environment of a model-building helper process: ours, plus the files we hold."""
    if not _HELD:
        return None
    return {**os.environ, ENV_VAR: os.pathsep.join(str(p) for p in _HELD.values())}
