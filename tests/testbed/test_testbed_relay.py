"""The delay relay: its pure delay line, and the asyncio relay on loopback (no root needed)."""

from __future__ import annotations

import asyncio
import time

from hypothesis import given
from hypothesis import strategies as st

from meshci.testbed.relay import DelayLine, RelayConfig, run_relay


def test_delay_line_releases_chunks_in_order_after_the_delay() -> None:
    line = DelayLine(delay_s=0.5)
    line.push(b"ab", now=10.0)
    line.push(b"", now=10.1)  # empty reads are not data
    line.push(b"cde", now=10.2)
    assert line.buffered == 5 and line.next_due() == 10.5
    assert line.pop_due(10.49) == []
    assert line.pop_due(10.5) == [b"ab"]
    assert line.next_due() == 10.7 and line.buffered == 3
    assert line.pop_due(11.0) == [b"cde"]
    assert line.next_due() is None and line.buffered == 0


@given(
    st.lists(st.tuples(st.binary(min_size=1, max_size=20), st.floats(0, 5)), max_size=30),
    st.floats(0.001, 2),
)
def test_delay_line_keeps_every_byte_and_never_releases_early(pushes: list[tuple[bytes, float]], delay: float) -> None:
    line = DelayLine(delay_s=delay)
    pushed_at: list[tuple[float, bytes]] = []
    released: list[tuple[float, bytes]] = []
    now = 0.0
    for data, step in pushes:
        now += step
        line.push(data, now)
        pushed_at.append((now, data))
        released += [(now, chunk) for chunk in line.pop_due(now)]
    released += [(now + delay, chunk) for chunk in line.pop_due(now + delay)]
    assert [chunk for _, chunk in released] == [data for data, _ in pushes]
    for (t_in, _), (t_out, _) in zip(pushed_at, released):
        assert t_out >= t_in + delay
    assert line.buffered == 0


async def test_relay_adds_its_delay_each_way_on_loopback() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    target_port = target.sockets[0].getsockname()[1]
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    relay = asyncio.ensure_future(run_relay(RelayConfig("127.0.0.1", 0, "127.0.0.1", target_port, 20.0), ready))
    try:
        port = await asyncio.wait_for(ready, 5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = bytes(range(256)) * 400  # 100 KB, several reads
        start = time.perf_counter()
        writer.write(payload)
        await writer.drain()
        echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
        elapsed = time.perf_counter() - start
        assert echoed == payload
        assert elapsed >= 0.040  # it cannot come back before 20 ms there and 20 ms back
        writer.close()
    finally:
        relay.cancel()
        target.close()
