"""Running the host tools (`ip`, `tc`) with errors that quote their stderr."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from typing import IO

from meshci.testbed.errors import TestbedError

log = logging.getLogger(__name__)

# /usr/sbin is often missing from a non-login PATH; the tools live there on Debian.
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find_tool(name: str) -> str | None:
    """Absolute path of a system tool, looking in the sbin folders too."""
    found = shutil.which(name)
    if found:
        return found
    for folder in _SBIN_DIRS:
        candidate = os.path.join(folder, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        raise TestbedError(f"the {name!r} tool is not installed (looked in PATH and {', '.join(_SBIN_DIRS)})")
    return path


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run one tool command; with `check`, a non-zero status raises TestbedError with its stderr."""
    args = [tool(argv[0]), *argv[1:]]
    log.debug("testbed: %s", " ".join(args))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise TestbedError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def read_line(stream: IO[bytes] | None, timeout: float) -> bytes:
    """The first line a child writes to its stdout pipe, or b"" if none comes within `timeout`."""
    if stream is None:
        raise TestbedError("the child's stdout is not a pipe")
    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0] if line else b""
