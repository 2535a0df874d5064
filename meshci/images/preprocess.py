"""Reading an --input file into the (1, 3, H, W) float32 array a model expects.

Tensors (.npy, .pt) are taken as they are. Pictures (JPEG, PNG, BMP, GIF, TIFF, WebP, ...
through Pillow; binary PPM/PGM also without it) are preprocessed as torchvision's ImageNet
models expect (`imagenet`, the default): EXIF orientation applied, RGB, resized (bilinear,
antialiased) so that the image covers the requested size divided by 0.875 (a 224x224 input:
shorter side 256), centre-cropped to that size, scaled to [0, 1], then normalised with the
ImageNet mean and standard deviation. `unit` stops after the scaling to [0, 1], for a model
trained that way; a model that needs anything else takes a preprocessed .npy tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meshci.errors import MeshciError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)
PREPROCESSING = ("imagenet", "unit")
CROP_FRACTION = 0.875  # torchvision's evaluation transforms: resize 256, crop 224
TENSOR_SUFFIXES = (".npy", ".pt")
NETPBM_SUFFIXES = (".ppm", ".pgm", ".pnm")


class InputImageError(MeshciError):
    """An --input file that cannot be read as an image tensor."""


def read_image(path: Path, size: tuple[int, int] | None = None, preprocessing: str = "imagenet") -> np.ndarray:
    """A (1, 3, H, W) float32 array from `path`. A picture is resized and centre-cropped to
    `size` (H, W) when given, else kept at its own size, then preprocessed; a tensor file is
    returned as it is. Only a .pt file needs torch, only a camera format Pillow."""
    if preprocessing not in PREPROCESSING:
        raise InputImageError(f"unknown preprocessing {preprocessing!r} (known: {', '.join(PREPROCESSING)})")
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


def preprocess(pixels: np.ndarray, size: tuple[int, int] | None, preprocessing: str = "imagenet") -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels -> (1, 3, h, w) float32: resize and centre crop to `size`
    (None: as they are), scale to [0, 1], and for `imagenet` normalise."""
    if size is not None and tuple(pixels.shape[:2]) != tuple(size):
        pixels = _resize_and_crop(pixels, size)
    x = pixels.astype(np.float32).transpose(2, 0, 1)[None] / np.float32(255.0)
    if preprocessing == "imagenet":
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return x.astype(np.float32)


def _resize_and_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"bad size {height}x{width}")
    h, w = pixels.shape[:2]
    scale = max(height / CROP_FRACTION / h, width / CROP_FRACTION / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB").resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)))


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
