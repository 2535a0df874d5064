"""CPU quotas with cgroups, to emulate slow devices on one machine.

    with CpuQuota("node-a", cpus=0.3) as quota:
        proc = subprocess.Popen(argv, preexec_fn=quota.enter)   # the child starts inside the group
        quota.add(other_pid)                                     # or move a running process in
        ...
    # leaving: processes go back to the cgroup they came from, the group is removed

Works with cgroup v1 (the `cpu` controller's own hierarchy: `cpu.cfs_quota_us`,
`cpu.cfs_period_us`) and v2 (`cpu.max`), whichever mounts the cpu controller here.
`cgroup_support()` says by trying whether it works, and why not when it does not.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from meshci.testbed.errors import TestbedError

log = logging.getLogger(__name__)

DEFAULT_PERIOD_US = 100_000
_MIN_QUOTA_US = 1_000  # the kernel refuses smaller quotas
_sequence = itertools.count()


@dataclass(frozen=True)
class CpuHierarchy:
    """Where the cpu controller lives and where our groups go."""

    version: Literal[1, 2]
    mount: Path  # mount point of the hierarchy
    parent: Path  # the folder new groups are made in


def _mounts(mountinfo: str) -> Iterable[tuple[str, str, str, set[str]]]:
    """(root, mount point, fstype, super options) of each line of /proc/self/mountinfo."""
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) >= 5 and len(rest) >= 3:
            yield fields[3], fields[4], rest[0], set(rest[2].split(","))


def _own_cgroup(version: int, proc_cgroup: str) -> str:
    """This process's cgroup path in the v1 cpu hierarchy or in the v2 one."""
    for line in proc_cgroup.splitlines():
        number, controllers, path = line.split(":", 2)
        if version == 2 and number == "0" and controllers == "":
            return path
        if version == 1 and "cpu" in controllers.split(","):
            return path
    return "/"


def find_hierarchy(mountinfo: str, proc_cgroup: str) -> CpuHierarchy | None:
    """Pure: the cpu controller's hierarchy from /proc/self/mountinfo and /proc/self/cgroup texts."""
    mounts = list(_mounts(mountinfo))
    for root, point, fstype, options in mounts:
        if fstype == "cgroup" and "cpu" in options:
            own = _own_cgroup(1, proc_cgroup)
            relative = os.path.relpath(own, root) if own.startswith(root) else "."
            return CpuHierarchy(version=1, mount=Path(point), parent=Path(os.path.normpath(Path(point) / relative)))
    for _root, point, fstype, _options in mounts:
        if fstype == "cgroup2":
            controllers = Path(point, "cgroup.controllers")
            if controllers.exists() and "cpu" in controllers.read_text().split():
                # v2: groups under the hierarchy root, where the no-internal-process rule does not apply
                return CpuHierarchy(version=2, mount=Path(point), parent=Path(point))
    return None


def cpu_hierarchy() -> CpuHierarchy | None:
    try:
        return find_hierarchy(Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())
    except OSError:
        # no /proc (not Linux): no cgroups either
        return None


class CpuQuota:
    """A cgroup limiting its processes to `cpus` cores (0.25: a quarter of one core)."""

    def __init__(self, name: str, cpus: float, *, period_us: int = DEFAULT_PERIOD_US, kill_on_exit: bool = False):
        if cpus <= 0:
            raise TestbedError(f"a CPU quota must be positive, got {cpus}")
        if int(cpus * period_us) < _MIN_QUOTA_US:
            raise TestbedError(f"{cpus} CPU over a {period_us} us period is below the kernel's 1 ms minimum quota")
        self.name = name
        self.cpus = cpus
        self.period_us = period_us
        self.kill_on_exit = kill_on_exit
        self.hierarchy: CpuHierarchy | None = None
        self.path: Path | None = None
        self._origins: dict[int, Path] = {}

    # ---- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> CpuQuota:
        hierarchy = cpu_hierarchy()
        if hierarchy is None:
            raise TestbedError("no cgroup hierarchy with the cpu controller is mounted")
        self.hierarchy = hierarchy
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)[:64]
        self.path = hierarchy.parent / f"meshci-{safe}-{os.getpid()}-{next(_sequence)}"
        try:
            if hierarchy.version == 2:
                _enable_cpu_controller(hierarchy.parent)
            self.path.mkdir()
            quota_us = int(self.cpus * self.period_us)
            if hierarchy.version == 1:
                (self.path / "cpu.cfs_period_us").write_text(str(self.period_us))
                (self.path / "cpu.cfs_quota_us").write_text(str(quota_us))
            else:
                (self.path / "cpu.max").write_text(f"{quota_us} {self.period_us}")
        except OSError as exc:
            # permission, read-only cgroupfs, controller busy: clean what exists and say why
            self._remove_dir()
            raise TestbedError(f"cannot create cgroup {self.path}: {exc}") from exc
        log.debug("cgroup %s: %.2f CPU", self.path, self.cpus)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Move (or kill) the member processes, then remove the group. Idempotent."""
        if self.path is None or not self.path.exists():
            return
        for _attempt in range(50):
            members = self.pids()
            if not members:
                break
            for pid in members:
                self._release(pid)
            time.sleep(0.02)
        self._remove_dir()
        if self.path.exists():
            raise TestbedError(f"cgroup {self.path} could not be removed (members: {self.pids()})")

    def _release(self, pid: int) -> None:
        if self.kill_on_exit:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                # it already exited
                pass
            return
        assert self.hierarchy is not None
        origin = self._origins.get(pid, self.hierarchy.parent)
        try:
            (origin / "cgroup.procs").write_text(str(pid))
        except ProcessLookupError:
            # it exited meanwhile: nothing to move
            pass
        except OSError as exc:
            # its origin group vanished: the hierarchy's root always exists
            log.debug("cgroup: moving %d back to %s failed (%s); moving it to the root", pid, origin, exc)
            try:
                (self.hierarchy.mount / "cgroup.procs").write_text(str(pid))
            except ProcessLookupError:
                # it exited meanwhile
                pass

    def _remove_dir(self) -> None:
        if self.path is None:
            return
        for _attempt in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                # never created, or already removed
                return
            except OSError as exc:
                # EBUSY while an exiting member is still listed: retry shortly
                log.debug("cgroup rmdir %s: %s", self.path, exc)
                time.sleep(0.02)

    # ---- members ---------------------------------------------------------------------------

    def _procs_file(self) -> Path:
        if self.path is None:
            raise TestbedError("the CPU quota is not active (use it as a context manager)")
        return self.path / "cgroup.procs"

    def add(self, pid: int) -> None:
        """Move a running process (all its threads) into the group."""
        procs = self._procs_file()
        self._origins[pid] = self._current_group(pid)
        try:
            procs.write_text(str(pid))
        except OSError as exc:
            # e.g. the process is gone: a caller error worth one clear line
            raise TestbedError(f"cannot move pid {pid} into {self.path}: {exc}") from exc

    def enter(self) -> None:
        """Move the calling process in: use as `preexec_fn` so that a child starts limited."""
        self._procs_file().write_text(str(os.getpid()))

    def pids(self) -> list[int]:
        try:
            text = self._procs_file().read_text()
        except FileNotFoundError:
            # the group is gone: no members
            return []
        return [int(word) for word in text.split()]

    def _current_group(self, pid: int) -> Path:
        assert self.hierarchy is not None
        try:
            own = _own_cgroup(self.hierarchy.version, Path(f"/proc/{pid}/cgroup").read_text())
        except OSError:
            # the process is gone or /proc is unreadable: fall back to our parent folder
            return self.hierarchy.parent
        return Path(os.path.normpath(str(self.hierarchy.mount) + own))

    def throttled_s(self) -> float:
        """Total time the group's processes spent throttled by the quota (from cpu.stat)."""
        stat = dict(line.split() for line in (self._procs_file().parent / "cpu.stat").read_text().splitlines())
        if "throttled_usec" in stat:
            return int(stat["throttled_usec"]) / 1e6
        return int(stat.get("throttled_time", 0)) / 1e9


def _enable_cpu_controller(parent: Path) -> None:
    control = parent / "cgroup.subtree_control"
    if "cpu" not in control.read_text().split():
        control.write_text("+cpu")


@functools.lru_cache(maxsize=1)
def cgroup_support() -> str | None:
    """None when CPU quotas work here (found by trying), else the reason they do not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root (creating cgroups needs write access to the cgroup filesystem)"
    hierarchy = cpu_hierarchy()
    if hierarchy is None:
        return "no cgroup hierarchy with the cpu controller is mounted"
    try:
        with CpuQuota("probe", 0.5):
            pass
    except TestbedError as exc:
        # the smallest group cannot be made: quotas are unavailable, and this says why
        return str(exc)
    return None


def list_groups(prefix: str = "meshci-") -> list[Path]:
    """Groups with our prefix under the parent folder (should be none after a test)."""
    hierarchy = cpu_hierarchy()
    if hierarchy is None:
        return []
    return sorted(p for p in hierarchy.parent.iterdir() if p.is_dir() and p.name.startswith(prefix))
