"""What a request asks for, checked before anything is loaded (pure).

An `INFER` (from a client) and a `PLAN` (from a requester) name a model, a seed and an
input size; a node builds (and, without `--gflops`, profiles) the model at that size, so
the size is bounded by `MAX_INPUT_SIDE` here, before any allocation, on workers as on the
requester. Every field is typed and range-checked (`meshci.node.fields`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from meshci.node.fields import FieldError, integer, number, text
from meshci.node.recovery import DEFAULT_DEADLINE_S, deadline_s
from meshci.planning import STRATEGIES

MAX_INPUT_SIDE = 4096
MAX_SEED = (1 << 63) - 1
MAX_MODEL_NAME = 200  # "package.module:callable"


class RequestInputError(FieldError):
    """A request that cannot be served as asked: the reason goes back to its sender."""


@dataclass(frozen=True)
class InferRequest:
    model: str
    seed: int
    strategy: str
    check: bool
    details: bool
    x: torch.Tensor  # (1, 3, H, W)
    deadline_s: float = DEFAULT_DEADLINE_S  # it completes or fails within this (`meshci.node.recovery`)


def parse_infer(meta: dict[str, Any], tensors: tuple[torch.Tensor, ...]) -> InferRequest:
    """An INFER's fields; RequestInputError naming the first bad one."""
    strategy = meta.get("strategy", "edgeci")
    if strategy not in STRATEGIES:
        raise RequestInputError(f"unknown strategy {str(strategy)[:40]!r} (known: {', '.join(STRATEGIES)})")
    return InferRequest(model_name(meta.get("model")), seed(meta.get("seed", 0)), strategy,
                        flag(meta.get("check", False), "check"), flag(meta.get("details", False), "details"),
                        request_input(meta, tensors), deadline_s(meta.get("deadline_s", DEFAULT_DEADLINE_S)))


def model_name(value: Any) -> str:
    return text(value, "model", max_len=MAX_MODEL_NAME)


def seed(value: Any, field: str = "seed") -> int:
    return integer(value, field, lo=0, hi=MAX_SEED)


def flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise RequestInputError(f"{field} must be true or false")
    return value


def input_size(value: Any) -> tuple[int, int]:
    """An input size [H, W], each side in 1..MAX_INPUT_SIDE."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise RequestInputError("input size must be [height, width]")
    h, w = (integer(v, "input size", lo=1, hi=MAX_INPUT_SIDE) for v in value)
    return h, w


def request_input(meta: dict[str, Any], tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The request's input image (1, 3, H, W): sent by the client, or made from a seed."""
    if tensors:
        if len(tensors) != 1:
            raise RequestInputError(f"an INFER carries at most one input tensor, not {len(tensors)}")
        x = tensors[0]
        if not (x.dtype.is_floating_point or x.dtype == torch.uint8):
            raise RequestInputError(f"input must be a float or uint8 image, not {x.dtype}")
        x = x.float()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
            raise RequestInputError(f"input must be (3, H, W) or (1, 3, H, W), got {tuple(tensors[0].shape)}")
        input_size(list(x.shape[-2:]))
        if not bool(torch.isfinite(x).all()):
            raise RequestInputError("input holds non-finite values")
    else:
        h, w = input_size(meta.get("size", [224, 224]))
        generator = torch.Generator().manual_seed(seed(meta.get("input_seed", 0), "input_seed"))
        x = torch.randn(1, 3, h, w, generator=generator)
    return x.contiguous()


def head_report(head: Any) -> dict[str, Any] | None:
    """The head device's report (a peer's), checked: numbers finite and bounded (a
    400-digit integer too), the check's flag a boolean; None when it is malformed."""
    if not isinstance(head, dict):
        return None
    report: dict[str, Any] = {}
    try:
        for name in ("head_s", "max_abs_diff"):
            if head.get(name) is not None:
                report[name] = number(head[name], name, hi=MAX_REPORTED)
    except FieldError:
        return None
    if "check_ok" in head:
        if not isinstance(head["check_ok"], bool):
            return None
        report["check_ok"] = head["check_ok"]
    return report


MAX_REPORTED = 1e30  # seconds of a head, or a difference of logits: finite, far below overflow


__all__ = ["InferRequest", "MAX_INPUT_SIDE", "head_report", "RequestInputError", "input_size", "model_name",
           "parse_infer", "request_input", "seed"]
