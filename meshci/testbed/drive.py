"""Requests from inside a device of the emulated cluster, in one process (no start-up per request).

    python -m meshci.testbed.drive --secret-file S --via rpi4-a.tb.tb:7100 --model vgg16 \\
        --strategy edgeci --strategy modnn --size 64 64 --repeat 3 --check

Prints one JSON line per request: the node's answer (`meshci infer --json`: latency, plan,
per-device shares, exactness when checked) plus ``client_s``, the latency measured here.
`tools/testbed exec` and the tests run it inside a device's namespace, where the nodes'
names resolve (the root namespace cannot reach the bridge).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence


async def _drive(args: argparse.Namespace) -> int:
    from meshci.node.client import collect_trace, infer, stats
    from meshci.node.membership import Address
    from meshci.wire import load_secret

    secret = load_secret(args.secret_file)
    failures = 0
    if args.stats:
        for via in args.via:
            print(json.dumps({"via": via, "stats": await stats(Address.parse(via), secret=secret)}), flush=True)
        return 0
    for run in range(args.repeat):
        for via in args.via:
            for model in args.model:
                for strategy in args.strategy:
                    began = time.perf_counter()
                    try:
                        meta, _ = await infer(Address.parse(via), model=model, strategy=strategy,
                                              size=(args.size[0], args.size[1]), secret=secret,
                                              input_seed=args.seed, check=args.check, timeout=args.timeout)
                    except Exception as exc:  # noqa: BLE001 - one failed request is reported, the rest still run
                        failures += 1
                        meta = {"error": f"{type(exc).__name__}: {exc}"}
                    meta.update(via=via, model=model, strategy=strategy, run=run,
                                client_s=time.perf_counter() - began)
                    if args.trace and "error" not in meta:
                        # the last request's timeline (each device's spans, clocks aligned)
                        trace = await collect_trace(Address.parse(via), meta, secret=secret)
                        with open(args.trace, "w") as f:
                            json.dump(trace, f)
                    print(json.dumps(meta), flush=True)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshci.testbed.drive", description=__doc__.splitlines()[0])
    parser.add_argument("--secret-file", required=True)
    parser.add_argument("--via", action="append", required=True, help="node HOST:PORT (repeatable)")
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--strategy", action="append", default=[])
    parser.add_argument("--size", type=int, nargs=2, default=(64, 64))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--stats", action="store_true", help="print each --via node's stats instead")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--trace", help="write the last request's timeline here (Chrome trace-event JSON)")
    args = parser.parse_args(argv)
    return asyncio.run(_drive(args))


if __name__ == "__main__":
    sys.exit(main())
