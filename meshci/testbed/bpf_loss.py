"""Random packet loss without netem: a classic-BPF classifier (`cls_bpf`, `ld rand`).

The program matches IPv4 packets from one address to another and, with probability
`loss`, classifies them into a class whose only qdisc is `pfifo limit 0`, which drops
everything it is given. It is attached on the bridge's port towards the destination,
so the packet is lost *in the network*: the sender's TCP learns of it the way it would
on a real lossy link (duplicate ACKs, timeouts), not from a local queue drop.

`loss_program()` is pure: it returns the bytecode in the text form `tc ... bpf
bytecode` takes (what `tcpdump -ddd` prints).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# classic BPF opcodes
_LD_H_ABS = 0x28
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGT_K = 0x25
_RET_K = 0x06
# ancillary load: a fresh 32-bit random number (SKF_AD_OFF + SKF_AD_RANDOM)
_SKF_AD_RANDOM = (-0x1000 + 56) & 0xFFFFFFFF
_MATCH = 0xFFFFFFFF  # cls_bpf: -1 selects the filter's own classid
_NO_MATCH = 0
_ETHERTYPE_OFFSET = 12
_IPV4_SRC_OFFSET = 14 + 12  # after the Ethernet header
_IPV4_DST_OFFSET = 14 + 16
_ETHERTYPE_IPV4 = 0x0800


@dataclass(frozen=True)
class Instruction:
    code: int
    jt: int
    jf: int
    k: int

    def text(self) -> str:
        return f"{self.code} {self.jt} {self.jf} {self.k}"


def loss_threshold(loss: float) -> int:
    """A random u32 above this value means 'drop': P(drop) = loss."""
    if not 0.0 <= loss < 1.0:
        raise ValueError(f"loss must be in [0, 1), got {loss}")
    return min(0xFFFFFFFF, round((1.0 - loss) * 2**32) - 1)


def loss_program(src: str, dst: str, loss: float) -> list[Instruction]:
    """Match IPv4 src -> dst, then drop with probability `loss` (on a frame with an Ethernet header)."""
    src_k = int(ipaddress.IPv4Address(src))
    dst_k = int(ipaddress.IPv4Address(dst))
    program = [
        Instruction(_LD_H_ABS, 0, 0, _ETHERTYPE_OFFSET),  # 0
        Instruction(_JEQ_K, 0, 7, _ETHERTYPE_IPV4),  # 1: not IPv4 -> 9
        Instruction(_LD_W_ABS, 0, 0, _IPV4_SRC_OFFSET),  # 2
        Instruction(_JEQ_K, 0, 5, src_k),  # 3: other source -> 9
        Instruction(_LD_W_ABS, 0, 0, _IPV4_DST_OFFSET),  # 4
        Instruction(_JEQ_K, 0, 3, dst_k),  # 5: other destination -> 9
        Instruction(_LD_W_ABS, 0, 0, _SKF_AD_RANDOM),  # 6
        Instruction(_JGT_K, 0, 1, loss_threshold(loss)),  # 7: unlucky -> 8, else 9
        Instruction(_RET_K, 0, 0, _MATCH),  # 8: into the dropping class
        Instruction(_RET_K, 0, 0, _NO_MATCH),  # 9: not ours, or lucky
    ]
    return program


def bytecode(program: list[Instruction]) -> str:
    """The `tc filter ... bpf bytecode '...'` argument."""
    return ",".join([str(len(program)), *(ins.text() for ins in program)])
