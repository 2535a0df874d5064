"""-v/-q and the standard logging module; no bare prints in library code."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

import meshci
from meshci.cli import build_parser, log_level, main

# modules whose stdout is their interface: the command line, and the testbed's helper
# processes, which report to their parent over stdout
TALKERS = ("commands", "cli.py", "testbed", "soak", "__main__.py")  # command-line tools


def test_levels() -> None:
    assert log_level(0, 0) == logging.WARNING
    assert log_level(1, 0) == logging.INFO and log_level(5, 0) == logging.DEBUG
    assert log_level(0, 1) == logging.ERROR and log_level(2, 1) == logging.ERROR
    node = build_parser("node").parse_args(["node"])
    assert log_level(0, 0, node.log_level) == logging.INFO  # a service: its events are its output
    assert log_level(1, 0, node.log_level) == logging.DEBUG
    after = build_parser("node").parse_args(["node", "-q"])
    assert log_level(after.verbose, after.quiet, after.log_level) == logging.ERROR
    assert build_parser("node").parse_args(["-v", "node"]).verbose == 1
    infer = build_parser("infer").parse_args(["-q", "infer", "--via", "h:1", "--model", "m"])
    assert log_level(infer.verbose, infer.quiet, getattr(infer, "log_level", logging.WARNING)) == logging.ERROR


def test_library_code_has_no_bare_prints() -> None:
    root = Path(meshci.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(TALKERS):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{relative}:{node.lineno}")
    assert offenders == []


def test_a_bad_flag_is_one_line_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["plan", "--model", "vgg16", "--strategy", "fastest"])
    assert done.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshci plan: error: argument --strategy: invalid choice")
    assert lines[0].endswith("(see `meshci plan --help`)")
