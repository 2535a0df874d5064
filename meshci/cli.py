"""The `meshci` console entry point.

Each sub-command lives in its own module under meshci/commands/ and exposes
`add_parser(subparsers)` (which registers the sub-command and sets `func`) and the
function it registers. This file only dispatches, sets the log level (-v/-q) and turns a
MeshciError into one line on stderr: exit status 2 for a usage error, 1 for a runtime
failure (`meshci.errors.RuntimeFailure`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from meshci.errors import MeshciError

# module name under meshci.commands, in the order `meshci --help` lists them
COMMAND_MODULES = ["inspect", "plan", "simulate", "node", "infer", "peers", "status", "secret", "demo"]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line saying where to look (not the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every sub-command, or of `only` (its module alone is imported: a
    command such as `meshci infer` then starts without importing torch)."""
    parser = OneLineParser(
        prog="meshci",
        description="Distributed CNN inference on a peer-to-peer mesh (EdgeCI: DPFL + AWAS).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in [only] if only in COMMAND_MODULES else COMMAND_MODULES:
        try:
            module = importlib.import_module(f"meshci.commands.{name}")
        except ModuleNotFoundError as exc:
            # a sub-command not built yet in this tree; list the others
            if exc.name == f"meshci.commands.{name}":
                continue
            raise
        module.add_parser(sub)
    for command in sub.choices.values():
        # -v/-q also after the command (`meshci node -q`); SUPPRESS keeps the count given before it
        command.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The sub-command named in `argv` (after any -v/-q flags), if any."""
    for arg in argv:
        if arg.startswith("-") and set(arg[1:]) <= {"v", "q"} or arg in ("--verbose", "--quiet"):
            continue
        return arg if arg in COMMAND_MODULES else None
    return None


def log_level(verbose: int, quiet: int, base: int = logging.WARNING) -> int:
    """The command's `base` level (WARNING; INFO for `meshci node`, a service whose events
    are its output), each -v one step more (down to DEBUG), -q errors only."""
    if quiet:
        return logging.ERROR
    return max(logging.DEBUG, base - 10 * verbose)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)  # a bad flag: one line, exit status 2 (OneLineParser)
    logging.basicConfig(level=log_level(args.verbose, args.quiet, getattr(args, "log_level", logging.WARNING)),
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MeshciError as exc:
        print(f"meshci: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
