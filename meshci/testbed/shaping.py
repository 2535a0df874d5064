"""Per-link shaping between hosts of a topology: rate with htb, delay and loss with netem
when the kernel has it, otherwise delay with a userspace relay (see `relay.py`).

    with topology(2) as net, Shaper(net) as shaper:
        report = shaper.shape(net.hosts[0], net.hosts[1], LinkShape(rate_mbit=100, delay_ms=10))
        address = shaper.endpoint(net.hosts[0], net.hosts[1], port)   # what h0 should dial
        print(report)   # ShapingReport(rate='htb', delay='relay', loss=None, notes=(...))

A link a<->b is shaped on both hosts' interfaces: on a's egress for traffic to b, on b's
egress for traffic to a (u32 filter on the destination address, one htb class per
peer), so each host pair can have its own rate and the other pairs stay unshaped.
netem (when present) sits beneath that class for delay and loss. Without netem, the
delay comes from a TCP relay started inside the destination host on first use of
`endpoint()`, and loss from a classic-BPF random classifier on the bridge port towards
the destination (`bpf_loss`); where that is missing too, loss is not emulated and the
report says so.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

from meshci.testbed import bpf_loss, commands
from meshci.testbed.errors import TestbedError
from meshci.testbed.netns import Host, Topology, stop_process

log = logging.getLogger(__name__)

DelayMode = Literal["auto", "netem", "relay"]
GSO_MAX_SEGS = 65535  # the kernel's default gso_max_segs


@dataclass(frozen=True)
class LinkShape:
    """What one link should look like, in each direction."""

    rate_mbit: float | None = None  # None: unshaped
    delay_ms: float = 0.0  # one-way
    loss_pct: float = 0.0

    def __post_init__(self) -> None:
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise TestbedError(f"rate must be positive, got {self.rate_mbit} Mbit/s")
        if self.delay_ms < 0 or not 0 <= self.loss_pct < 100:
            raise TestbedError(f"bad delay {self.delay_ms} ms or loss {self.loss_pct} %")


@dataclass(frozen=True)
class ShapingReport:
    """Which mechanism actually produced each property (None: not emulated)."""

    rate: Literal["htb"] | None
    delay: Literal["netem", "relay"] | None
    loss: Literal["netem", "bpf"] | None
    notes: tuple[str, ...] = ()


RELAY_NOTE = (
    "delay by TCP relay in the destination host: application bytes are held for the one-way delay "
    "each way, but the sender's TCP does not see the longer round trip"
)
BPF_LOSS_NOTE = (
    "loss by a classic-BPF random classifier into a dropping class on the bridge port towards the "
    "destination (in-network loss, per packet; the sender's GSO is off)"
)


def htb_burst_bytes(rate_mbit: float) -> int:
    """Token bucket depth: 2 ms at the rate, at least two 64 KB segments (veth hands htb GSO super-packets)."""
    return max(2 * 65536 + 3028, int(rate_mbit * 1e6 / 8 * 0.002))


def _is_missing_qdisc(exc: TestbedError) -> bool:
    text = str(exc).lower()
    return "unknown" in text or "not found" in text or "no such file" in text


@dataclass
class _Relay:
    process: subprocess.Popen[bytes]
    port: int


@dataclass
class Shaper:
    """Shapes links of one topology; `close()` (or leaving the `with`) removes qdiscs and relays."""

    net: Topology
    delay_mode: DelayMode = "auto"
    _classes: dict[str, dict[str, int]] = field(default_factory=dict)  # netns -> dst ip -> class minor
    _shapes: dict[tuple[str, str], LinkShape] = field(default_factory=dict)  # (src, dst) host names
    _delay_by: dict[tuple[str, str], str | None] = field(default_factory=dict)
    _loss_by: dict[tuple[str, str], str | None] = field(default_factory=dict)
    _relays: dict[tuple[str, str, int], _Relay] = field(default_factory=dict)
    _netem_missing: str | None = None
    _loss_ports: set[str] = field(default_factory=set)  # bridge ports carrying a loss filter
    _gso_limited: set[Host] = field(default_factory=set)

    def __enter__(self) -> Shaper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- shaping -----------------------------------------------------------------------

    def shape(self, a: Host, b: Host, shape: LinkShape, *, both_ways: bool = True) -> ShapingReport:
        """Shape a->b (and b->a unless `both_ways` is False); returns what was actually applied."""
        reports = [self._shape_direction(a, b, shape)]
        if both_ways:
            reports.append(self._shape_direction(b, a, shape))
        first = reports[0]
        notes = tuple(dict.fromkeys(note for report in reports for note in report.notes))
        return ShapingReport(rate=first.rate, delay=first.delay, loss=first.loss, notes=notes)

    def _shape_direction(self, src: Host, dst: Host, shape: LinkShape) -> ShapingReport:
        if (src.name, dst.name) in self._shapes:
            raise TestbedError(f"link {src.name}->{dst.name} is already shaped")
        classes = self._classes.setdefault(src.netns, {})
        if not classes:
            # default 0: traffic no filter claims (other peers, ARP) leaves unshaped
            self._tc(src, ["qdisc", "add", "dev", src.ifname, "root", "handle", "1:", "htb", "default", "0"])
        minor = len(classes) + 1
        classes[dst.ip] = minor
        rate = f"{shape.rate_mbit}mbit" if shape.rate_mbit is not None else "100gbit"
        burst = htb_burst_bytes(shape.rate_mbit if shape.rate_mbit is not None else 100_000)
        self._tc(src, ["class", "add", "dev", src.ifname, "parent", "1:", "classid", f"1:{minor}", "htb",
                       "rate", rate, "ceil", rate, "burst", str(burst), "cburst", str(burst),
                       "quantum", "65536"])  # fmt: skip
        self._tc(src, ["filter", "add", "dev", src.ifname, "parent", "1:", "protocol", "ip", "prio", "1",
                       "u32", "match", "ip", "dst", f"{dst.ip}/32", "flowid", f"1:{minor}"])  # fmt: skip
        notes: list[str] = []
        delay: Literal["netem", "relay"] | None = None
        loss: Literal["netem", "bpf"] | None = None
        wants_netem = shape.delay_ms > 0 or shape.loss_pct > 0
        if wants_netem and self.delay_mode != "relay" and self._netem_missing is None:
            netem = ["qdisc", "add", "dev", src.ifname, "parent", f"1:{minor}", "handle", f"{minor + 10}:", "netem",
                     "delay", f"{shape.delay_ms}ms", "loss", f"{shape.loss_pct}%",
                     "limit", "100000"]  # fmt: skip
            try:
                self._tc(src, netem)
                delay = "netem" if shape.delay_ms > 0 else None
                loss = "netem" if shape.loss_pct > 0 else None
            except TestbedError as exc:
                # the kernel lacks netem: fall back to the relay (or fail if netem was demanded)
                if not _is_missing_qdisc(exc) or self.delay_mode == "netem":
                    raise
                self._netem_missing = str(exc)
                log.info("netem is not available (%s); delay falls back to the relay, loss to cls_bpf", exc)
        if wants_netem and delay is None and loss is None:
            if shape.delay_ms > 0:
                delay = "relay"
                notes.append(RELAY_NOTE)
            if shape.loss_pct > 0:
                try:
                    self._add_bpf_loss(src, dst, shape.loss_pct)
                    loss = "bpf"
                    notes.append(BPF_LOSS_NOTE)
                except TestbedError as exc:
                    # no cls_bpf (or no pfifo) here: say plainly that loss is not emulated
                    if not _is_missing_qdisc(exc):
                        raise
                    notes.append(f"loss of {shape.loss_pct}% requested but not emulated ({exc})")
        self._shapes[(src.name, dst.name)] = shape
        self._delay_by[(src.name, dst.name)] = delay
        self._loss_by[(src.name, dst.name)] = loss
        return ShapingReport(rate="htb" if shape.rate_mbit is not None else None, delay=delay, loss=loss,
                             notes=tuple(notes))  # fmt: skip

    def _add_bpf_loss(self, src: Host, dst: Host, loss_pct: float) -> None:
        """Drop src->dst packets at random on the bridge's port towards dst (see `bpf_loss`)."""
        port = dst.bridge_port
        netns = self.net.bridge_netns
        if port not in self._loss_ports:
            self._tc_in(netns, ["qdisc", "add", "dev", port, "root", "handle", "1:", "htb", "default", "0"])
            self._tc_in(netns, ["class", "add", "dev", port, "parent", "1:", "classid", "1:1", "htb",
                                "rate", "100gbit", "quantum", "65536"])  # fmt: skip
            self._tc_in(netns, ["qdisc", "add", "dev", port, "parent", "1:1", "handle", "2:", "pfifo", "limit", "0"])
            self._loss_ports.add(port)
        program = bpf_loss.bytecode(bpf_loss.loss_program(src.ip, dst.ip, loss_pct / 100.0))
        self._tc_in(netns, ["filter", "add", "dev", port, "parent", "1:", "protocol", "ip", "prio", "1",
                            "bpf", "bytecode", program, "classid", "1:1"])  # fmt: skip
        # one packet per skb from the sender, so that a drop loses one segment, not a 64 KB GSO burst
        commands.run(["ip", "-n", src.netns, "link", "set", src.ifname, "gso_max_segs", "1"])
        self._gso_limited.add(src)

    def _tc_in(self, netns: str, argv: list[str]) -> None:
        commands.run(["ip", "netns", "exec", netns, commands.tool("tc"), *argv])

    def _tc(self, host: Host, argv: list[str]) -> None:
        self._tc_in(host.netns, argv)

    # ---- addressing ----------------------------------------------------------------------

    def endpoint(self, src: Host, dst: Host, port: int) -> tuple[str, int]:
        """The address `src` should dial to reach `dst`'s `port` through the shaped link.

        With netem (or no delay) that is dst's own address; with the relay it is a relay
        port on dst, started here on first use (one relay per src, dst, port).
        """
        key = (src.name, dst.name)
        if self._delay_by.get(key) != "relay":
            return (dst.ip, port)
        relay = self._relays.get((src.name, dst.name, port))
        if relay is None:
            relay = self._start_relay(dst, port, self._shapes[key].delay_ms)
            self._relays[(src.name, dst.name, port)] = relay
        return (dst.ip, relay.port)

    def _start_relay(self, dst: Host, port: int, delay_ms: float) -> _Relay:
        argv = [sys.executable, "-m", "meshci.testbed.relay", "--listen", f"{dst.ip}:0",
                "--target", f"{dst.ip}:{port}", "--delay-ms", str(delay_ms)]  # fmt: skip
        proc = self.net.popen(dst, argv, stdout=subprocess.PIPE)
        line = commands.read_line(proc.stdout, 10.0)
        words = line.split()
        if len(words) != 2 or words[0] != b"ready":
            raise TestbedError(f"delay relay in {dst.name} did not start (said {line!r})")
        return _Relay(process=proc, port=int(words[1]))

    def relay_processes(self) -> list[subprocess.Popen[bytes]]:
        """The delay relays running now (one per src, dst, port that was dialled through a relay)."""
        return [relay.process for relay in self._relays.values()]

    def report(self, src: Host, dst: Host) -> ShapingReport:
        """What shapes the direction src->dst now."""
        shape = self._shapes.get((src.name, dst.name))
        if shape is None:
            return ShapingReport(rate=None, delay=None, loss=None)
        return ShapingReport(
            rate="htb" if shape.rate_mbit is not None else None,
            delay=self._delay_by[(src.name, dst.name)],  # type: ignore[arg-type]
            loss=self._loss_by[(src.name, dst.name)],  # type: ignore[arg-type]
        )

    # ---- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the relays and remove the qdiscs this shaper added. Idempotent."""
        for relay in self._relays.values():
            stop_process(relay.process)
        self._relays.clear()
        # a namespace may already be gone with the topology: nothing left to remove there then
        by_name = {host.netns: host for host in self.net.hosts}
        roots = [(netns, by_name[netns].ifname) for netns in self._classes]
        roots += [(self.net.bridge_netns, port) for port in self._loss_ports]
        for netns, dev in roots:
            commands.run(["ip", "netns", "exec", netns, commands.tool("tc"), "qdisc", "del", "dev", dev, "root"],
                         check=False)  # fmt: skip
        self._loss_ports.clear()
        for host in self._gso_limited:
            # back to the kernel's default; the namespace may already be gone with the topology
            commands.run(["ip", "-n", host.netns, "link", "set", host.ifname, "gso_max_segs", str(GSO_MAX_SEGS)],
                         check=False)  # fmt: skip
        self._gso_limited.clear()
        self._classes.clear()
        self._shapes.clear()
        self._delay_by.clear()
        self._loss_by.clear()
