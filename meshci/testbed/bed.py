"""An emulated edge cluster that outlives the command that made it: `up`, `status`, `exec`, `down`.

    bed = up(load_spec("hetero4.json", cores), name="t1")   # namespaces, shaping, quotas, nodes
    run_in(bed_state, "rpi4-a", ["meshci", "infer", ...])     # a client inside a device
    down("t1")                                                # everything, also after a crash

Each device is a network namespace with its own address on one bridge (`netns`), its
links shaped in the kernel (`links`: htb rate, classic-BPF loss, one shaped channel for a
shared medium), and a `meshci node` started inside its namespace and inside a cgroup
with its CPU quota (short CFS period, as `meshci demo`). ``ip netns exec`` remounts /sys,
so the node cannot read its own quota: the launcher states it in ``MESHCI_CPU_QUOTA``,
which keys the node's profile cache (`meshci.cost.profiling.cpu_quota`).

Delay and jitter: this kernel has no netem, so each device runs a delay relay
(`meshci.testbed.relay`) on its address, in front of its node (which listens on the
device's loopback) and of a probe server; each source address gets its pair's one-way
delay. Nodes advertise a hostname, ``<device>.<bed>.tb``, which the namespace's own
/etc/hosts (``/etc/netns/<ns>/hosts``, bind-mounted by ``ip netns exec``) resolves to
loopback on the device itself and to the device's address everywhere else: every peer,
and every client run with `exec`, dials the relay, so the mesh's own traffic is delayed.

Every resource is written to the state file (``/run/meshci-testbed/<bed>.json``) before it
is made, so `down` removes it all even after a crash; `down` also sweeps namespaces and
cgroups whose names carry the bed's prefix.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from meshci.testbed import commands, links
from meshci.testbed.cpu import CpuQuota, cpu_hierarchy
from meshci.testbed.errors import TestbedError
from meshci.testbed.netns import Host, Topology, _build, _pid_alive, list_namespaces
from meshci.testbed.spec import ClusterSpec

NODE_PORT = 7100
PROBE_PORT = 7101
STATE_DIRS = (Path("/run/meshci-testbed"), Path("/tmp/meshci-testbed"))
SUBNET_BASE = "10.214.{}.0/24"
MIN_PERIOD_US = 5_000  # as `meshci demo`: a short CFS period keeps a small quota steady
KERNEL_MIN_QUOTA_US = 1_000
_BED_NAME = re.compile(r"^[a-z0-9]{1,6}$")
READY = re.compile(r"meshci node (\S+) listening on (\S+):(\d+)")


def state_dir() -> Path:
    for folder in STATE_DIRS:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        except OSError:
            # /run not writable here: the next candidate
            continue
    raise TestbedError(f"no writable state folder ({', '.join(map(str, STATE_DIRS))})")


def state_path(name: str) -> Path:
    return state_dir() / f"{name}.json"


def prefix_of(name: str) -> str:
    return f"mcb{name}"


def check_root() -> str | None:
    """None when this process may build a testbed, else the one-line reason."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "tools/testbed needs root (network namespaces, tc and cgroups need CAP_NET_ADMIN/CAP_SYS_ADMIN)"
    return None


def hostname(device: str, bed: str) -> str:
    return f"{device}.{bed}.tb"


class _State:
    """The state file, rewritten after every change so that a crash leaves an accurate record."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def load_state(name: str) -> dict[str, Any]:
    path = state_path(name)
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise TestbedError(f"no testbed {name!r} is up (no {path})") from None
    return data


def up(spec: ClusterSpec, *, name: str = "tb", index: int = 0, data_dir: Path | None = None,
       threads: int = 1, form_timeout_s: float = 240.0, delay: bool = True) -> dict[str, Any]:
    """Build the cluster and start its nodes; returns the state (also in the state file).
    On any failure everything made so far is removed before the error propagates."""
    reason = check_root()
    if reason:
        raise TestbedError(reason)
    if not _BED_NAME.match(name):
        raise TestbedError(f"bad testbed name {name!r}: 1-6 lowercase letters or digits")
    path = state_path(name)
    if path.exists():
        raise TestbedError(f"testbed {name!r} is already up (run `tools/testbed down --name {name}` first)")
    from meshci.cost.profiling import default_data_dir

    workdir = state_dir() / name
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    state = _State(path, {"name": name, "prefix": prefix_of(name), "cluster": spec.source, "medium": spec.medium,
                          "shared_mbps": spec.shared_mbps, "requester": spec.requester, "workdir": str(workdir),
                          "namespaces": [], "cgroups": [], "pids": [], "etc_netns": [], "devices": []})
    state.save()
    try:
        _up(spec, state, name, index, data_dir or default_data_dir(), threads, form_timeout_s, delay)
    except BaseException:
        # a half-built testbed is worse than none: remove what exists, then report
        down(name)
        raise
    return state.data


def _up(spec: ClusterSpec, state: _State, name: str, index: int, data_dir: Path, threads: int,
        form_timeout_s: float, delay: bool) -> None:
    import ipaddress
    import itertools

    prefix = prefix_of(name)
    net = Topology(prefix=prefix, subnet=ipaddress.IPv4Network(SUBNET_BASE.format(200 + index % 50)),
                   bridge_netns=f"{prefix}br", bridge=f"{prefix}br")
    state.data["namespaces"] = [net.bridge_netns] + [f"{prefix}h{i}" for i in range(len(spec.devices))]
    state.data["bridge_netns"] = net.bridge_netns
    state.save()
    _build(net, list(itertools.islice(net.subnet.hosts(), len(spec.devices))))
    net._namespaces.clear()  # owned by the state file now, not by this Topology object
    hosts = {d.name: h for d, h in zip(spec.devices, net.hosts)}
    shaping = links.shape_cluster(spec, net, hosts)
    use_relay = delay and any(p.delay_ms > 0 or p.jitter_ms > 0 for p in spec.pairs.values())
    state.data["delay"] = "relay" if use_relay else None
    state.data["delay_note"] = (
        "no netem in this kernel: one-way delay (and jitter) added by a TCP delay relay in each destination "
        "device, in front of its node and probe ports; nodes advertise <device>.<bed>.tb, which resolves to the "
        "relay everywhere but on the device itself. The sender's TCP does not see the added round trip."
        if use_relay else "no delay configured")
    secret = Path(state.data["workdir"]) / "secret"
    from meshci.wire import generate_secret, write_secret

    write_secret(secret, generate_secret())
    state.data["secret_file"] = str(secret)
    for d in spec.devices:
        host = hosts[d.name]
        etc = Path("/etc/netns") / host.netns
        state.data["etc_netns"].append(str(etc))
        state.save()
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"]
        for other, other_host in hosts.items():
            address = "127.0.0.1" if other == d.name and use_relay else other_host.ip
            lines.append(f"{address} {hostname(other, name)}")
        (etc / "hosts").write_text("\n".join(lines) + "\n")
    period_us = max(MIN_PERIOD_US, math.ceil(KERNEL_MIN_QUOTA_US / min(d.cpu for d in spec.devices)))
    first = hostname(spec.devices[0].name, name)
    for d in spec.devices:
        host = hosts[d.name]
        entry: dict[str, Any] = {"name": d.name, "netns": host.netns, "ip": host.ip, "ifname": host.ifname,
                                 "bridge_port": host.bridge_port, "hostname": hostname(d.name, name),
                                 "node": f"{hostname(d.name, name)}:{NODE_PORT}",
                                 "probe": f"{hostname(d.name, name)}:{PROBE_PORT}",
                                 "cpu": d.cpu, "cpu_given": d.cpu_given, "gflops_nominal": d.gflops,
                                 "period_us": period_us, "shaping": shaping[d.name],
                                 "delays_ms": {p: spec.pair(d.name, p).delay_ms for p in hosts if p != d.name},
                                 "jitter_ms": {p: spec.pair(d.name, p).jitter_ms for p in hosts if p != d.name}}
        state.data["devices"].append(entry)
        quota = CpuQuota(f"tb-{name}-{d.name}", d.cpu, period_us=period_us)
        quota.__enter__()
        assert quota.path is not None
        entry["cgroup"] = str(quota.path)
        state.data["cgroups"].append(str(quota.path))
        state.save()
        bind = "127.0.0.1" if use_relay else host.ip
        if use_relay:
            delays = [f"--delay-from={hosts[p].ip}={spec.pair(d.name, p).delay_ms}" for p in hosts if p != d.name]
            jitter = max((spec.pair(d.name, p).jitter_ms for p in hosts if p != d.name), default=0.0)
            relay = [sys.executable, "-m", "meshci.testbed.relay", "--listen", f"{host.ip}:{NODE_PORT}",
                     "--target", f"127.0.0.1:{NODE_PORT}", "--delay-ms", "0", "--jitter-ms", str(jitter),
                     "--forward", f"{host.ip}:{PROBE_PORT}=127.0.0.1:{PROBE_PORT}", *delays]
            _spawn(state, entry, "relay", host, relay)
        _spawn(state, entry, "probe", host, [sys.executable, "-m", "meshci.testbed.probe", "serve",
                                             "--port", str(PROBE_PORT), "--bind", bind])
        node = [sys.executable, "-m", "meshci", "-v", "node", "--listen", f"{entry['hostname']}:{NODE_PORT}",
                "--secret-file", str(secret), "--name", d.name, "--data-dir", str(data_dir),
                "--threads", str(threads), "--join-timeout", str(form_timeout_s)]
        if d.name != spec.devices[0].name:
            node += ["--join", f"{first}:{NODE_PORT}"]
        quota_text = f"{int(d.cpu * period_us)} {period_us}"
        _spawn(state, entry, "node", host, node, cgroup=quota.path / "cgroup.procs",
               env={"MESHCI_CPU_QUOTA": quota_text, "MESHCI_DATA_DIR": str(data_dir)})
    _wait_nodes(state, form_timeout_s)
    wait_formed(state.data, form_timeout_s)
    state.data["up_at"] = time.time()
    state.save()


def _spawn(state: _State, entry: dict[str, Any], role: str, host: Host, argv: list[str], *,
           cgroup: Path | None = None, env: dict[str, str] | None = None) -> None:
    """Start `argv` inside `host`, detached (its own session), output to a log in the workdir."""
    log = Path(state.data["workdir"]) / f"{entry['name']}.{role}.log"
    cmd = [commands.tool("ip"), "netns", "exec", host.netns, *argv]
    if cgroup is not None:
        # join the cgroup before entering the namespace: inside it /sys is remounted and the group unseen
        cmd = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup), *cmd]
    repo = str(Path(__file__).resolve().parents[2])
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=full_env)
    entry.setdefault("pids", {})[role] = proc.pid
    entry.setdefault("logs", {})[role] = str(log)
    state.data["pids"].append(proc.pid)
    state.save()


def _wait_nodes(state: _State, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    waiting = {d["name"]: d for d in state.data["devices"]}
    while waiting:
        for name, entry in list(waiting.items()):
            text = Path(entry["logs"]["node"]).read_text(errors="replace")
            if READY.search(text):
                del waiting[name]
                continue
            if not _alive(entry["pids"]["node"]):
                raise TestbedError(f"node {name} exited while starting; its log ends:\n{text[-2000:]}")
        if time.monotonic() > deadline:
            raise TestbedError(f"nodes {', '.join(waiting)} did not start within {timeout_s:.0f} s")
        time.sleep(0.2)


def wait_formed(data: dict[str, Any], timeout_s: float) -> None:
    """Wait until every node sees every other alive (asked from inside the first device)."""
    first = data["devices"][0]
    code = ("import asyncio,sys; from meshci.node.local import wait_formed; from meshci.node.membership import "
            "Address; from meshci.wire import load_secret; asyncio.run(wait_formed([Address.parse(a) for a in "
            "sys.argv[3:]], load_secret(sys.argv[1]), timeout=float(sys.argv[2])))")
    argv = [sys.executable, "-c", code, data["secret_file"], str(timeout_s), *(d["node"] for d in data["devices"])]
    done = run_in(data, first["name"], argv, timeout=timeout_s + 30)
    if done.returncode != 0:
        raise TestbedError(f"the mesh did not form within {timeout_s:.0f} s: {done.stderr.strip()[-1500:]}")


def run_in(data: dict[str, Any], device: str, argv: list[str], *, timeout: float | None = None,
           capture: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside a device's namespace (its /etc/hosts resolves the nodes' names)."""
    entry = device_entry(data, device)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p),
           "MESHCI_TESTBED": data["name"], "MESHCI_SECRET_FILE": data["secret_file"]}
    cmd = [commands.tool("ip"), "netns", "exec", entry["netns"], *argv]
    return subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout, env=env, check=False)


def device_entry(data: dict[str, Any], device: str) -> dict[str, Any]:
    for entry in data["devices"]:
        if entry["name"] == device:
            return entry
    raise TestbedError(f"no device {device!r} in testbed {data['name']!r} "
                       f"(have {', '.join(d['name'] for d in data['devices'])})")


def set_cpu(data: dict[str, Any], device: str, cpus: float) -> None:
    """Change a running device's CPU quota (its node keeps running, now slower or faster)."""
    entry = device_entry(data, device)
    quota_us = int(cpus * entry["period_us"])
    if quota_us < KERNEL_MIN_QUOTA_US:
        raise TestbedError(f"{cpus} CPU is below the kernel's minimum quota at a {entry['period_us']} us period")
    folder = Path(entry["cgroup"])
    if (folder / "cpu.max").exists():
        (folder / "cpu.max").write_text(f"{quota_us} {entry['period_us']}")
    else:
        (folder / "cpu.cfs_quota_us").write_text(str(quota_us))
    entry["cpu"] = cpus
    _State(state_path(data["name"]), data).save()


def read_cpu(cgroup: str) -> str:
    """The quota the kernel applies now (``"quota period"`` in microseconds, or ``max``)."""
    folder = Path(cgroup)
    try:
        if (folder / "cpu.max").exists():
            return (folder / "cpu.max").read_text().strip()
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        return "max" if quota < 0 else f"{quota} {int((folder / 'cpu.cfs_period_us').read_text())}"
    except (OSError, ValueError):
        # the group is gone
        return "gone"


def status(name: str) -> dict[str, Any]:
    data = load_state(name)
    out = {k: data.get(k) for k in ("name", "cluster", "medium", "shared_mbps", "requester", "secret_file",
                                    "delay", "delay_note", "bridge_netns")}
    out["devices"] = []
    for entry in data["devices"]:
        alive = {role: _alive(pid) for role, pid in entry.get("pids", {}).items()}
        out["devices"].append({
            "name": entry["name"], "netns": entry["netns"], "address": entry["ip"], "node": entry["node"],
            "probe": entry["probe"], "cpu": entry["cpu"], "cpu_max": read_cpu(entry.get("cgroup", "")),
            "gflops_nominal": entry["gflops_nominal"],
            "shaping": {**entry["shaping"], "delay": data.get("delay"), "delays_ms": entry["delays_ms"],
                        "jitter_ms": entry["jitter_ms"]},
            "processes": alive})
    return out


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    if not _pid_alive(pid):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        # gone between the two looks
        return False


def _kill_group(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        for _ in range(50):
            if not _alive(pid):
                return
            time.sleep(0.05)


def down(name: str) -> list[str]:
    """Remove everything testbed `name` made (processes, namespaces with their qdiscs, cgroups,
    /etc/netns entries, state); also what a crashed `up` left. Returns what was removed."""
    removed: list[str] = []
    path = state_path(name)
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        data = {"pids": [], "namespaces": [], "cgroups": [], "etc_netns": [], "workdir": str(state_dir() / name)}
    for pid in data.get("pids", []):
        if _alive(pid):
            _kill_group(pid)
            removed.append(f"process {pid}")
    prefix = prefix_of(name)
    groups = set(data.get("cgroups", []))
    hierarchy = cpu_hierarchy()
    if hierarchy is not None and hierarchy.parent.exists():
        groups |= {str(p) for p in hierarchy.parent.iterdir() if p.name.startswith(f"meshci-tb-{name}-")}
    for group in sorted(groups):
        _remove_group(Path(group))
        removed.append(f"cgroup {group}")
    namespaces = set(data.get("namespaces", [])) | {n for n in list_namespaces() if re.match(rf"^{prefix}(br|h\d+)$", n)}
    for netns in sorted(namespaces):
        if netns in list_namespaces():
            _kill_namespace_pids(netns)
            commands.run(["ip", "netns", "delete", netns], check=False)
            removed.append(f"netns {netns}")
    for etc in data.get("etc_netns", []):
        if Path(etc).exists():
            shutil.rmtree(etc, ignore_errors=True)
            removed.append(etc)
    if data.get("workdir"):
        shutil.rmtree(data["workdir"], ignore_errors=True)
    path.unlink(missing_ok=True)
    return removed


def _kill_namespace_pids(netns: str) -> None:
    done = commands.run(["ip", "netns", "pids", netns], check=False)
    for word in done.stdout.split():
        try:
            os.kill(int(word), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            # gone already
            continue


def _remove_group(folder: Path) -> None:
    for _ in range(100):
        try:
            members = (folder / "cgroup.procs").read_text().split()
        except OSError:
            members = []
        for pid in members:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                # exited meanwhile
                continue
        try:
            folder.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            # members still exiting: try again shortly
            time.sleep(0.05)
    raise TestbedError(f"cgroup {folder} could not be removed")


def spec_summary(spec: ClusterSpec) -> dict[str, Any]:
    return {"devices": [asdict(d) for d in spec.devices], "medium": spec.medium, "shared_mbps": spec.shared_mbps}
