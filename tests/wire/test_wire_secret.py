"""Cluster secret files and the unpickling guard."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from meshci.errors import MeshciError
from meshci.wire import (
    SecretFileError,
    UntrustedPeerError,
    generate_secret,
    load_secret,
    pickle_blob,
    unpickle_trusted,
    write_secret,
)


def test_generate_write_load_roundtrip(tmp_path: Path) -> None:
    secret = generate_secret()
    assert len(secret) == 32 and secret != generate_secret()
    path = write_secret(tmp_path / "cluster.secret", secret)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(path) == secret


def test_write_refuses_to_overwrite(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "s", generate_secret())
    with pytest.raises(SecretFileError, match="cannot create"):
        write_secret(path, generate_secret())


def test_raw_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "raw"
    path.write_bytes(b"a passphrase that is long enough\n")
    os.chmod(path, 0o600)
    assert load_secret(path) == b"a passphrase that is long enough"


@pytest.mark.parametrize("content", [b"", b"short", b"abcd" * 3])
def test_short_secret_is_a_user_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "s"
    path.write_bytes(content)
    with pytest.raises(SecretFileError, match="at least 16"):
        load_secret(path)
    assert issubclass(SecretFileError, MeshciError)


def test_missing_secret_file(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match="cannot read"):
        load_secret(tmp_path / "nope")


def test_readable_by_others_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s"
    path.write_text(generate_secret().hex())
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="meshci.wire"):
        load_secret(path)
    assert "accessible to other users" in caplog.text


def test_unpickle_trusted_guard(tmp_path: Path) -> None:
    blob = pickle_blob({"layers": [1, 2]})
    assert unpickle_trusted(SimpleNamespace(authenticated=True, peer_name="a"), blob) == {"layers": [1, 2]}
    with pytest.raises(UntrustedPeerError, match="unauthenticated peer 'b'"):
        unpickle_trusted(SimpleNamespace(authenticated=False, peer_name="b"), blob)
