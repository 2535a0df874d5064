"""`tools/testbed`: an emulated edge cluster on this machine (see `meshci.testbed.bed`).

    tools/testbed up --cluster FILE [--name N]     build it, start a node per device, wait for the mesh
    tools/testbed status [--json]                  devices, addresses, quotas, shaping and its mechanisms
    tools/testbed exec DEVICE -- COMMAND...        run a command inside a device (its network, its names)
    tools/testbed quota DEVICE CPUS                change a running device's CPU quota
    tools/testbed down                             remove everything, also after a crash or Ctrl-C
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from meshci.errors import MeshciError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/testbed", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--name", default="tb", help="testbed name: 1-6 lowercase letters or digits (default tb)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="build the cluster and start its nodes")
    p.add_argument("--cluster", required=True, help="cluster file (or a shipped example's name, e.g. mixed-4)")
    p.add_argument("--data-dir", type=Path, help="the nodes' profile cache (default ~/.cache/meshci)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds for the nodes to start and meet")
    p.add_argument("--no-delay", action="store_true", help="leave out the delay relays (rate and loss only)")
    p = sub.add_parser("status", help="what is up, and how it is shaped")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("exec", help="run a command inside a device's namespace")
    p.add_argument("device")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND...")
    p = sub.add_parser("quota", help="change a running device's CPU quota")
    p.add_argument("device")
    p.add_argument("cpus", type=float)
    sub.add_parser("down", help="remove everything the testbed made")
    return parser


def _print_status(info: dict) -> None:
    print(f"testbed {info['name']}: {info['cluster']} ({info['medium']}"
          + (f", one {info['shared_mbps']} Mbit/s channel" if info["shared_mbps"] else "") + ")")
    print(f"  delay: {info['delay'] or 'none'} - {info['delay_note']}")
    print(f"  secret: {info['secret_file']}")
    for d in info["devices"]:
        shaping = d["shaping"]
        procs = ", ".join(f"{role} {'up' if ok else 'DOWN'}" for role, ok in d["processes"].items())
        delays = ", ".join(f"{p} {ms:g} ms" for p, ms in shaping["delays_ms"].items())
        print(f"  {d['name']:12s} {d['netns']:10s} {d['address']:14s} node {d['node']}  cpu {d['cpu']:.3f} "
              f"({d['cpu_max']})  up {shaping['uplink_mbps'] or '-'} / down {shaping['downlink_mbps'] or '-'} Mbit/s "
              f"(htb), delay to it: {delays}; {procs}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from meshci.testbed import bed

    reason = bed.check_root()
    if reason:
        print(f"testbed: {reason}", file=sys.stderr)
        return 2
    try:
        if args.command == "up":
            from meshci.testbed.spec import load_spec

            spec = load_spec(args.cluster, os.cpu_count() or 1)
            print(f"testbed {args.name}: {len(spec.devices)} devices, {spec.total_cpu:.2f} CPUs in all; "
                  "starting nodes (each profiles its speed first)...", file=sys.stderr)
            bed.up(spec, name=args.name, data_dir=args.data_dir, form_timeout_s=args.timeout,
                   delay=not args.no_delay)
            _print_status(bed.status(args.name))
        elif args.command == "status":
            info = bed.status(args.name)
            if args.json:
                print(json.dumps(info, indent=1))
            else:
                _print_status(info)
        elif args.command == "exec":
            command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not command:
                raise MeshciError("exec: give a command after --")
            done = bed.run_in(bed.load_state(args.name), args.device, command, capture=False)
            return done.returncode
        elif args.command == "quota":
            bed.set_cpu(bed.load_state(args.name), args.device, args.cpus)
        else:
            removed = bed.down(args.name)
            print(f"testbed {args.name}: removed {len(removed)} things" if removed else
                  f"testbed {args.name}: nothing to remove")
    except KeyboardInterrupt:
        # Ctrl-C during `up`: `up` already removed what it had made
        print("testbed: interrupted", file=sys.stderr)
        return 130
    except MeshciError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
