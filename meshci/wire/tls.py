"""Optional mutual TLS: encryption on untrusted networks, on top of the HMAC handshake.

Both sides present a certificate signed by the cluster CA and verify the peer's. Host names
are not checked (mesh nodes are addressed by IP); the name a peer gives in the handshake
must be one its certificate names (common name or a DNS subject alternative name), or the
connection speaks for nobody (`UNVERIFIED`): a client may use any cluster certificate, but
only the holder of node X's key can state X's facts."""

from __future__ import annotations

import os
import ssl

from meshci.errors import MeshciError


class TlsConfigError(MeshciError):
    """Unreadable or mismatched certificate, key or CA file."""


def _load(ctx: ssl.SSLContext, cert: str | os.PathLike[str], key: str | os.PathLike[str], ca: str | os.PathLike[str]) -> ssl.SSLContext:
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:  # bad paths or PEM files: the user's to fix
        raise TlsConfigError(f"cannot load TLS files (cert {cert}, key {key}, ca {ca}): {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_tls_context(cert: str | os.PathLike[str], key: str | os.PathLike[str], ca: str | os.PathLike[str]) -> ssl.SSLContext:
    """Server side of mutual TLS: requires a client certificate signed by `ca`."""
    return _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key, ca)


def client_tls_context(
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    ca: str | os.PathLike[str],
    *,
    check_hostname: bool = False,
) -> ssl.SSLContext:
    """Client side of mutual TLS: presents `cert` and verifies the server against `ca`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = check_hostname
    return _load(ctx, cert, key, ca)


UNVERIFIED = "unverified!"  # prefix of a peer name its certificate does not bear ("!" is in no node name)


def certificate_names(cert: dict) -> set[str]:
    """The names a peer certificate (`SSLSocket.getpeercert()` form) is issued to."""
    names = {value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"}
    names |= {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}
    return names


def bound_name(peer_name: str, cert: dict | None) -> str:
    """The name a connection speaks for: the handshake's name when there is no peer
    certificate (HMAC only) or the certificate bears it, else that name marked UNVERIFIED."""
    if not cert or peer_name in certificate_names(cert):
        return peer_name
    return UNVERIFIED + peer_name
