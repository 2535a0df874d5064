"""Node identity, input images, and the CLI's refusals (one line, exit status 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from meshci.commands.infer import InputImageError, read_image
from meshci.node.identity import ID_FILE, node_name


def test_node_name_persists_per_data_dir_and_host(tmp_path: Path) -> None:
    first = node_name(tmp_path, fingerprint="host-a")
    assert first == node_name(tmp_path, fingerprint="host-a")
    assert node_name(tmp_path / "other", fingerprint="host-a") != first
    # a data dir copied to another host gets a fresh name there
    moved = node_name(tmp_path, fingerprint="host-b")
    assert moved != first
    assert json.loads((tmp_path / ID_FILE).read_text()) == {"name": moved, "host": "host-b"}


def test_corrupt_id_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / ID_FILE).write_text("{not json")
    assert node_name(tmp_path, fingerprint="h").startswith("node-")


def test_read_image_formats(tmp_path: Path) -> None:
    x = torch.randn(3, 5, 7)
    np.save(tmp_path / "x.npy", x.numpy())
    torch.save(x, tmp_path / "x.pt")
    assert torch.equal(torch.from_numpy(read_image(tmp_path / "x.npy")), x.unsqueeze(0))
    assert torch.equal(torch.from_numpy(read_image(tmp_path / "x.pt")), x.unsqueeze(0))
    pixels = bytes(range(2 * 3 * 3))
    (tmp_path / "x.ppm").write_bytes(b"P6\n# comment\n3 2\n255\n" + pixels)
    img = read_image(tmp_path / "x.ppm")
    assert img.shape == (1, 3, 2, 3)
    red = (torch.tensor(list(pixels[0::3]), dtype=torch.float32).view(2, 3) / 255 - 0.485) / 0.229
    assert torch.allclose(torch.from_numpy(img[0, 0]), red)
    (tmp_path / "g.pgm").write_bytes(b"P5 2 2 255\n" + bytes([0, 64, 128, 255]))
    assert read_image(tmp_path / "g.pgm").shape == (1, 3, 2, 2)


def test_the_client_path_does_not_import_torch() -> None:
    """`meshci infer` starts in a fraction of a second: its parser, the client and the
    frame codec (numpy arrays when torch is not loaded) need no torch."""
    code = (
        "import sys\n"
        "from meshci.cli import build_parser, _command_of\n"
        "build_parser(_command_of(['-v', 'infer', '--via', 'h:1']))\n"
        "build_parser(_command_of(['-q', 'peers', '--via', 'h:1']))\n"
        "build_parser(_command_of(['secret', 'new', 'f']))\n"
        "import meshci.node.client, meshci.images, meshci.weights, meshci.node.view, meshci.node.trace\n"
        "import numpy as np\n"
        "assert meshci.images.preprocess(np.zeros((9, 7, 3), np.uint8), (4, 4)).shape == (1, 3, 4, 4)\n"
        "import numpy as np\n"
        "from meshci.wire.frames import FrameDecoder, encode\n"
        "from meshci.wire.messages import Message, MsgType\n"
        "x = np.arange(12, dtype=np.float32).reshape(3, 4)\n"
        "buffers = encode(Message(MsgType.RESULT, 7, {'a': 1}, (x,)))\n"
        "decoder = FrameDecoder()\n"
        "decoder.feed(b''.join(bytes(b) for b in buffers))\n"
        "msg = decoder.next_message()\n"
        "assert isinstance(msg.tensors[0], np.ndarray) and (msg.tensors[0] == x).all()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name,content", [
    ("bad.npy", b"not numpy"),
    ("bad.txt", b"hello"),
    ("bad.ppm", b"P3 1 1 255 0 0 0"),
])
def test_unreadable_images_are_user_errors(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputImageError):
        read_image(tmp_path / name)


def test_wrong_image_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 5, 5), dtype=np.float32))
    with pytest.raises(InputImageError, match="expected a \\(3, H, W\\) image"):
        read_image(tmp_path / "x.npy")


@pytest.mark.parametrize("args,message,status", [
    (["node", "--listen", "127.0.0.1:0"], "no cluster secret", 2),
    (["node", "--insecure", "--listen", "nowhere"], "is not HOST:PORT", 2),
    (["node", "--insecure", "--threads", "0"], "--threads must be at least 1", 2),
    (["node", "--insecure", "--name", "bad name!", "--gflops", "1"], "bad node name", 2),
    (["node", "--insecure", "--tls-cert", "c.pem"], "mutual TLS needs", 2),
    (["infer", "--via", "127.0.0.1:1", "--model", "vgg16"], "no cluster secret", 2),
    (["infer", "--via", "127.0.0.1:1", "--model", "vgg16", "--secret-file", "/nonexistent/mesh.key"],
     "cannot read secret file /nonexistent/mesh.key", 2),
    # nobody there: a runtime failure (exit 1), with what to check
    (["infer", "--via", "127.0.0.1:1", "--model", "vgg16", "--insecure"], "is a meshci node running there?", 1),
    (["infer", "--via", "127.0.0.1:1", "--model", "vgg16", "--insecure", "--deadline", "0"],
     "--deadline must be between", 2),
    (["infer", "--via", "127.0.0.1:1", "--model", "vgg16", "--insecure", "--deadline", "nan"],
     "--deadline must be between", 2),
])
def test_cli_refusals_are_one_line(args: list[str], message: str, status: int) -> None:
    done = subprocess.run([sys.executable, "-m", "meshci", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == status
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
