"""Which worker process decides a packet, when the daemon runs `--workers N`. Pure: no I/O.

Every packet of one source must reach the same worker, whatever its protocol or ports: the
worker's engine holds that source's knock attempts, grants and lockouts, and a knock on a TCP
port followed by one on a UDP port is one attempt. So the kernel cannot use `--queue-balance`
(it hashes the protocol and ports in), nor HMARK (it overwrites the whole packet mark, whose
bits nfknock uses for the pass mark and the first-step marks). What is left that both iptables
flavours and both families have is xt_u32: the scaffolding's NFQUEUE rules are repeated once per
worker, each testing the last byte of the source address against that worker's range of byte
values and sending to that worker's own pair of queues.

The last byte is what varies among the clients of one network (a /24, a /64 of SLAAC or DHCPv6
hosts), so even a small site spreads over the workers; a flood from random sources spreads
evenly. `shard_of` names the worker that owns a source for what does not come through the
kernel (a control-socket `revoke` or `grant`, for instance): it must name the same worker as the
kernel's rule, which tests/netns/test_shard_rules.py checks on a real kernel.
"""

from __future__ import annotations

import ipaddress

MAX_WORKERS = 16  # each worker is a process and two queues; more would not fit a small host anyway

# Where the last 32-bit word of the source address starts in the network header: xt_u32 reads
# a big-endian word at an offset from the start of the IP header, so `& 0xff` is its last byte.
# IPv4: the source is bytes 12..15. IPv6: the source is bytes 8..23, its last word 20..23.
SOURCE_LAST_WORD = {4: 12, 6: 20}


def _check_workers(workers: int) -> None:
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be 1 to {MAX_WORKERS}; got {workers}")


def byte_ranges(workers: int) -> list[tuple[int, int]]:
    """The last-byte values each worker owns, as inclusive (first, last) ranges that partition
    0..255 in worker order: worker i owns i*256//workers .. (i+1)*256//workers - 1. Contiguous
    ranges, so that each worker's kernel test is a single u32 range, not a list of values."""
    _check_workers(workers)
    return [(i * 256 // workers, (i + 1) * 256 // workers - 1) for i in range(workers)]


def shard_of(address: str, workers: int) -> int:
    """The worker that owns an IPv4 or IPv6 address (text form): the one whose range holds the
    address's last byte, as the kernel's u32 rule sees it. (The largest i with
    i*256//workers <= byte is ((byte+1)*workers - 1)//256: O(1) per call.)"""
    _check_workers(workers)
    last = ipaddress.ip_address(address).packed[-1]
    return ((last + 1) * workers - 1) // 256


def queues(base: int, shard: int) -> tuple[int, int]:
    """(main queue, grant queue) of worker `shard`, for a daemon whose --queue-num is `base`.
    Pairs follow each other, so worker 0 keeps the queues a single-process daemon uses (base
    and base + 1) and a daemon with N workers uses base .. base + 2N - 1."""
    if shard < 0:
        raise ValueError(f"no worker {shard}")
    return base + 2 * shard, base + 2 * shard + 1


def u32_match(family: int, lo: int, hi: int) -> str:
    """The xt_u32 expression that is true when the last byte of the source address is in lo..hi.

    Written the way iptables prints it back (`iptables -S`, iptables-save, python-iptables all
    give `0xc&0xff=0x0:0x7f` for `12&0xFF=0:127`), so the installed rules compare equal to the
    plan's; a single value has no `:hi`, as iptables prints it."""
    if family not in SOURCE_LAST_WORD:
        raise ValueError(f"no IPv{family}")
    if not 0 <= lo <= hi <= 255:
        raise ValueError(f"not a range of byte values: {lo}..{hi}")
    values = f"{lo:#x}" if lo == hi else f"{lo:#x}:{hi:#x}"
    return f"{SOURCE_LAST_WORD[family]:#x}&0xff={values}"
