"""Pictures in, class names out: a JPEG through the mesh gives the logits of the model run
directly on the same preprocessed tensor; ImageNet preprocessing and labels; bad pictures
are one line, exit status 2."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meshci.images import IMAGENET_MEAN, IMAGENET_STD, imagenet_classes, read_image, top_labels
from meshci.models import build_model
from meshci.node.client import infer
from inprocess import start_mesh

pytestmark = pytest.mark.timeout(120)

SECRET = os.urandom(32)


def pattern_picture(width: int = 96, height: int = 64) -> np.ndarray:
    """Colour bars over a horizontal ramp: every channel varies along both axes."""
    x = np.zeros((height, width, 3), dtype=np.uint8)
    bars = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 255, 255)]
    for i, colour in enumerate(bars):
        x[:, i * width // len(bars):(i + 1) * width // len(bars)] = colour
    x[height // 2:] = (np.arange(width) * 255 // (width - 1))[None, :, None]
    return x


def test_imagenet_preprocessing_of_a_plain_picture(tmp_path: Path) -> None:
    colour = (200, 120, 40)
    Image.new("RGB", (120, 80), colour).save(tmp_path / "plain.png")
    x = read_image(tmp_path / "plain.png", (32, 48))
    assert x.shape == (1, 3, 32, 48) and x.dtype == np.float32
    expected = (np.array(colour, dtype=np.float32).reshape(1, 3, 1, 1) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    assert np.allclose(x, expected, atol=1e-5)
    unit = read_image(tmp_path / "plain.png", (32, 48), "unit")
    assert np.allclose(unit, np.array(colour).reshape(1, 3, 1, 1) / 255, atol=1e-6)
    # no size: the picture's own
    assert read_image(tmp_path / "plain.png").shape == (1, 3, 80, 120)


def test_resize_then_centre_crop_keeps_the_middle(tmp_path: Path) -> None:
    # a wide picture: left third red, middle green, right third blue; the centre crop of a
    # square is all green, the shorter side scaled to size / 0.875
    pixels = np.zeros((70, 210, 3), dtype=np.uint8)
    pixels[:, :70, 0] = 255
    pixels[:, 70:140, 1] = 255
    pixels[:, 140:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    x = read_image(tmp_path / "wide.png", (28, 28), "unit")
    assert x.shape == (1, 3, 28, 28)
    assert np.allclose(x[0, 1], 1.0) and np.allclose(x[0, 0], 0.0) and np.allclose(x[0, 2], 0.0)


def test_imagenet_labels() -> None:
    names = imagenet_classes()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert (names[0], names[281], names[999]) == ("tench", "tabby", "toilet tissue")
    assert top_labels([[281, 0.5], [0, 0.2]], 1000) == ["tabby", "tench"]
    assert top_labels([[3, 0.9]], 10) == [None]  # not an ImageNet classifier: no names
    assert top_labels([[1, 0.9]], 10, ["cat", "dog"]) == ["dog"]


async def test_a_jpeg_through_the_mesh_equals_the_model_on_its_tensor(tmp_path: Path) -> None:
    Image.fromarray(pattern_picture()).save(tmp_path / "pattern.jpg", quality=90)
    x = read_image(tmp_path / "pattern.jpg", (32, 32))
    # a slow requester and fast workers: the work goes to the workers
    nodes = await start_mesh({"j1": 5.0, "j2": 0.05, "j3": 5.0}, SECRET)
    try:
        meta, logits = await infer(nodes[1].address, model="resnet18", image=x,
                                   secret=SECRET)
    finally:
        await asyncio.gather(*(n.close() for n in nodes))
    assert len(meta["devices"]) >= 2  # the work was spread
    with torch.no_grad():
        direct = build_model("resnet18", seed=0)(torch.from_numpy(x))
    assert torch.allclose(torch.as_tensor(logits).reshape(direct.shape), direct, atol=1e-4, rtol=1e-4)
    assert top_labels(meta["top5"], 1000)[0] == imagenet_classes()[int(direct.argmax())]


@pytest.mark.parametrize("name,content", [
    ("broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"),
    ("notes.png", b"hello"),
])
def test_an_unreadable_picture_is_one_line_exit_2(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    done = subprocess.run([sys.executable, "-m", "meshci", "infer", "--via", "127.0.0.1:1", "--insecure",
                           "--model", "vgg16", "--input", str(tmp_path / name)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"meshci: error: cannot read {tmp_path / name}"), done.stderr


async def test_trained_weights_are_named_by_digest_and_held_by_every_node(tmp_path: Path) -> None:
    """`meshci node --weights FILE` / `meshci infer --weights FILE`: the mesh computes with
    the file's weights (here those of seed 7, not the request's seed 0); a node that does
    not hold the file refuses the request, as a usage error."""
    from meshci.node.client import RequestError
    from meshci.weights import hold, weights_digest, with_weights

    path = tmp_path / "resnet18-trained.pth"
    torch.save(build_model("resnet18", seed=7).state_dict(), path)
    digest = hold(path)
    assert digest == weights_digest(path) and len(digest) == 16
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    nodes = await start_mesh({"w1": 5.0, "w2": 0.05, "w3": 5.0}, SECRET, allow_models=(f"@{digest}",))
    try:
        meta, logits = await infer(nodes[1].address, model=with_weights("resnet18", digest), image=x,
                                   secret=SECRET)
    finally:
        await asyncio.gather(*(n.close() for n in nodes))
    with torch.no_grad():
        direct = build_model("resnet18", seed=7)(torch.from_numpy(x))
    assert len(meta["devices"]) >= 2
    assert torch.allclose(torch.as_tensor(logits).reshape(direct.shape), direct, atol=1e-4, rtol=1e-4)

    bare = await start_mesh({"bare": 1.0}, SECRET)
    try:
        with pytest.raises(RequestError, match=f"holds no weights {digest}") as refused:
            await infer(bare[0].address, model=with_weights("resnet18", digest), image=x, secret=SECRET)
        assert refused.value.exit_status == 2
    finally:
        await asyncio.gather(*(n.close() for n in bare))
