"""Node settings from a TOML file and MESHCI_* variables, flags winning; `meshci secret new`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from meshci.cli import build_parser, main
from meshci.commands.node import effective_settings
from meshci.settings import SettingsError
from meshci.wire import load_secret


def given(*argv: str):
    return build_parser("node").parse_args(["node", *argv])


def test_file_and_variable_each_set_a_flag_and_the_flag_wins(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('threads = 3\nsecret-file = "from-file.key"\njoin = ["a:1", "b:2"]\n'
                      'gflops = 2\ndiscover = true\n')
    s = effective_settings(given("--config", str(config)), {})
    assert (s.threads, s.secret_file, s.join, s.gflops) == (3, "from-file.key", ["a:1", "b:2"], 2.0)
    assert s.discover is not None and s.listen == "127.0.0.1:0" and s.insecure is False

    env = {"MESHCI_THREADS": "5", "MESHCI_NAME": "pi4-a", "MESHCI_JOIN": "c:3,d:4"}
    s = effective_settings(given("--config", str(config)), env)
    assert (s.threads, s.name, s.join, s.secret_file) == (5, "pi4-a", ["c:3", "d:4"], "from-file.key")

    s = effective_settings(given("--config", str(config), "--threads", "7", "--join", "e:5"), env)
    assert (s.threads, s.join, s.name) == (7, ["e:5"], "pi4-a")


def test_a_flag_wins_its_whole_exclusive_group(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('secret-file = "mesh.key"\n')
    s = effective_settings(given("--config", str(config), "--insecure"), {})
    assert s.insecure is True and s.secret_file is None
    s = effective_settings(given("--config", str(config)), {"MESHCI_INSECURE": "yes"})
    assert s.insecure is True and s.secret_file is None


def test_the_config_file_comes_from_the_environment_or_xdg(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "meshci").mkdir()
    (tmp_path / "meshci" / "node.toml").write_text("threads = 4\n")
    other = tmp_path / "other.toml"
    other.write_text("threads = 6\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert effective_settings(given(), {}).threads == 4
    assert effective_settings(given(), {"MESHCI_CONFIG": str(other)}).threads == 6


@pytest.mark.parametrize("text,env,message", [
    ("thread = 3\n", {}, "unknown setting 'thread'"),
    ("threads = 'many'\n", {}, "--threads takes int"),
    ("insecure = 'perhaps'\n", {}, "--insecure takes true or false"),
    ("threads = [1\n", {}, "is not valid TOML"),
    ("", {"MESHCI_GFLOPS": "fast"}, "MESHCI_GFLOPS: --gflops takes float"),
])
def test_bad_settings_name_the_key(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=message):
        effective_settings(given("--config", str(config)), env)


def test_node_refusals_from_each_layer_are_one_line(tmp_path: Path) -> None:
    """The layers reach the running command: a bad listen address from the file, from the
    variable, and the flag that overrides both."""
    config = tmp_path / "node.toml"
    config.write_text('listen = "from-file"\ninsecure = true\n')
    base = [sys.executable, "-m", "meshci", "node", "--config", str(config), "--gflops", "1"]
    env = {**os.environ, "MESHCI_DATA_DIR": str(tmp_path)}
    for extra, env_listen, shown in [([], None, "from-file"), ([], "from-env", "from-env"),
                                     (["--listen", "from-flag"], "from-env", "from-flag")]:
        run_env = {**env, **({"MESHCI_LISTEN": env_listen} if env_listen else {})}
        done = subprocess.run(base + extra, capture_output=True, text=True, timeout=60, env=run_env)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and f"address '{shown}' is not HOST:PORT: give HOST:PORT" in lines[0], lines


def test_secret_new_writes_a_private_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "mesh.key"
    assert main(["secret", "new", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(load_secret(path)) == 32
    assert main(["secret", "new", str(path)]) == 2  # never overwrites a secret
    assert "cannot create secret file" in capsys.readouterr().err


def test_data_lives_under_the_xdg_cache_by_default(tmp_path: Path, monkeypatch) -> None:
    from meshci.cost.profiling import default_data_dir

    monkeypatch.delenv("MESHCI_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache" / "meshci"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / ".cache" / "meshci"
    monkeypatch.setenv("MESHCI_DATA_DIR", str(tmp_path / "here"))  # also what --data-dir's variable sets
    assert default_data_dir() == tmp_path / "here"
