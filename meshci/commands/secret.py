"""`meshci secret new FILE`: make a cluster secret file (mode 0600) to copy to every device."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("secret", help="make a cluster secret file",
                              description="Cluster secrets: every node and client of a mesh uses the same one.")
    actions = p.add_subparsers(dest="secret_command", metavar="ACTION", required=True)
    new = actions.add_parser("new", help="write a fresh random secret to FILE (mode 0600; never overwrites)",
                             description="Write a fresh random 32-byte secret, as hex, to a new file "
                                         "readable only by its owner. Copy it to every device (scp, "
                                         "keep mode 0600) and give it to `meshci node --secret-file`.")
    new.add_argument("file", type=Path, metavar="FILE")
    new.set_defaults(func=run_new)


def run_new(args: argparse.Namespace) -> int:
    from meshci.wire.secret_file import generate_secret, write_secret

    path = write_secret(args.file, generate_secret())
    print(f"wrote a new cluster secret to {path} (mode 0600); copy it to every device of the mesh")
    return 0
