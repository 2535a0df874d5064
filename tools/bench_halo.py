#!/usr/bin/env python3
"""Redundant (halo) compute of fused-layer tiling: VGG-16 and ResNet-34 at 224x224, 4 strips.

Compares the whole trunk fused into one block with the trunk cut at every pooling layer
(and, for ResNet-34, whose only pooling is the stem's, at every resolution stage). All
figures come from the tiling geometry of this run; nothing is hard-coded.

    .venv/bin/python tools/bench_halo.py [--tiles 4] [--size 224 224]
"""

from __future__ import annotations

import argparse

from meshci.models import build_model
from meshci.tiling import pool_cuts, redundant_flops, stage_cuts, uniform_blocks
from meshci.trunk import extract_trunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=4, help="row strips per block (4)")
    parser.add_argument("--size", nargs=2, type=int, default=[224, 224], metavar=("H", "W"))
    parser.add_argument("--models", default="vgg16,resnet34")
    args = parser.parse_args()
    h, w = args.size
    print(f"{'model':<10} {'cuts':<18} {'blocks':>6} {'untiled GFLOPs':>15} {'tiled GFLOPs':>13} {'redundant':>10}")
    for name in args.models.split(","):
        trunk = extract_trunk(build_model(name), (3, h, w), name)
        layouts = {"whole trunk": [], "every pooling": pool_cuts(trunk), "every stage": stage_cuts(trunk)}
        for label, cuts in layouts.items():
            if label == "every stage" and cuts == layouts["every pooling"]:
                continue
            blocks = uniform_blocks(trunk, cuts, strips=args.tiles, clamp=True)
            halo = redundant_flops(trunk, blocks)
            print(
                f"{name:<10} {label:<18} {len(blocks):>6} {halo['ideal'] / 1e9:>15.3f} "
                f"{halo['total'] / 1e9:>13.3f} {halo['percent']:>9.1f}%"
            )
    print(f"({args.tiles} row strips per block, clamped to the rows of a block's output; input {h}x{w})")


if __name__ == "__main__":
    main()
