"""The classic-BPF loss program, run through a small interpreter (no root needed)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshci.testbed.bpf_loss import Instruction, bytecode, loss_program, loss_threshold

LD_H, LD_W, JEQ, JGT, RET = 0x28, 0x20, 0x15, 0x25, 0x06
RANDOM = (-0x1000 + 56) & 0xFFFFFFFF
MATCH = 0xFFFFFFFF


def run(program: list[Instruction], frame: bytes, random_u32: int) -> int:
    """What the kernel returns for `frame`, for the opcodes the loss program uses."""
    acc, pc = 0, 0
    while True:
        ins = program[pc]
        if ins.code == RET:
            return ins.k
        if ins.code in (LD_H, LD_W):
            size = 2 if ins.code == LD_H else 4
            if ins.k == RANDOM:
                acc = random_u32
            elif ins.k + size > len(frame):
                return 0  # the kernel ends the program on a load past the end
            else:
                acc = int.from_bytes(frame[ins.k : ins.k + size], "big")
            pc += 1
        elif ins.code in (JEQ, JGT):
            taken = acc == ins.k if ins.code == JEQ else acc > ins.k
            pc += 1 + (ins.jt if taken else ins.jf)
        else:
            raise AssertionError(f"unexpected opcode {ins.code:#x}")


def frame(src: str, dst: str, ethertype: int = 0x0800) -> bytes:
    ethernet = bytes(12) + struct.pack("!H", ethertype)
    ip = bytes(12) + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
    return ethernet + ip + bytes(20)


def test_drops_only_the_unlucky_packets_of_its_own_pair() -> None:
    program = loss_program("10.213.0.1", "10.213.0.2", 0.25)
    threshold = loss_threshold(0.25)
    mine = frame("10.213.0.1", "10.213.0.2")
    assert run(program, mine, threshold + 1) == MATCH
    assert run(program, mine, threshold) == 0
    assert run(program, frame("10.213.0.3", "10.213.0.2"), 0xFFFFFFFF) == 0  # other source
    assert run(program, frame("10.213.0.1", "10.213.0.3"), 0xFFFFFFFF) == 0  # other destination
    assert run(program, frame("10.213.0.1", "10.213.0.2", ethertype=0x0806), 0xFFFFFFFF) == 0  # ARP
    assert run(program, mine[:20], 0xFFFFFFFF) == 0  # runt frame


@given(st.floats(0.0, 0.99))
def test_threshold_gives_the_requested_probability(loss: float) -> None:
    threshold = loss_threshold(loss)
    dropped_share = (0xFFFFFFFF - threshold) / 2**32
    assert dropped_share == pytest.approx(loss, abs=1e-9)


def test_bytecode_is_in_tc_form() -> None:
    text = bytecode(loss_program("10.0.0.1", "10.0.0.2", 0.1))
    count, *rows = text.split(",")
    assert int(count) == len(rows) == 10
    assert all(len(row.split()) == 4 for row in rows)
    with pytest.raises(ValueError):
        loss_threshold(1.0)
