"""Reading an --input file into the (1, 3, H, W) float32 array a model expects.

Tensors (.npy, .pt) are taken as they are. Pictures (JPEG, PNG, BMP, GIF, TIFF, WebP, ...
through Pillow; binary PPM/PGM also without it) are preprocessed as torchvision's ImageNet
models expect (`imagenet`, the default): EXIF orientation applied, RGB, resized (bilinear,
antialiased) so that the image covers the requested size divided by 0.875 (a 224x224 input:
shorter side 256), centre-cropped to that size, scaled to [0, 1], then normalised with the
ImageNet mean and standard deviation. `unit` stops after the scaling to [0, 1], for a model
trained that way. A user model declares anything else as a `Preprocessing` (its input size,
mean and standard deviation, resize policy: `meshci.images.declared`); a model that needs
more than that takes a preprocessed .npy tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meshci.errors import MeshciError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)
PREPROCESSING = ("imagenet", "unit")
CROP_FRACTION = 0.875  # torchvision's evaluation transforms: resize 256, crop 224
TENSOR_SUFFIXES = (".npy", ".pt")
NETPBM_SUFFIXES = (".ppm", ".pgm", ".pnm")
RESIZE_POLICIES = ("crop", "stretch", "pad")


class InputImageError(MeshciError):
    """An --input file that cannot be read as an image tensor."""


@dataclass(frozen=True)
class Preprocessing:
    """How a picture becomes a model's input: scaled to [0, 1], then (x - mean) / std per
    channel (RGB), at `size` (H, W; None: the size the request asks) by `resize`:

    * ``crop``: resize (bilinear) so the picture covers size / `crop_fraction`, centre crop
      (torchvision's evaluation transform: 256 then 224 at 0.875);
    * ``stretch``: resize to exactly `size`, the aspect ratio not kept;
    * ``pad``: resize to fit inside `size`, aspect kept, the border filled with the mean
      (zero after normalising)."""

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size: tuple[int, int] | None = None
    resize: str = "crop"
    crop_fraction: float = CROP_FRACTION

    @classmethod
    def of(cls, declared: Any, where: str = "preprocessing") -> Preprocessing:
        """A declaration (a `Preprocessing`, or a dict with its fields) checked field by
        field; InputImageError names the bad one."""
        if isinstance(declared, Preprocessing):
            declared = {"mean": declared.mean, "std": declared.std, "size": declared.size,
                        "resize": declared.resize, "crop_fraction": declared.crop_fraction}
        if not isinstance(declared, dict):
            raise InputImageError(f"{where} must be a dict or a meshci.images.Preprocessing, "
                                  f"not {type(declared).__name__}")
        unknown = set(declared) - {"mean", "std", "size", "resize", "crop_fraction"}
        if unknown:
            raise InputImageError(f"{where}: unknown field {sorted(map(str, unknown))[0]!r} (fields: mean, std, "
                                  "size, resize, crop_fraction)")
        mean = _triple(declared.get("mean", cls.mean), f"{where}.mean")
        std = _triple(declared.get("std", cls.std), f"{where}.std")
        if min(std) <= 0:
            raise InputImageError(f"{where}.std must be positive, got {list(std)}")
        size = declared.get("size")
        if size is not None:
            if (not isinstance(size, (list, tuple)) or len(size) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in size)):
                raise InputImageError(f"{where}.size must be [H, W], whole numbers from 1 to 4096, got {size!r}")
            size = (int(size[0]), int(size[1]))
        resize = declared.get("resize", "crop")
        if resize not in RESIZE_POLICIES:
            raise InputImageError(f"{where}.resize must be one of {', '.join(RESIZE_POLICIES)}, got {resize!r}")
        fraction = declared.get("crop_fraction", CROP_FRACTION)
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
            raise InputImageError(f"{where}.crop_fraction must be in (0, 1], got {fraction!r}")
        return cls(mean, std, size, resize, float(fraction))


IMAGENET = Preprocessing()
UNIT = Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
NAMED = {"imagenet": IMAGENET, "unit": UNIT}


def _triple(value: Any, where: str) -> tuple[float, float, float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise InputImageError(f"{where} must be three finite numbers (R, G, B), got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def read_image(path: Path, size: tuple[int, int] | None = None,
               preprocessing: str | Preprocessing = "imagenet") -> np.ndarray:
    """A (1, 3, H, W) float32 array from `path`. A picture is resized to `size` (H, W) when
    given (else the preprocessing's own size, else kept at its own size) by the
    preprocessing's resize policy, then normalised; a tensor file is returned as it is. Only
    a .pt file needs torch, only a camera format Pillow."""
    if isinstance(preprocessing, str):
        if preprocessing not in NAMED:
            raise InputImageError(f"unknown preprocessing {preprocessing!r} (known: {', '.join(PREPROCESSING)})")
        preprocessing = NAMED[preprocessing]
    suffix = path.suffix.lower()
    try:
        if suffix in TENSOR_SUFFIXES:
            x = _read_tensor(path, suffix)
        else:
            pixels = _read_netpbm(path.read_bytes(), path) if suffix in NETPBM_SUFFIXES else _read_picture(path)
            x = preprocess(pixels, size, preprocessing)
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        # unreadable or malformed file (Pillow's UnidentifiedImageError is an OSError)
        raise InputImageError(f"cannot read {path}: {exc}; give a JPEG/PNG/... picture or a "
                              "(3, H, W) .npy/.pt tensor") from exc
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "biuf":
        raise InputImageError(f"{path}: expected a numeric array, got {getattr(x, 'dtype', type(x))}")
    x = x.astype(np.float32, copy=False)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise InputImageError(f"{path}: expected a (3, H, W) image, got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x)


def preprocess(pixels: np.ndarray, size: tuple[int, int] | None,
               preprocessing: str | Preprocessing = "imagenet") -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels -> (1, 3, h, w) float32: resized to `size` (None: the
    preprocessing's own size, else as they are) by its policy, scaled to [0, 1], normalised."""
    how = NAMED[preprocessing] if isinstance(preprocessing, str) else preprocessing
    size = size if size is not None else how.size
    covered: np.ndarray | None = None
    if size is not None and tuple(pixels.shape[:2]) != tuple(size):
        if how.resize == "stretch":
            pixels = _resize(pixels, size[0], size[1])
        elif how.resize == "pad":
            pixels, covered = _fit_and_pad(pixels, size)
        else:
            pixels = _resize_and_crop(pixels, size, how.crop_fraction)
    x = pixels.astype(np.float32).transpose(2, 0, 1)[None] / np.float32(255.0)
    x = (x - np.array(how.mean, dtype=np.float32).reshape(1, 3, 1, 1)) / \
        np.array(how.std, dtype=np.float32).reshape(1, 3, 1, 1)
    if covered is not None:
        x[:, :, ~covered] = 0.0  # the border: the mean colour, zero once normalised
    return x.astype(np.float32)


def _resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if height < 1 or width < 1:
        raise ValueError(f"bad size {height}x{width}")
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _resize_and_crop(pixels: np.ndarray, size: tuple[int, int], fraction: float = CROP_FRACTION) -> np.ndarray:
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"bad size {height}x{width}")
    h, w = pixels.shape[:2]
    scale = max(height / fraction / h, width / fraction / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    resized = _resize(pixels, new_h, new_w)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return np.ascontiguousarray(resized[top:top + height, left:left + width])


def _fit_and_pad(pixels: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The picture resized to fit inside `size` (aspect kept), centred on a `size` canvas;
    and the mask of the canvas it covers."""
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"bad size {height}x{width}")
    h, w = pixels.shape[:2]
    scale = min(height / h, width / w)
    new_h, new_w = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[top:top + new_h, left:left + new_w] = _resize(pixels, new_h, new_w)
    covered = np.zeros((height, width), dtype=bool)
    covered[top:top + new_h, left:left + new_w] = True
    return canvas, covered


def _read_picture(path: Path) -> np.ndarray:
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:
        # Pillow is a dependency, but a trimmed install may lack it: say how to get it
        raise InputImageError(f"{path}: reading {path.suffix or 'this'} pictures needs Pillow "
                              "(pip install pillow), or give a .npy tensor or a .ppm") from exc
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        return np.asarray(image)


def _read_tensor(path: Path, suffix: str) -> np.ndarray:
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    import torch

    t = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(t, torch.Tensor):
        raise InputImageError(f"{path} holds a {type(t).__name__}, not a tensor")
    return t.float().numpy()


def _read_netpbm(data: bytes, path: Path) -> np.ndarray:
    """Binary P6 (RGB) or P5 (grey) with maxval < 256, as (H, W, 3) uint8 pixels."""
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while end < len(data) and not data[end:end + 1].isspace():
            end += 1
        if end == pos:
            raise ValueError("truncated header")
        fields.append(data[pos:end])
        pos = end
    magic, width, height, maxval = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    if magic not in (b"P5", b"P6") or not 0 < maxval < 256:
        raise ValueError(f"{path}: only binary 8-bit P5/P6 files are read")
    channels = 3 if magic == b"P6" else 1
    pixels = np.frombuffer(data, dtype=np.uint8, count=width * height * channels, offset=pos + 1)
    x = pixels.reshape(height, width, channels)
    if maxval != 255:
        x = np.rint(x.astype(np.float32) * (255.0 / maxval)).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(x, (height, width, 3)))
