"""A user model declares its own preprocessing (input size, mean/std, resize policy), and
`meshci infer --input photo` uses it instead of the ImageNet defaults; a wrong declaration is
one line, exit status 2."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meshci.images.declared import declared_preprocessing
from meshci.images.preprocess import IMAGENET, InputImageError, Preprocessing, read_image
from meshci.models import build_model
from meshci.wire import write_secret
from inprocess import start_mesh

pytestmark = pytest.mark.timeout(180)

MODULE = "meshci_declared_net"
DECLARED = {"size": [40, 56], "mean": [0.5, 0.25, 0.75], "std": [0.2, 0.3, 0.4], "resize": "stretch"}

SOURCE = f'''
from torch import nn


def small():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


small.meshci_preprocessing = {DECLARED!r}


def plain():
    return small()


def broken():
    return small()


broken.meshci_preprocessing = {{"size": [40], "resize": "sideways"}}
'''


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(MODULE, None)
    return tmp_path


def _picture(path: Path) -> np.ndarray:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(30, 90, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_a_user_model_declares_its_preprocessing(user_module: Path) -> None:
    assert declared_preprocessing("vgg16") == IMAGENET
    assert declared_preprocessing("resnet18@0123456789abcdef") == IMAGENET
    assert declared_preprocessing(f"{MODULE}:plain") == IMAGENET  # declares nothing
    how = declared_preprocessing(f"{MODULE}:small")
    assert how == Preprocessing(mean=(0.5, 0.25, 0.75), std=(0.2, 0.3, 0.4), size=(40, 56), resize="stretch")
    with pytest.raises(InputImageError, match=r"broken\.meshci_preprocessing\.size must be \[H, W\]"):
        declared_preprocessing(f"{MODULE}:broken")


def test_resize_policies(tmp_path: Path) -> None:
    pixels = _picture(tmp_path / "wide.png")
    mean, std = np.array([0.5, 0.25, 0.75]), np.array([0.2, 0.3, 0.4])
    stretched = read_image(tmp_path / "wide.png", None, Preprocessing(mean=tuple(mean), std=tuple(std), size=(40, 56),
                                                                    resize="stretch"))
    expected = np.asarray(Image.fromarray(pixels).resize((56, 40), Image.Resampling.BILINEAR))
    expected = (expected.astype(np.float32).transpose(2, 0, 1)[None] / 255 - mean.reshape(1, 3, 1, 1)) \
        / std.reshape(1, 3, 1, 1)
    assert stretched.shape == (1, 3, 40, 56) and np.allclose(stretched, expected, atol=1e-5)
    # pad: the 30x90 picture fits a 60x60 canvas as 20x60 rows in the middle, the rest the mean (0)
    padded = read_image(tmp_path / "wide.png", (60, 60), Preprocessing(resize="pad"))
    assert padded.shape == (1, 3, 60, 60)
    assert np.all(padded[:, :, :20] == 0) and np.all(padded[:, :, 40:] == 0)
    assert np.abs(padded[:, :, 20:40]).sum() > 0
    with pytest.raises(InputImageError, match="resize must be one of crop, stretch, pad"):
        Preprocessing.of({"resize": "zoom"})
    with pytest.raises(InputImageError, match="std must be positive"):
        Preprocessing.of({"std": [1, 0, 1]})


async def test_infer_prepares_a_picture_as_the_model_declares(user_module: Path, tmp_path: Path) -> None:
    """`meshci infer --input photo.png --model pkg:small` (no --size, no --preprocess): the
    picture is stretched to the declared 40x56 and normalised with the declared mean/std; the
    mesh's answer equals the model run here on that tensor."""
    secret = os.urandom(32)
    write_secret(tmp_path / "secret", secret)
    _picture(tmp_path / "photo.png")
    nodes = await start_mesh({"p1": 1.0, "p2": 1.0}, secret, allow_models=(f"{MODULE}:small",))
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(user_module), os.environ.get("PYTHONPATH", "")])}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshci", "infer", "--via", str(nodes[0].address), "--secret-file",
            str(tmp_path / "secret"), "--model", f"{MODULE}:small", "--input", str(tmp_path / "photo.png"),
            "--strategy", "local", "--json", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        meta = json.loads(out)
        bad = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshci", "infer", "--via", str(nodes[0].address), "--secret-file",
            str(tmp_path / "secret"), "--model", f"{MODULE}:broken", "--input", str(tmp_path / "photo.png"),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, bad_err = await asyncio.wait_for(bad.communicate(), 120)
    finally:
        await asyncio.gather(*(n.close() for n in nodes))
    assert meta["plan"]["input_shape"] == [3, 40, 56]
    x = read_image(tmp_path / "photo.png", None, declared_preprocessing(f"{MODULE}:small"))
    with torch.no_grad():
        direct = torch.softmax(build_model(f"{MODULE}:small", seed=0)(torch.from_numpy(x)), dim=1)[0]
    top = torch.topk(direct, 5)
    assert [i for i, _ in meta["top5"]] == top.indices.tolist()
    assert np.allclose([p for _, p in meta["top5"]], top.values.numpy(), atol=1e-5)
    assert bad.returncode == 2
    lines = bad_err.decode().strip().splitlines()
    assert len(lines) == 1 and "meshci_preprocessing.size must be [H, W]" in lines[0], lines
