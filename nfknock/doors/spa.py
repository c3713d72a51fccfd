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

The HMAC is checked (in constant time, by `cryptography`) before anything is decrypted.
Every primitive comes from `cryptography`; this module only arranges fields.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
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
    after it; `packet_id` names it. The tag is not part of the identity: its base64 can be
    spelled more than one way, the authenticated text cannot.
    """
    try:
        text = wire.decode("ascii").strip()
    except UnicodeDecodeError:
        raise SpaError("malformed", "not ASCII") from None
    if text.startswith(SALTED_B64):
        raise SpaError("malformed", "starts with the 'Salted__' prefix fwknop never sends")
    tag_length = len(_b64encode(bytes(HMAC_DIGESTS.get(keys.digest, hashes.SHA256)().digest_size)))
    if len(text) <= tag_length + 16:
        raise SpaError("malformed", f"too short ({len(text)} characters)")
    data, tag = text[:-tag_length], text[-tag_length:]
    if _verifies(keys, SALTED_B64 + data, tag):
        return data
    if len(data) >= GPG_MIN_LENGTH and _verifies(keys, GPG_B64 + data, tag):
        raise SpaError(
            "gpg",
            "a GPG-encrypted packet (fwknop --gpg-recipient): nfknock takes Rijndael keys only "
            "(fwknop --key-gen, nfknock keygen)",
        )
    raise SpaError("bad hmac", "HMAC does not match (wrong HMAC key or digest, or a forged packet)")


def _verifies(keys: Keys, text: str, tag: str) -> bool:
    check = _hmac(keys)
    check.update(text.encode())
    try:
        check.verify(_b64decode(tag))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


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
