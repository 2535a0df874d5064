"""CPU quotas: measured share of a core, and groups that never outlive the test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshci.testbed.cpu import CpuHierarchy, CpuQuota, find_hierarchy, list_groups
from meshci.testbed.errors import TestbedError

BUSY_LOOP = """
import time
wall, cpu = time.perf_counter(), time.process_time()
while time.perf_counter() - wall < 1.0:
    pass
print((time.process_time() - cpu) / (time.perf_counter() - wall))
"""

V1_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


@pytest.mark.testbed
def test_busy_loop_gets_its_quota(needs_cgroups: None) -> None:
    with CpuQuota("busy", 0.25) as quota:
        proc = subprocess.run([sys.executable, "-c", BUSY_LOOP], preexec_fn=quota.enter, capture_output=True,
                              text=True, timeout=30, check=True)  # fmt: skip
        share = float(proc.stdout)
        throttled = quota.throttled_s()
    assert share == pytest.approx(0.25, abs=0.06)
    assert throttled > 0.3  # ~0.75 s of the second was spent throttled


@pytest.mark.testbed
def test_teardown_moves_members_back_even_when_the_body_raises(needs_cgroups: None) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(RuntimeError, match="boom"), CpuQuota("leak", 0.5) as quota:
            quota.add(sleeper.pid)
            assert quota.pids() == [sleeper.pid]
            path = quota.path
            raise RuntimeError("boom")
        assert path is not None and not path.exists()
        assert sleeper.poll() is None  # moved back, still running
        assert Path(f"/proc/{sleeper.pid}/cgroup").read_text() == Path(f"/proc/{os.getpid()}/cgroup").read_text()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.testbed
def test_kill_on_exit_stops_members(needs_cgroups: None) -> None:
    with CpuQuota("kill/../x", 0.5, kill_on_exit=True) as quota:
        assert quota.path is not None and quota.path.name.startswith("meshci-kill_.._x-")
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=quota.enter)
        assert sleeper.pid in quota.pids()
    assert sleeper.wait(timeout=5) == -9
    assert not list_groups("meshci-kill_")


def test_bad_quotas_are_refused() -> None:
    with pytest.raises(TestbedError, match="positive"):
        CpuQuota("x", 0)
    with pytest.raises(TestbedError, match="minimum"):
        CpuQuota("x", 0.005)
    with pytest.raises(TestbedError, match="not active"):
        CpuQuota("x", 0.5).add(os.getpid())


def test_finds_the_v1_cpu_hierarchy_under_our_own_group() -> None:
    found = find_hierarchy(V1_MOUNTINFO, "2:cpu,cpuacct:/jobs/a\n0::/\n")
    assert found == CpuHierarchy(1, Path("/sys/fs/cgroup/cpu,cpuacct"), Path("/sys/fs/cgroup/cpu,cpuacct/jobs/a"))


def test_no_cpu_controller_means_no_hierarchy(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    mountinfo = f"30 23 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n"
    assert find_hierarchy(mountinfo, "0::/\n") is None
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    assert find_hierarchy(mountinfo, "0::/x\n") == CpuHierarchy(2, tmp_path, tmp_path)
    assert find_hierarchy(V2_MOUNTINFO.replace("cgroup2 cgroup2", "tmpfs tmpfs"), "0::/\n") is None
