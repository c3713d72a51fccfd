"""What the kernel checks of a packet at an SPA port before it may reach the queue. Pure: no I/O.

Every packet the queue takes costs the daemon a parse and, for each key of the door, an HMAC;
a flood of junk at the SPA port used to crowd the real packet out of the queue. fwknop's wire
format fixes enough for the kernel to shed nearly all junk with one xt_u32 match (both iptables
flavours have it; the nft backend writes the same rules through iptables-nft):

- the payload is 140..1500 bytes: what fwknopd itself reads (MIN_SPA_DATA_SIZE,
  MAX_SPA_PACKET_LEN in fwknop's server/fwknopd_common.h). The shortest packet nfknock can accept
  is longer: Rijndael needs at least 32 ciphertext bytes (118 base64 characters without the
  stripped prefix) and an HMAC of 27 (SHA-1) to 86 (SHA-512) characters;
- it is base64 (the ciphertext and the HMAC tag, no padding): the kernel tests the alphabet at a
  few positions spread over the first 140 bytes; a random byte passes one such test 1 time in 4;
- its first character is one of `8 9 + /`. fwknop strips "U2FsdGVkX1" (base64 of "Salted__"
  up to the middle of its second-to-last '_'); the next character carries the last four bits
  of '_' (1111) and two bits of the random salt, so it is always one of those four. A GPG-mode
  packet ("hQ" stripped) starts with any character: nfknock cannot use one (it takes Rijndael
  keys only, and `import-fwknop` says so of a GPG stanza), so the kernel drops it with the junk.

A random-byte packet of an SPA packet's length passes 1 time in 64 * 4**7 (one in a
million); base64 junk 1 time in 16 (the first character); well-formed junk (a real packet made with a key
the door does not have) always passes: that is the daemon's part (doors/spa.py checks the shape
again, then one precomputed HMAC per key).

Offsets: xt_u32 reads big-endian words from the start of the network header and refuses (no
match) to read past the packet's end. IPv4 headers have options (`0>>22&0x3c@` jumps over IHL);
an IPv6 packet is read with a fixed 40-byte header: one with extension headers does not match
and is dropped (no fwknop client sends one; a reassembled fragment has lost its header).
For TCP (`fwknop -P tcpraw`) the payload starts after the TCP data offset; the kernel cannot
subtract one length from another, so the minimum is enforced by reading the word at byte 136 of
the payload and the maximum is the link's. Expressions are written the way iptables prints
them back, so the installed rules compare equal to the plan's.
"""

from __future__ import annotations

SPA_MIN_PAYLOAD = 140  # fwknopd's MIN_SPA_DATA_SIZE
SPA_MAX_PAYLOAD = 1500  # fwknopd's MAX_SPA_PACKET_LEN
UDP_HEADER = 8
IPV6_HEADER = 40

# The base64 alphabet as ranges of byte values: + / 0-9 A-Z a-z ('/' and the digits touch).
BASE64 = ((0x2B, 0x2B), (0x2F, 0x39), (0x41, 0x5A), (0x61, 0x7A))
# The first character of a Rijndael packet without fwknop's stripped "U2FsdGVkX1": + / 8 9.
RIJNDAEL_FIRST = ((0x2B, 0x2B), (0x2F, 0x2F), (0x38, 0x39))
RIJNDAEL_FIRST_CHARS = b"+/89"
# Where else the alphabet is tested: spread over the first SPA_MIN_PAYLOAD bytes (a word read at
# 136 is the last that a payload of 140 bytes holds). xt_u32 takes at most 10 tests (iptables:
# 'too many "&&"s'): 1 for the length, 1 for the first character, 7 here, and 1 left for the
# worker's shard (shards.py).
ALPHABET_AT = (1, 23, 45, 67, 89, 111, 136)
MAX_U32_TESTS = 10


def _values(ranges: tuple[tuple[int, int], ...]) -> str:
    return ",".join(f"{lo:#x}" if lo == hi else f"{lo:#x}:{hi:#x}" for lo, hi in ranges)


def _payload_start(proto: str, family: int) -> tuple[str, int]:
    """(location prefix, offset to add) that make `prefix + hex(offset + k)` read the word at
    payload byte k."""
    if family == 4:
        if proto == "udp":
            return "0x0>>0x16&0x3c@", UDP_HEADER
        return "0x0>>0x16&0x3c@0xc>>0x1a&0x3c@", 0
    if family == 6:
        if proto == "udp":
            return "", IPV6_HEADER + UDP_HEADER
        # The data offset of the TCP header at 40 moves the base to doff*4; the 40 are added back.
        return f"{IPV6_HEADER + 12:#x}>>0x1a&0x3c@", IPV6_HEADER
    raise ValueError(f"no IPv{family}")


def spa_shape(proto: str, family: int) -> str:
    """The xt_u32 expression that is true for a packet that can be an fwknop Rijndael SPA
    packet at a `proto` port (see the module's docstring), in iptables' printed form."""
    if proto not in ("udp", "tcp"):
        raise ValueError(f"SPA over {proto!r}: only udp and tcp")
    prefix, offset = _payload_start(proto, family)
    tests = []
    if proto == "udp":
        # The UDP length field (payload + 8) is the high half of the header's second word.
        at = "0x0>>0x16&0x3c@0x4" if family == 4 else f"{IPV6_HEADER + 4:#x}"
        tests.append(f"{at}>>0x10={UDP_HEADER + SPA_MIN_PAYLOAD:#x}:{UDP_HEADER + SPA_MAX_PAYLOAD:#x}")
    tests.append(f"{prefix}{offset:#x}>>0x18={_values(RIJNDAEL_FIRST)}")
    tests += [f"{prefix}{offset + k:#x}>>0x18={_values(BASE64)}" for k in ALPHABET_AT]
    return "&&".join(tests)


def joined(*expressions: str | None) -> str | None:
    """Several xt_u32 expressions as one (all must hold), as iptables prints it; None for none.
    ValueError beyond what one xt_u32 match takes."""
    parts = [e for e in expressions if e]
    if sum(part.count("&&") + 1 for part in parts) > MAX_U32_TESTS:
        raise ValueError(f"more than {MAX_U32_TESTS} xt_u32 tests in one rule")
    return "&&".join(parts) or None
