"""Which worker owns a source: byte ranges, queues and the kernel's u32 test, as data."""

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nfknock.firewall.shards import MAX_WORKERS, byte_ranges, queues, shard_of, u32_match


@pytest.mark.parametrize("workers", range(1, MAX_WORKERS + 1))
def test_byte_ranges_partition_every_byte_value_in_worker_order(workers):
    ranges = byte_ranges(workers)
    assert len(ranges) == workers
    covered = [value for first, last in ranges for value in range(first, last + 1)]
    assert covered == list(range(256))  # each value once, and worker i's before worker i+1's
    sizes = {last - first + 1 for first, last in ranges}
    assert max(sizes) - min(sizes) <= 1  # as even as 256 values allow


def test_byte_ranges_of_one_two_and_three_workers():
    assert byte_ranges(1) == [(0, 255)]
    assert byte_ranges(2) == [(0, 127), (128, 255)]
    assert byte_ranges(3) == [(0, 84), (85, 169), (170, 255)]


@pytest.mark.parametrize("workers", [0, -1, MAX_WORKERS + 1, 256])
def test_a_number_of_workers_out_of_range_is_refused(workers):
    with pytest.raises(ValueError, match=f"workers must be 1 to {MAX_WORKERS}"):
        byte_ranges(workers)
    with pytest.raises(ValueError, match=f"workers must be 1 to {MAX_WORKERS}"):
        shard_of("10.0.0.1", workers)


def test_worker_zero_keeps_the_single_process_queues_and_pairs_follow():
    assert queues(7, 0) == (7, 8)
    assert queues(60, 1) == (62, 63)
    assert queues(60, 15) == (90, 91)
    with pytest.raises(ValueError):
        queues(60, -1)


def test_u32_expressions_are_written_as_iptables_prints_them():
    # What `iptables -S` / iptables-save / python-iptables give back for "12&0xFF=0:127" etc.
    assert u32_match(4, 0, 127) == "0xc&0xff=0x0:0x7f"
    assert u32_match(4, 128, 255) == "0xc&0xff=0x80:0xff"
    assert u32_match(6, 0, 127) == "0x14&0xff=0x0:0x7f"
    assert u32_match(6, 5, 5) == "0x14&0xff=0x5"  # a single value has no ":last"
    for bad in [(5, 0, 1), (4, 2, 1), (4, -1, 3), (6, 0, 256)]:
        with pytest.raises(ValueError):
            u32_match(*bad)


def test_shard_of_reads_the_last_byte_of_either_family():
    assert shard_of("10.199.1.2", 2) == 0
    assert shard_of("10.199.1.127", 2) == 0
    assert shard_of("10.199.2.128", 2) == 1
    assert shard_of("fd00:199:1::7f", 2) == 0
    assert shard_of("fd00:199:2::80", 2) == 1
    assert shard_of("::ffff:10.0.0.255", 16) == 15
    assert shard_of("10.0.0.255", 1) == 0


def header(address: str) -> bytes:
    """An IP header from `address`, zeros elsewhere: the source is at bytes 12..15 (IPv4) or
    8..23 (IPv6)."""
    packed = ipaddress.ip_address(address).packed
    return bytes(12) + packed + bytes(4) if len(packed) == 4 else bytes(8) + packed + bytes(16)


def u32_matches(expression: str, packet: bytes) -> bool:
    """What the kernel's xt_u32 computes for one `OFFSET&MASK=FIRST[:LAST]` test: the 32-bit
    big-endian word at OFFSET from the start of the IP header, masked, within FIRST..LAST."""
    offset, mask, first, last = re.fullmatch(r"(\w+)&(\w+)=(\w+)(?::(\w+))?", expression).groups()
    word = int.from_bytes(packet[int(offset, 0) : int(offset, 0) + 4], "big")
    return int(first, 0) <= word & int(mask, 0) <= int(last or first, 0)


addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n))),
    st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))),
)


@given(addresses, st.integers(1, MAX_WORKERS))
def test_shard_of_names_the_worker_whose_u32_range_holds_the_address(address, workers):
    family = 6 if ":" in address else 4
    ranges = byte_ranges(workers)
    owners = [
        i for i, (first, last) in enumerate(ranges) if u32_matches(u32_match(family, first, last), header(address))
    ]
    assert owners == [shard_of(address, workers)]
