"""`meshci infer`: send one inference request to any node of a mesh."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np

from meshci.errors import MeshciError
from meshci.node.membership import Address


class InputImageError(MeshciError):
    """An --input file that cannot be read as an image tensor."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("infer", help="run one inference on a mesh, via any node",
                              description="Send one inference request to a mesh node.")
    p.add_argument("--via", required=True, metavar="HOST:PORT", help="any node of the mesh")
    p.add_argument("--model", required=True, help="vgg16, resnet34 or package.module:callable")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", type=Path, metavar="IMAGE",
                     help="input image: .npy or .pt tensor (3,H,W)/(1,3,H,W), or a binary PPM/PGM")
    src.add_argument("--seed", type=int, default=0, help="random input made from this seed (default 0)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the model's random weights")
    p.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"),
                   help="input size for a seeded input (default 224 224)")
    p.add_argument("--strategy", default="edgeci", help="local, modnn, deepthings, aofl or edgeci")
    p.add_argument("--check", action="store_true",
                   help="also run the whole model on the requester and report the difference")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--secret-file", metavar="F", help="cluster secret file")
    secret.add_argument("--insecure", action="store_true", help="the mesh runs without a secret")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")
    p.set_defaults(func=run)


def read_image(path: Path) -> np.ndarray:
    """A (1, 3, H, W) float32 array from .npy, .pt, or binary PPM (P6) / PGM (P5). Only a
    .pt file needs torch (imported then): the client otherwise starts without it."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        elif suffix == ".pt":
            import torch

            t = torch.load(path, weights_only=True, map_location="cpu")
            if not isinstance(t, torch.Tensor):
                raise InputImageError(f"{path} holds a {type(t).__name__}, not a tensor")
            x = t.float().numpy()
        elif suffix in (".ppm", ".pgm", ".pnm"):
            x = _read_netpbm(path.read_bytes(), path)
        else:
            raise InputImageError(f"{path}: unsupported image type {suffix!r} (use .npy, .pt, .ppm, .pgm)")
    except (OSError, ValueError, RuntimeError) as exc:
        # unreadable or malformed file: one clear line for the user
        raise InputImageError(f"cannot read {path}: {exc}") from exc
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "biuf":
        raise InputImageError(f"{path}: expected a numeric array, got {getattr(x, 'dtype', type(x))}")
    x = x.astype(np.float32, copy=False)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise InputImageError(f"{path}: expected a (3, H, W) image, got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x)


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)


def _read_netpbm(data: bytes, path: Path) -> np.ndarray:
    """Binary P6 (RGB) or P5 (grey) with maxval < 256, normalised as ImageNet expects."""
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
    x = pixels.astype(np.float32).reshape(height, width, channels).transpose(2, 0, 1)
    x = np.broadcast_to(x / maxval, (3, height, width))[None]
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def run(args: argparse.Namespace) -> int:
    from meshci.node.client import infer
    from meshci.wire import load_secret

    try:
        via = Address.parse(args.via)
    except ValueError as exc:
        # not HOST:PORT: the user's typo, one line
        raise MeshciError(f"--via: {exc}: give a node's HOST:PORT, e.g. pi4-a.local:7000") from exc
    if args.secret_file is None and not args.insecure:
        raise MeshciError("no cluster secret: give --secret-file F (or --insecure)")
    secret = load_secret(args.secret_file) if args.secret_file else None
    image = read_image(args.input) if args.input is not None else None
    meta, _logits = asyncio.run(infer(
        via, model=args.model, strategy=args.strategy, seed=args.weights_seed, size=tuple(args.size),
        image=image, input_seed=args.seed, check=args.check, details=args.json, secret=secret,
        insecure=args.insecure, timeout=args.timeout))
    if args.json:
        print(json.dumps(meta, indent=1))
    else:
        print(format_result(meta))
    if args.check and not meta.get("check_ok", False):
        return 1
    return 0


def format_result(meta: dict[str, Any]) -> str:
    lines = [
        f"{meta['model']} via {meta['requester']}, strategy {meta['strategy']} "
        f"({meta['routing']} routing): {meta['latency_s'] * 1000:.1f} ms",
        "  devices: " + ", ".join(f"{d} {meta['shares'].get(d, 0.0) * 100:.0f}%" for d in meta["devices"]),
        f"  auction rounds: {meta['auction_rounds']}   top-5: "
        + ", ".join(f"{i} ({p:.3f})" for i, p in meta["top5"]),
    ]
    if "max_abs_diff" in meta:
        lines.append(f"  check: max |distributed - single device| = {meta['max_abs_diff']:.3g}")
    return "\n".join(lines)
