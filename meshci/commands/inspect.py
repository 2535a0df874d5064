"""`meshci inspect`: a model's spatial segments, the halo cost of a tiling, and an exactness check."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from meshci.errors import MeshciError, TilingError
from meshci.models import build_model
from meshci.tiling import (
    block_flops,
    receptive_field,
    redundant_flops,
    check_tiled,
    stage_cuts,
    gate_cuts,
    uniform_blocks,
)
from meshci.trunk import Trunk, extract_trunk

RTOL = 1e-4
SHARE_WARNING = 0.9  # below this share of the model's FLOPs in the trunk, say what ended it
ATOL = 1e-5
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="list a model's spatial segments and the halo cost of a tiling; --check runs it tiled",
        description=(
            "List the spatially local segments of a model (output shape, FLOPs, receptive field) "
            "and the redundant (halo) compute of cutting it into fused blocks tiled into strips or a grid. "
            "--check runs the tiled execution in-process and compares it with the plain forward pass."
        ),
    )
    p.add_argument("--model", required=True, help="built-in model name or package.module:callable")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=[224, 224], help="input size (224 224)")
    p.add_argument(
        "--cuts",
        default=None,
        help="where blocks start: 'auto' (DPFL), 'none' (one fused block), or segment indices i,j,... "
        "(default: one block per resolution stage)",
    )
    tiling = p.add_mutually_exclusive_group()
    tiling.add_argument("--tiles", type=int, default=4, help="row strips per block (4)")
    tiling.add_argument("--grid", default=None, metavar="RxC", help="a grid of R x C tiles per block instead of strips")
    p.add_argument("--check", action="store_true", help="run tiled and compare with the plain forward pass")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float64",
        help="dtype of --check (float64: geometry errors stand out from rounding-order noise)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--weights", default=None, metavar="FILE", help="state_dict file to load")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init (0)")
    p.set_defaults(func=run)


def parse_grid(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        rows, cols = (int(v) for v in parts)
    except ValueError as exc:
        # not two integers around an 'x': the user's typo, reported in one line
        raise TilingError(f"--grid wants RxC such as 2x2, got {text!r}") from exc
    if rows < 1 or cols < 1:
        raise TilingError(f"--grid wants positive R and C, got {text!r}")
    return rows, cols


def parse_cuts(text: str | None, trunk: Trunk, n_devices: int) -> list[int]:
    """The cuts asked for, and a cut at every SE gate (a tiled block must start there)."""
    return sorted(set(_asked_cuts(text, trunk, n_devices)) | set(gate_cuts(trunk)))


def _asked_cuts(text: str | None, trunk: Trunk, n_devices: int) -> list[int]:
    if text is None:
        return stage_cuts(trunk)
    if text == "none":
        return []
    if text == "auto":
        try:
            from meshci.planning import auto_cuts  # the DPFL planner; imported only when asked for
        except ImportError as exc:
            # the planner is a separate part of meshci; without it 'auto' cannot be answered
            raise MeshciError("--cuts auto needs the DPFL planner (meshci.planning.auto_cuts), not available here") from exc
        return list(auto_cuts(trunk, n_devices))
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        # not a comma-separated list of integers
        raise TilingError(f"--cuts wants 'auto', 'none' or segment indices like 3,6,10, got {text!r}") from exc


def inspect_model(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `meshci inspect` reports, as a JSON-able dict."""
    h, w = args.size
    if h < 1 or w < 1:
        raise TilingError(f"--size wants positive H W, got {h} {w}")
    grid = parse_grid(args.grid) if args.grid is not None else None
    if grid is None and args.tiles < 1:
        raise TilingError(f"--tiles wants at least 1, got {args.tiles}")
    model = build_model(args.model, seed=args.seed, weights=args.weights)
    if args.check:
        model = model.to(DTYPES[args.dtype])
    trunk = extract_trunk(model, (3, h, w), args.model)
    n_devices = grid[0] * grid[1] if grid is not None else args.tiles
    cuts = parse_cuts(args.cuts, trunk, n_devices)
    if grid is not None:
        blocks = uniform_blocks(trunk, cuts, grid=grid)
    else:
        blocks = uniform_blocks(trunk, cuts, strips=args.tiles)
    halo = redundant_flops(trunk, blocks)
    in_trunk, in_head = trunk.counted_flops()
    report: dict[str, Any] = {
        "model": args.model,
        "input_shape": list(trunk.input_shape),
        "head_start": trunk.head_start,
        "stop_reason": trunk.stop_reason,
        "trunk_share": {
            "trunk": in_trunk,
            "head": in_head,
            "share": in_trunk / (in_trunk + in_head) if in_trunk + in_head > 0 else 1.0,
            "counted_by": "torch.utils.flop_counter.FlopCounterMode",
        },
        "segments": [
            {
                "index": seg.index,
                "name": seg.name,
                "kind": seg.kind,
                "in_shape": list(seg.in_shape),
                "out_shape": list(seg.out_shape),
                "flops": seg.flops,
                "receptive_field": list(receptive_field(trunk, 0, seg.index + 1)),
                "ops": seg.describe(),
            }
            for seg in trunk.segments
        ],
        "cuts": cuts,
        "tiling": f"grid {grid[0]}x{grid[1]}" if grid is not None else f"{args.tiles} strips",
        "blocks": [
            {
                "start": s,
                "end": e,
                "tiles": [t.to_list() for t in tiles],
                "flops": sum(block_flops(trunk, s, e, t) for t in tiles),
            }
            for s, e, tiles in blocks
        ],
        "flops": {"trunk": trunk.flops, **halo},
        "max_abs_diff": None,
        "ok": None,
    }
    if args.check:
        report.update(check(trunk, blocks, args.seed, DTYPES[args.dtype]))
    return report


def check(trunk: Trunk, blocks: list, seed: int, dtype: torch.dtype) -> dict[str, Any]:
    """Run tiled and monolithic on one random input; compare logits and every block boundary."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, *trunk.input_shape), generator=gen).to(dtype)
    result = check_tiled(trunk, x, blocks, rtol=RTOL, atol=ATOL)
    return {
        "max_abs_diff": result.max_abs_diff,
        "ok": result.ok,
        "dtype": str(dtype).removeprefix("torch."),
        "rtol": RTOL,
        "atol": ATOL,
    }


def _flops(value: float) -> str:
    if value >= 1e9:
        return f"{value / 1e9:.3f}G"
    return f"{value / 1e6:.2f}M"


def format_table(report: dict[str, Any]) -> str:
    rows = [("#", "name", "kind", "out (C,H,W)", "FLOPs", "RF", "ops")]
    for seg in report["segments"]:
        c, h, w = seg["out_shape"]
        rf = seg["receptive_field"]
        rows.append(
            (str(seg["index"]), seg["name"], seg["kind"], f"{c}x{h}x{w}", _flops(seg["flops"]), f"{rf[0]}x{rf[1]}", seg["ops"])
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(v.ljust(widths[i]) for i, v in enumerate(r[:-1])) + "  " + r[-1] for r in rows]
    c, h, w = report["input_shape"]
    f = report["flops"]
    lines.insert(0, f"{report['model']}: input {c}x{h}x{w}, {len(report['segments'])} segments, head starts at {report['head_start']}")
    share = report["trunk_share"]
    lines.append(
        f"the trunk holds {100 * share['share']:.1f}% of the model's FLOPs "
        f"({_flops(share['trunk'])} of {_flops(share['trunk'] + share['head'])}, counted by FlopCounterMode)"
    )
    if share["share"] < SHARE_WARNING:
        lines.append(f"the trunk ends at {report['stop_reason']}")
    lines.append("")
    spans = ", ".join(f"[{b['start']},{b['end']})" for b in report["blocks"])
    lines.append(f"blocks {spans}, {report['tiling']} each")
    lines.append(
        f"trunk {_flops(f['ideal'])}FLOPs untiled, {_flops(f['total'])}FLOPs tiled: "
        f"redundant {_flops(f['redundant'])}FLOPs = {f['percent']:.1f}%"
    )
    if report["ok"] is not None:
        verdict = "OK" if report["ok"] else "MISMATCH"
        lines.append(
            f"check ({report['dtype']}): max |tiled - monolithic| = {report['max_abs_diff']:.3g} "
            f"over logits and {len(report['blocks'])} block boundaries: {verdict} (rtol {RTOL}, atol {ATOL})"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = inspect_model(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 1 if report["ok"] is False else 0

