"""Single Packet Authorization, wire-compatible with fwknop 2.x (Rijndael + HMAC mode). Pure:
bytes, keys and `now` in; a request or an SpaError naming the reason out.

The wire format, as fwknop's client sends it:

    wire   = b64(ciphertext) without '=' and without the constant "U2FsdGVkX1" ("Salted__")
             followed directly by b64(HMAC) without '='
    HMAC   = HMAC-<digest>(hmac_key, "U2FsdGVkX1" + b64(ciphertext))     (SHA-256 by default)
    cipher = "Salted__" + salt(8) + AES-256-CBC(PKCS#7), key and IV from OpenSSL's
             EVP_BytesToKey(MD5, 1 round) over the encryption key and the salt
    plain  = rand16:b64(user):timestamp:version:type:b64(access)[:b64(nat)][:client_timeout]:b64(SHA-256 digest)
    access = "IP,proto/port[,proto/port...]"

The HMAC is checked (in constant time) before anything is decrypted, and before any HMAC what
needs no key: the text's alphabet, the ciphertext's length and first character, the tag's
spelling (`Shape`, once per packet for all the keys of a door); each key then costs one HMAC of
the packet, copied from a state with the key's pads already hashed (the per-packet cost of a
door with many keys). Every primitive comes from `cryptography`; this module only arranges fields.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from cryptography.hazmat.primitives import hashes, hmac, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..errors import SpaError

SALTED_B64 = "U2FsdGVkX1"  # base64 of "Salted__": fwknop strips it from the wire
# fwknop strips "hQ" (the base64 start of an OpenPGP packet) from GPG-mode packets and puts it
# back under the HMAC. Such packets are long (an RSA-encrypted session key alone is 140+ bytes):
# only those are worth the second HMAC that tells a GPG packet from a forged one.
GPG_B64 = "hQ"
GPG_MIN_LENGTH = 500
HMAC_DIGESTS: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
# The inner digest's type is told by the length of its unpadded base64.
INNER_DIGESTS: dict[int, Callable[[], hashes.HashAlgorithm]] = {
    22: hashes.MD5,
    27: hashes.SHA1,
    43: hashes.SHA256,
    64: hashes.SHA384,
    86: hashes.SHA512,
}
ACCESS, ACCESS_WITH_TIMEOUT = 1, 3
NAT_ACCESS, NAT_ACCESS_WITH_TIMEOUT = 2, 4  # fwknop -N host:port: b64("host,port") after the access field
MESSAGE_TYPES = {
    0: "command",
    1: "access",
    2: "NAT access",
    3: "access with timeout",
    4: "NAT access with timeout",
    5: "local NAT access",
    6: "local NAT access with timeout",
}
VERSION = "3.0.0"


@dataclass(frozen=True)
class Keys:
    """A key pair. Its repr (and so a DoorKey's, a door's keyring's) never shows the keys: a
    repr ends up in exception messages and debug lines."""

    encryption: bytes = field(repr=False)
    hmac: bytes = field(repr=False)
    digest: str = "sha256"


@dataclass(frozen=True)
class SpaRequest:
    """A packet that passed the HMAC, decrypted and parsed; policy is the caller's."""

    random: str
    user: str
    timestamp: int
    version: str
    message_type: int
    address: str  # the address inside the packet
    ports: tuple[tuple[str, int], ...]  # (proto, port) requested
    client_timeout: int | None
    digest: str  # the inner digest, base64
    nat: tuple[str, int] | None = None  # a NAT access message's destination (fwknop -N host:port)


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _evp_bytes_to_key(password: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """OpenSSL's EVP_BytesToKey with MD5 and one round: 32 key bytes, then 16 IV bytes."""
    material, block = b"", b""
    while len(material) < 48:
        md5 = hashes.Hash(hashes.MD5())
        md5.update(block + password + salt)
        block = md5.finalize()
        material += block
    return material[:32], material[32:48]


def _hmac(keys: Keys) -> hmac.HMAC:
    try:
        return hmac.HMAC(keys.hmac, HMAC_DIGESTS[keys.digest]())
    except KeyError:
        raise SpaError("config", f"unknown HMAC digest {keys.digest!r}") from None


def decode(wire: bytes, keys: Keys) -> SpaRequest:
    """Authenticate, decrypt and parse one SPA datagram. Time and policy checks are the caller's."""
    return decrypt(authenticate(wire, keys), keys)


def authenticate(wire: bytes, keys: Keys) -> str:
    """The HMAC-authenticated part of a datagram (its base64 ciphertext), or SpaError.

    Everything that passes here must be remembered by the replay cache, whatever is refused
    after it; `packet_id` names it. The tag is not part of the identity: it is checked in the
    one spelling fwknop writes (fwknopd compares the base64 text), the authenticated text is
    the identity.
    """
    shape = Shape(wire_text(wire))
    shape.check_length((keys.digest,))
    data = shape.verified(keys)
    if data is not None:
        return data
    if shape.is_gpg(keys):
        raise gpg_error()
    raise SpaError("bad hmac", "HMAC does not match (wrong HMAC key or digest, or a forged packet)")


def wire_text(wire: bytes) -> str:
    """A datagram's text; SpaError("malformed") for what no key can make."""
    try:
        text = wire.decode("ascii").strip()
    except UnicodeDecodeError:
        raise SpaError("malformed", "not ASCII") from None
    if text.startswith(SALTED_B64):
        raise SpaError("malformed", "starts with the 'Salted__' prefix fwknop never sends")
    return text


def gpg_error() -> SpaError:
    return SpaError(
        "gpg",
        "a GPG-encrypted packet (fwknop --gpg-recipient): nfknock takes Rijndael keys only "
        "(fwknop --key-gen, nfknock keygen)",
    )


def _tag_length(digest: str) -> int:
    try:
        return TAG_LENGTHS[digest]
    except KeyError:
        raise SpaError("config", f"unknown HMAC digest {digest!r}") from None


TAG_LENGTHS = {name: len(_b64encode(bytes(make().digest_size))) for name, make in HMAC_DIGESTS.items()}
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# fwknop strips "U2FsdGVkX1" (10 of the 11 characters that carry "Salted__"); the character after
# it holds the last 4 bits of "_" (1111) and 2 bits of the salt: one of these four, always.
RIJNDAEL_FIRST = frozenset("89+/")
# Unpadded base64 of "Salted__" + salt + n AES blocks (16 + 16n bytes) is 0, 22 or 43 characters
# long modulo 64, and at least 43 long (one block).
_CIPHERTEXT_LENGTHS = frozenset({0, 22, 43})
_MIN_CIPHERTEXT = 43
_PADDING = {0: "", 2: "==", 3: "="}


def _tag_ends(size: int) -> frozenset[str]:
    """The characters the unpadded base64 of `size` bytes can end with: those whose unused low
    bits are zero (2 spare bits: 16 of them; 4 spare bits: 4; none spare: all 64)."""
    spare = {0: 0, 1: 4, 2: 2}[size % 3]
    return frozenset(_ALPHABET[i : i + 1].decode() for i in range(64) if not i & ((1 << spare) - 1))


_TAG_ENDS = {name: _tag_ends(make().digest_size) for name, make in HMAC_DIGESTS.items()}


@lru_cache(maxsize=4096)
def _mac_state(key: bytes, digest: str) -> hmac.HMAC:
    """The key's HMAC with its inner and outer pads already hashed: each packet copies it and
    hashes only its own text. Cached by value: a reload that keeps a key keeps its state; at
    most 4096 keys' states (a few hundred bytes each) stay."""
    return hmac.HMAC(key, HMAC_DIGESTS[digest]())


def _mac_of(keys: Keys, message: bytes) -> bytes:
    mac = _mac_state(keys.hmac, keys.digest).copy()
    mac.update(message)
    return mac.finalize()


class Shape:
    """One datagram's text, checked once for all the keys of a door: the checks that need no key
    (alphabet, the ciphertext's length and first character, the tag's spelling) run once per
    HMAC digest, and each key then costs one HMAC of the text from a precomputed state. A packet
    that fails a shape check cannot carry a valid HMAC: no key is tried on it."""

    __slots__ = ("text", "base64", "_splits")

    def __init__(self, text: str):
        self.text = text
        self.base64 = not text.encode().translate(None, _ALPHABET)
        self._splits: dict[str, tuple[str, bytes, bytes] | None] = {}

    def check_length(self, digests) -> None:
        """SpaError("malformed") when the text is too short to hold a tag of any of `digests`
        and some ciphertext."""
        if all(len(self.text) <= _tag_length(digest) + 16 for digest in digests):
            raise SpaError("malformed", f"too short ({len(self.text)} characters)")

    def split(self, digest: str) -> tuple[str, bytes, bytes] | None:
        """(base64 ciphertext, the text its HMAC covers, the tag's bytes) for an HMAC of
        `digest`, or None when the text cannot be a Rijndael packet with such a tag."""
        found = self._splits.get(digest, self)
        if found is not self:
            return found  # type: ignore[return-value]
        found = None
        length = _tag_length(digest)
        text = self.text
        data = text[:-length]
        stripped = len(data) + len(SALTED_B64)
        if (
            self.base64
            and text[-1] in _TAG_ENDS[digest]  # the one spelling fwknop writes (no stray low bits)
            and data[:1] in RIJNDAEL_FIRST
            and stripped >= _MIN_CIPHERTEXT
            and stripped % 64 in _CIPHERTEXT_LENGTHS
        ):
            tag = text[-length:]
            found = (data, (SALTED_B64 + data).encode(), binascii.a2b_base64(tag + _PADDING[length % 4]))
        self._splits[digest] = found
        return found

    def verified(self, keys: Keys) -> str | None:
        """The ciphertext if the packet carries the HMAC of `keys`; None otherwise."""
        found = self.split(keys.digest)
        if found is None:
            return None
        data, message, tag = found
        return data if secrets.compare_digest(_mac_of(keys, message), tag) else None

    def is_gpg(self, keys: Keys) -> bool:
        """Whether the packet is a long GPG-mode packet with the HMAC of `keys` (fwknop strips
        "hQ" and HMACs it back on): worth its own refusal, and a second HMAC, only when long."""
        length = _tag_length(keys.digest)
        data, tag = self.text[:-length], self.text[-length:]
        if len(data) < GPG_MIN_LENGTH or not self.base64:
            return False
        try:
            raw = _b64decode(tag)
        except (binascii.Error, ValueError):
            return False
        return secrets.compare_digest(_mac_of(keys, (GPG_B64 + data).encode()), raw)


def packet_id(data: str) -> str:
    """A stable identity of an authenticated packet, for the replay cache."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data.encode())
    return "spa:" + digest.finalize().hex()


def decrypt(data: str, keys: Keys) -> SpaRequest:
    """Decrypt and parse the authenticated part of a datagram."""
    try:
        raw = _b64decode(SALTED_B64 + data)
    except (binascii.Error, ValueError):
        raise SpaError("malformed", "ciphertext is not base64") from None
    if len(raw) < 32 or raw[:8] != b"Salted__" or (len(raw) - 16) % 16:
        raise SpaError("malformed", "ciphertext has the wrong shape")
    key, iv = _evp_bytes_to_key(keys.encryption, raw[8:16])
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        plain = unpadder.update(decryptor.update(raw[16:]) + decryptor.finalize()) + unpadder.finalize()
        return _parse(plain.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        # A valid HMAC with undecryptable content: the encryption key differs from the sender's.
        raise SpaError("bad key", "decryption failed (wrong encryption key)") from None


def _parse(plain: str) -> SpaRequest:
    body, _, digest = plain.rpartition(":")
    digest_type = INNER_DIGESTS.get(len(digest))
    if not body or digest_type is None:
        raise SpaError("malformed", "no inner digest")
    inner = hashes.Hash(digest_type())
    inner.update(body.encode())
    if not secrets.compare_digest(_b64encode(inner.finalize()), digest):
        raise SpaError("malformed", "inner digest does not match")
    fields = body.split(":")
    if len(fields) < 6:
        raise SpaError("malformed", f"{len(fields)} fields, expected at least 6")
    random, user, timestamp, version, type_text, access = fields[:6]
    try:
        message_type = int(type_text)
        timestamp_value = int(timestamp)
        access_text = _b64decode(access).decode("ascii")
        user_text = _b64decode(user).decode("utf-8", "replace")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise SpaError("malformed", "unreadable fields") from None
    if message_type not in (ACCESS, ACCESS_WITH_TIMEOUT, NAT_ACCESS, NAT_ACCESS_WITH_TIMEOUT):
        kind = MESSAGE_TYPES.get(message_type, f"type {message_type}")
        raise SpaError("refused type", f"{kind} messages are not accepted (access and NAT access messages only)")
    rest = fields[6:]
    nat = None
    if message_type in (NAT_ACCESS, NAT_ACCESS_WITH_TIMEOUT):
        nat = _nat_access(rest[0] if rest else "")
        rest = rest[1:]
    client_timeout = None
    if message_type in (ACCESS_WITH_TIMEOUT, NAT_ACCESS_WITH_TIMEOUT):
        try:
            client_timeout = int(rest[0])
        except (IndexError, ValueError):
            raise SpaError("malformed", "access-with-timeout message without a timeout") from None
    address, _, port_list = access_text.partition(",")
    ports = []
    for item in port_list.split(","):
        proto, _, port = item.partition("/")
        if proto not in ("tcp", "udp") or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise SpaError("malformed", f"bad port request {item!r}")
        ports.append((proto, int(port)))
    return SpaRequest(
        random, user_text, timestamp_value, version, message_type, address, tuple(ports), client_timeout, digest, nat
    )


def _nat_access(field_text: str) -> tuple[str, int]:
    """A NAT access message's destination: b64("host,port") as fwknop's `-N host:port` writes it."""
    try:
        text = _b64decode(field_text).decode("ascii")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise SpaError("malformed", "unreadable NAT access field") from None
    host, _, port = text.rpartition(",")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535 or len(host) > 255:
        raise SpaError("malformed", f"bad NAT access request {text[:80]!r}")
    return host, int(port)


def encode(
    keys: Keys,
    address: str,
    ports: list[tuple[str, int]],
    now: float,
    user: str = "nfknock",
    client_timeout: int | None = None,
    nat: tuple[str, int] | None = None,
) -> bytes:
    """Build a datagram that fwknopd (and nfknock) accept; `nat`: a NAT access message's
    destination (host, port), as fwknop -N sends it."""
    if nat is None:
        message_type = ACCESS if client_timeout is None else ACCESS_WITH_TIMEOUT
    else:
        message_type = NAT_ACCESS if client_timeout is None else NAT_ACCESS_WITH_TIMEOUT
    access = address + "," + ",".join(f"{proto}/{port}" for proto, port in ports)
    fields = [
        f"{secrets.randbelow(10**16):016d}",
        _b64encode(user.encode()),
        str(int(now)),
        VERSION,
        str(message_type),
        _b64encode(access.encode()),
    ]
    if nat is not None:
        fields.append(_b64encode(f"{nat[0]},{nat[1]}".encode()))
    if client_timeout is not None:
        fields.append(str(client_timeout))
    body = ":".join(fields)
    inner = hashes.Hash(hashes.SHA256())
    inner.update(body.encode())
    plain = f"{body}:{_b64encode(inner.finalize())}".encode()
    salt = secrets.token_bytes(8)
    key, iv = _evp_bytes_to_key(keys.encryption, salt)
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padder.update(plain) + padder.finalize()) + encryptor.finalize()
    data = _b64encode(b"Salted__" + salt + ciphertext).removeprefix(SALTED_B64)
    tag = _hmac(keys)
    tag.update((SALTED_B64 + data).encode())
    return (data + _b64encode(tag.finalize())).encode()


def generate_keys() -> tuple[str, str]:
    """A fresh (encryption key, HMAC key) pair in base64, the format `fwknop --key-gen` prints."""
    return base64.b64encode(secrets.token_bytes(32)).decode(), base64.b64encode(secrets.token_bytes(64)).decode()
