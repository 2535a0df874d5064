"""Flags and checks shared by the commands that talk to a running mesh (infer, peers)."""

from __future__ import annotations

import argparse

from meshci.errors import MeshciError
from meshci.node.membership import Address


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    """--via HOST:PORT and the cluster secret (--secret-file F | --insecure)."""
    p.add_argument("--via", required=True, metavar="HOST:PORT", help="any node of the mesh")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--secret-file", metavar="F", help="cluster secret file (`meshci secret new F`)")
    secret.add_argument("--insecure", action="store_true", help="the mesh runs without a secret")


def client_target(args: argparse.Namespace) -> tuple[Address, bytes | None]:
    """The node to ask and the secret to prove; one line when either is wrong."""
    from meshci.wire import load_secret

    try:
        via = Address.parse(args.via)
    except ValueError as exc:
        # not HOST:PORT: the user's typo, one line
        raise MeshciError(f"--via: {exc}: give a node's HOST:PORT, e.g. pi4-a.local:7000") from exc
    if args.secret_file is None and not args.insecure:
        raise MeshciError("no cluster secret: give --secret-file F (or --insecure)")
    return via, load_secret(args.secret_file) if args.secret_file else None
