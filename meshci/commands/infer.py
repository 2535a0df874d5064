"""`meshci infer`: send one inference request to any node of a mesh."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshci.commands.common import add_client_arguments, client_target
from meshci.errors import MeshciError, RuntimeFailure
from meshci.images import PREPROCESSING, InputImageError, read_image, read_labels, top_labels
from meshci.images.declared import declared_preprocessing
from meshci.images.preprocess import NAMED, TENSOR_SUFFIXES
from meshci.node.recovery import DEFAULT_DEADLINE_S, MAX_DEADLINE_S, DeadlineError, deadline_s

if TYPE_CHECKING:
    from meshci.node.membership import Address

log = logging.getLogger(__name__)

DEFAULT_SIZE = (224, 224)

__all__ = ["InputImageError", "add_parser", "format_result", "read_image", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("infer", help="run one inference on a mesh, via any node",
                              description="Send one inference request to a mesh node.")
    add_client_arguments(p)
    p.add_argument("--model", required=True, help="vgg16, resnet34 or package.module:callable")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", type=Path, metavar="IMAGE",
                     help="input picture (JPEG, PNG, BMP, WebP, ... or binary PPM/PGM), resized and "
                          "centre-cropped to --size and preprocessed (--preprocess); or a .npy/.pt "
                          "tensor (3,H,W)/(1,3,H,W) taken as it is")
    src.add_argument("--seed", type=int, default=0, help="random input made from this seed (default 0)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the model's random weights")
    p.add_argument("--weights", type=Path, metavar="FILE",
                   help="use these trained weights (torchvision-format state_dict); every node "
                        "must hold the same file (`meshci node --weights FILE`)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="input size of a seeded input or a picture (default: the size a user model "
                        "declares for pictures, else 224 224)")
    p.add_argument("--preprocess", choices=PREPROCESSING, default=None,
                   help="for a picture: imagenet (resize to cover --size/0.875, centre crop, scale to "
                        "[0, 1], ImageNet mean/std; what torchvision's models expect) or unit (no "
                        "mean/std); default: what the model declares (a user model's "
                        "meshci_preprocessing), imagenet for the built-in models")
    p.add_argument("--labels", type=Path, metavar="FILE",
                   help="class names, one per line, for a model that is not an ImageNet classifier "
                        "(default: the ImageNet names for a model with 1000 outputs)")
    p.add_argument("--strategy", default="edgeci",
                   help="local, modnn, deepthings, aofl, edgeci, or the ablations edgeci-dp and edgeci-gather")
    p.add_argument("--check", action="store_true",
                   help="also run the whole model on the requester and report the difference")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--trace", type=Path, metavar="FILE",
                   help="write the request's timeline to FILE as Chrome trace-event JSON (open it "
                        "in ui.perfetto.dev or chrome://tracing): one track per device")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="the request completes or fails within this many seconds (default "
                        f"{DEFAULT_DEADLINE_S:.0f}, at most {MAX_DEADLINE_S:.0f}); devices lost on the way "
                        "are replaced by the survivors")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.deadline is not None:
        try:
            deadline_s(args.deadline, "--deadline")
        except DeadlineError as exc:
            raise MeshciError(str(exc)) from exc
    via, secret = client_target(args)
    model = args.model
    if args.weights is not None:
        from meshci.weights import weights_digest, with_weights
        model = with_weights(model, weights_digest(args.weights))
    labels = read_labels(args.labels) if args.labels is not None else None
    image, size = _input(args, model)
    meta, logits, trace = asyncio.run(_ask(args, via, secret, model, image, size))
    meta["top5_labels"] = top_labels(meta["top5"], int(logits.shape[-1]), labels)
    if trace is not None:
        _write_trace(args.trace, trace)
    if args.json:
        print(json.dumps(meta, indent=1))
    else:
        print(format_result(meta))
    if args.check and not meta.get("check_ok", False):
        return 1
    return 0


def _input(args: argparse.Namespace, model: str) -> tuple[Any, tuple[int, int]]:
    """The request's input picture (None: a seeded input) and size. A picture is prepared
    by --preprocess when given, else as the model declares (`meshci.images.declared`)."""
    size = tuple(args.size) if args.size is not None else None
    if args.input is None:
        return None, size or DEFAULT_SIZE
    how = NAMED[args.preprocess] if args.preprocess is not None else None
    if how is None and args.input.suffix.lower() not in TENSOR_SUFFIXES:
        how = declared_preprocessing(model)
    image = read_image(args.input, size or (how.size if how is not None else None) or DEFAULT_SIZE,
                       how or "imagenet")
    return image, size or (int(image.shape[-2]), int(image.shape[-1]))


async def _ask(args: argparse.Namespace, via: Address, secret: bytes | None, model: str,
               image: Any, size: tuple[int, int]) -> tuple[dict[str, Any], Any, dict[str, Any] | None]:
    """The request, and with --trace its timeline, on one event loop."""
    from meshci.node.client import collect_trace, infer

    meta, logits = await infer(
        via, model=model, strategy=args.strategy, seed=args.weights_seed, size=size,
        image=image, input_seed=args.seed, check=args.check, details=args.json, secret=secret,
        insecure=args.insecure, timeout=args.timeout, deadline=args.deadline)
    trace = None
    if args.trace is not None:
        trace = await collect_trace(via, meta, secret=secret, insecure=args.insecure)
    return meta, logits, trace


def _write_trace(path: Path, trace: dict[str, Any]) -> None:
    try:
        path.write_text(json.dumps(trace))
    except OSError as exc:
        # the answer came; only the file could not be written: say so, in one line
        raise RuntimeFailure(f"cannot write the trace to {path}: {exc.strerror}") from exc
    missing = trace["otherData"].get("missing")
    if missing:
        log.warning("trace %s lacks %s: %s", path, ", ".join(missing), "; ".join(missing.values()))


def format_result(meta: dict[str, Any]) -> str:
    lines = [
        f"{meta['model']} via {meta['requester']}, strategy {meta['strategy']} "
        f"({meta['routing']} routing): {meta['latency_s'] * 1000:.1f} ms",
        "  devices: " + ", ".join(f"{d} {meta['shares'].get(d, 0.0) * 100:.0f}%" for d in meta["devices"]),
        f"  auction rounds: {meta['auction_rounds']}   top-5: "
        + ", ".join(_entry(i, p, name) for (i, p), name in zip(meta["top5"], meta.get("top5_labels")
                                                                   or [None] * len(meta["top5"]))),
    ]
    if meta.get("shipped_bytes"):
        lines.append("  shipped the model to: " + ", ".join(
            f"{d} ({n / 2**20:.1f} MB)" if n >= 2**20 else f"{d} ({n / 1024:.1f} KB)"
            for d, n in sorted(meta["shipped_bytes"].items())))
    if "max_abs_diff" in meta:
        lines.append(f"  check: max |distributed - single device| = {meta['max_abs_diff']:.3g}")
    return "\n".join(lines)


def _entry(index: int, probability: float, name: str | None) -> str:
    return f"{name} [{index}] ({probability:.3f})" if name else f"{index} ({probability:.3f})"
