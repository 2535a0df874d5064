"""A local mesh of node processes for a test, whose nodes' logs are printed when it fails."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from meshci.node.local import LocalMesh


@contextlib.contextmanager
def logged_mesh() -> Iterator[LocalMesh]:
    mesh = LocalMesh.create()
    try:
        yield mesh
    except BaseException:
        for node in mesh.nodes:
            sys.stderr.write(f"--- {node.name} log ---\n{node.log_text()[-3000:]}\n")
        raise
    finally:
        mesh.close()
