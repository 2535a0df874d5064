"""The cluster secret: generate it, write it to a private file, load it back."""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from meshci.wire.errors import SecretFileError
from meshci.wire.handshake import MIN_SECRET_BYTES

log = logging.getLogger(__name__)

SECRET_BYTES = 32


def generate_secret() -> bytes:
    """A fresh random cluster secret (32 bytes)."""
    return secrets.token_bytes(SECRET_BYTES)


def write_secret(path: str | os.PathLike[str], secret: bytes) -> Path:
    """Write `secret` as hex to a new file readable only by its owner (mode 0600)."""
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretFileError(f"a cluster secret needs at least {MIN_SECRET_BYTES} bytes")
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:  # exists already / no permission: the user's to fix
        raise SecretFileError(f"cannot create secret file {p}: {exc.strerror}") from exc
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
    return p


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """Read a cluster secret: hex text (as `write_secret` writes it) or raw bytes.

    Raises SecretFileError when the file is missing or the secret is shorter than 16 bytes;
    warns when other users may read the file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        mode = p.stat().st_mode
    except OSError as exc:  # missing/unreadable file: a user error, one clear line
        raise SecretFileError(f"cannot read secret file {p}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("secret file %s is accessible to other users (chmod 600 it)", p)
    text = raw.strip()
    try:
        secret = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):  # not hex text: use the raw bytes as the secret
        secret = text
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretFileError(
            f"secret in {p} is {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed"
        )
    return secret
