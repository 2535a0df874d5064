"""Layered settings for a command: built-in defaults < a TOML file < `MESHCI_*` environment
variables < flags on the command line.

Pure: the caller passes the parsed flags, the TOML document and the environment. The
parser describes every setting once; a TOML key is the flag's long name without the dashes
(`secret-file` or `secret_file`), an environment variable is `MESHCI_` and the flag's name
in capitals with underscores (`MESHCI_SECRET_FILE`). The flags of a mutually exclusive group
(`--secret-file` / `--insecure`) count as one setting: the layer that sets any of them wins
the whole group, so a `--insecure` flag is not contradicted by a `secret-file` in the file.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshci.errors import MeshciError

ENV_PREFIX = "MESHCI_"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


class SettingsError(MeshciError):
    """A configuration file or environment variable that does not fit its flag."""


def config_dir() -> Path:
    """`$XDG_CONFIG_HOME/meshci`, or `~/.config/meshci`."""
    base = os.environ.get("XDG_CONFIG_HOME")
    return (Path(base) if base else Path.home() / ".config") / "meshci"


def load_toml(path: Path) -> dict[str, Any]:
    """A TOML file's table; one line naming the file when it cannot be read or parsed."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        # a missing or unreadable --config: the user's mistake, one line
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc


def settable(parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset()) -> dict[str, argparse.Action]:
    """Every long-flag option of `parser` by its dest (help and `skip` excluded)."""
    actions = {}
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or isinstance(action, argparse._HelpAction) or action.dest in skip:
            continue
        actions[action.dest] = action
    return actions


def _groups(parser: argparse.ArgumentParser) -> dict[str, frozenset[str]]:
    """dest -> the dests of its mutually exclusive group (itself alone when in none)."""
    groups: dict[str, frozenset[str]] = {}
    for group in parser._mutually_exclusive_groups:
        members = frozenset(a.dest for a in group._group_actions)
        for dest in members:
            groups[dest] = members
    return groups


def _flag(action: argparse.Action) -> str:
    return next(o for o in action.option_strings if o.startswith("--"))


def convert(action: argparse.Action, value: Any, where: str) -> Any:
    """A TOML value or environment string as the flag's parsed value; SettingsError naming
    `where` (the key or variable) when it does not fit."""
    flag = _flag(action)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
            value = value.strip().lower() in TRUE_WORDS
        if not isinstance(value, bool):
            raise SettingsError(f"{where}: {flag} takes true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._AppendAction):
        items = value.replace(",", " ").split() if isinstance(value, str) else value
        if not isinstance(items, list):
            raise SettingsError(f"{where}: {flag} takes a list, got {value!r}")
        return [_scalar(action, item, where) for item in items]
    if action.nargs == "?" and action.const is not None:
        if value is True or (isinstance(value, str) and value.strip().lower() in TRUE_WORDS):
            return action.const
        if value is False or (isinstance(value, str) and value.strip().lower() in FALSE_WORDS):
            return None
    if action.nargs not in (None, "?"):
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, list):
            raise SettingsError(f"{where}: {flag} takes a list, got {value!r}")
        return [_scalar(action, item, where) for item in items]
    return _scalar(action, value, where)


def _scalar(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, (bool, dict, list)) or value is None:
        raise SettingsError(f"{where}: {_flag(action)} takes a single value, got {value!r}")
    text = str(value)
    if action.type is None:
        return text
    try:
        return action.type(text)
    except (TypeError, ValueError) as exc:
        # the same check argparse applies to the flag itself
        raise SettingsError(f"{where}: {_flag(action)} takes {getattr(action.type, '__name__', 'a value')}, "
                            f"got {value!r}") from exc


def from_toml(actions: Mapping[str, argparse.Action], table: Mapping[str, Any], source: str) -> dict[str, Any]:
    """{dest: value} from a TOML table; an unknown key is an error naming it."""
    values = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            known = ", ".join(sorted(_flag(a)[2:] for a in actions.values()))
            raise SettingsError(f"{source}: unknown setting {key!r} (known: {known})")
        values[dest] = convert(actions[dest], value, f"{source}: {key}")
    return values


def from_env(actions: Mapping[str, argparse.Action], env: Mapping[str, str]) -> dict[str, Any]:
    """{dest: value} from `MESHCI_<FLAG>` variables (other MESHCI_ variables are ignored)."""
    values = {}
    for dest, action in actions.items():
        variable = ENV_PREFIX + _flag(action)[2:].replace("-", "_").upper()
        if variable in env:
            values[dest] = convert(action, env[variable], variable)
    return values


def suppress_defaults(parser: argparse.ArgumentParser) -> None:
    """Make `parser` leave out every option not given on the command line, so `layered` can
    tell a flag the user gave from a default (the defaults stay in a fresh parser)."""
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            action.default = argparse.SUPPRESS


def layered(parser: argparse.ArgumentParser, given: argparse.Namespace, table: Mapping[str, Any],
            env: Mapping[str, str], *, source: str = "config", skip: frozenset[str] = frozenset()
            ) -> argparse.Namespace:
    """The effective settings: `given` holds only the flags on the command line (the parser
    was built with `argument_default=argparse.SUPPRESS`); then the environment, then the
    TOML table, then the parser's own defaults."""
    actions = settable(parser, skip)
    groups = _groups(parser)
    layers = [vars(given), from_env(actions, env), from_toml(actions, table, source)]
    chosen: dict[str, Any] = {k: v for k, v in vars(given).items()}
    taken: set[str] = set(chosen)
    for layer in layers[1:]:
        won = {d for d in layer if not (groups.get(d, frozenset({d})) & taken)}
        for dest in won:
            chosen[dest] = layer[dest]
        taken |= {m for d in won for m in groups.get(d, frozenset({d}))}
    for dest, action in actions.items():
        if dest not in chosen:
            default = action.default if action.default is not argparse.SUPPRESS else None
            if isinstance(action, argparse._StoreTrueAction):
                default = False
            elif isinstance(action, argparse._AppendAction):
                default = list(default or [])
            chosen[dest] = default
    return argparse.Namespace(**chosen)
