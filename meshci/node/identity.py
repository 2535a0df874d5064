"""A node's default name: a random id kept in its data dir, bound to this host.

A data dir copied to another machine must not give two nodes the same name, so the id is
stored together with a fingerprint of the host; on a mismatch a fresh id is made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import socket
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

ID_FILE = "node-id.json"


def host_fingerprint() -> str:
    parts = [socket.gethostname(), f"{uuid.getnode():012x}"]
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            parts.append(Path(path).read_text().strip())
            break
        except OSError:
            # no machine-id here (containers, macOS): hostname and MAC still identify the host
            continue
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def node_name(data_dir: Path, fingerprint: str | None = None) -> str:
    """The persistent name of the node using `data_dir` on this host."""
    fingerprint = fingerprint or host_fingerprint()
    path = Path(data_dir) / ID_FILE
    try:
        stored = json.loads(path.read_text())
        if stored.get("host") == fingerprint and isinstance(stored.get("name"), str):
            return stored["name"]
        log.warning("node id in %s belongs to another host (a copied data dir): making a new one", path)
    except FileNotFoundError:
        pass  # first start with this data dir
    except (OSError, ValueError, AttributeError) as exc:
        # unreadable or corrupt id file: replace it rather than refuse to start
        log.warning("ignoring unreadable %s: %s", path, exc)
    name = f"node-{secrets.token_hex(4)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"name": name, "host": fingerprint}))
    tmp.replace(path)
    return name
