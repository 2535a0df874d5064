"""Out of memory on a device reaches the user as one clear line: which device, about how
much the tile needed, what to do; `meshci infer` exits 1 and the node keeps serving.

Real node processes on loopback; the worker's address space is capped (RLIMIT_AS, set on
the running process) just above what it uses when idle, so a tile's maps cannot be
allocated there: torch's CPU allocator fails as it would on a small board."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
import time

import pytest

from meshci.node.client import infer
from meshci.node.local import wait_formed
from logged import logged_mesh
from meshci.node.memory_budget import tile_peak_bytes
from meshci.node.oom import is_out_of_memory, tile_out_of_memory
from meshci.trunk import Region

pytestmark = pytest.mark.slow

SIZE = (512, 512)  # VGG-16's first maps: 64 x 512 x 512 floats, 64 MiB each


def _vm_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def test_the_reason_names_the_device_the_need_and_what_to_do() -> None:
    import torch

    from meshci.models import build_model
    from meshci.trunk import extract_trunk

    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    trunk = extract_trunk(build_model("vgg16"), (3, 64, 64), "vgg16")
    # the first conv of the top 16-row strip: 3 input channels over 17 rows (one halo row below,
    # none above the image), 64 output channels
    needed = tile_peak_bytes(trunk, 0, 1, Region(0, 16, 0, 64))
    assert needed == (17 * 64 * 3 + 16 * 64 * 64) * 4
    line = tile_out_of_memory("pi-b", 2, Region(0, 16, 0, 64), 300 * 2**20)
    assert "\n" not in line and line.startswith("device pi-b ran out of memory")
    assert "about 300 MiB" in line and "--size" in line and "more devices" in line


def test_a_worker_out_of_memory_reaches_the_client_as_one_line() -> None:
    with logged_mesh() as mesh:
        mesh.add("r1", gflops=0.2)
        worker = mesh.add("w2", gflops=5.0)
        asyncio.run(wait_formed([n.address for n in mesh.nodes], mesh.secret()))
        via = mesh.nodes[0].address
        # once at full memory: the model built everywhere, the standing plan made
        meta, _ = asyncio.run(infer(via, secret=mesh.secret(), model="vgg16", strategy="modnn", size=SIZE))
        assert "w2" in meta["devices"]
        time.sleep(0.5)
        resource.prlimit(worker.pid, resource.RLIMIT_AS, (_vm_bytes(worker.pid) + 16 * 2**20, resource.RLIM_INFINITY))
        done = subprocess.run(
            [sys.executable, "-m", "meshci", "infer", "--via", str(via), "--secret-file", str(mesh.secret_file),
             "--model", "vgg16", "--strategy", "modnn", "--size", *map(str, SIZE)],
            capture_output=True, text=True, timeout=300)
        resource.prlimit(worker.pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("meshci: error: ") and "device w2 ran out of memory" in lines[0], lines[0]
        assert " MiB" in lines[0] and "use a smaller --size, or more devices" in lines[0], lines[0]
        # the worker survived and serves again once memory is there
        meta, _ = asyncio.run(infer(via, secret=mesh.secret(), model="vgg16", strategy="modnn", size=SIZE,
                                    check=True))
        assert meta["check_ok"] and "w2" in meta["devices"]
