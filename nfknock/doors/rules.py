"""Door definitions: YAML text in, validated frozen models out. Pure: reading files and
attaching secrets is loading.py's (the edge).

The engine only ever sees what `load_rules` returns, so every check a door needs lives here,
once, and every error names the file, the door and the field on one line.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import ipaddress
import re
import reprlib
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    PrivateAttr,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import RulesError
from . import yamlsafe
from .spa import Keys

Proto = Literal["tcp", "udp"]

DEFAULT_SEQ_TIMEOUT = 15.0
DEFAULT_OPEN_FOR = 30.0
MAX_SEQUENCE = 32  # knockd's limit; longer sequences only cost the user typing


class Port(BaseModel):
    """A port and its protocol; written `22/tcp`, `40000` (tcp is the default) or `53/udp`, or
    in knockd's spelling, `53:udp` (so a knockd sequence can be pasted as it is)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    port: int = Field(ge=1, le=65535)
    proto: Proto = "tcp"

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected a port like 40000 or 40000/udp, got {_short(value)}")
        if isinstance(value, int):
            port, proto = value, "tcp"
        elif isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*(?:[/:]\s*([A-Za-z]+)\s*)?", value)
            if not match:
                raise ValueError(f"expected a port like 40000 or 40000/udp, got {_short(value)}")
            port, proto = int(match.group(1)), (match.group(2) or "tcp").lower()
            if proto not in ("tcp", "udp"):
                raise ValueError(f"protocol must be tcp or udp, got {_short(match.group(2))}")
        else:
            return value
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is outside 1..65535")
        return {"port": port, "proto": proto}

    @property
    def key(self) -> tuple[str, int]:
        """The (proto, port) pair the engine indexes on."""
        return (self.proto, self.port)

    def __str__(self) -> str:
        return f"{self.port}/{self.proto}"


class Destination(BaseModel):
    """A host and port behind this one (the gateway doors, docs/gateway.md): written
    `10.0.0.5:22/tcp`, `10.0.0.5:22` (tcp is the default) or `[fd00::5]:22/tcp`. One address,
    never a network: a grant opens exactly this service, no more."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int = Field(ge=1, le=65535)
    proto: Proto = "tcp"

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        match = re.fullmatch(r"\s*(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+)):(\d+)\s*(?:/\s*([A-Za-z]+)\s*)?", value)
        if not match:
            raise ValueError(f"expected a destination like 10.0.0.5:22/tcp or [fd00::5]:22/tcp, got {_short(value)}")
        host = match.group(1) or match.group(2)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"invalid address {_short(host)} in destination {_short(value)}") from None
        if address.version == 6 and match.group(1) is None or address.version == 4 and match.group(1) is not None:
            raise ValueError(f"write an IPv6 destination in brackets ([fd00::5]:22), got {_short(value)}")
        port, proto = int(match.group(3)), (match.group(4) or "tcp").lower()
        if proto not in ("tcp", "udp"):
            raise ValueError(f"protocol must be tcp or udp, got {_short(match.group(4))}")
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is outside 1..65535")
        return {"host": address, "port": port, "proto": proto}

    @property
    def key(self) -> tuple[str, str, int]:
        """(proto, address, port): what the engine matches a forwarded packet's destination on."""
        return (self.proto, str(self.host), self.port)

    @property
    def family(self) -> int:
        return self.host.version

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.host.version == 6 else str(self.host)
        return f"{host}:{self.port}/{self.proto}"


class Publish(BaseModel):
    """A port of this host published for a destination behind it (`{port: 2222/tcp, to:
    10.0.0.5:22}`): the fixed DNAT sends every new connection to `to`, and the verdict on the
    forwarded packet decides who may use it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    port: Port
    to: Destination

    @model_validator(mode="before")
    @classmethod
    def _to_inherits_proto(cls, value: Any) -> Any:
        # `to: 10.0.0.5:22` takes the published port's protocol; a different one is a mistake.
        if isinstance(value, dict) and isinstance(value.get("to"), str) and isinstance(value.get("port"), str):
            port = Port.model_validate(value["port"])
            if "/" not in value["to"].rpartition("]")[2]:
                value = {**value, "to": f"{value['to']}/{port.proto}"}
        return value

    @model_validator(mode="after")
    def _same_proto(self):
        if self.port.proto != self.to.proto:
            raise ValueError(f"publish {self.port} goes to {self.to}: the protocols differ")
        return self


def parse_duration(value: Any) -> float:
    """Seconds from `10s`, `2m`, `1h`, `500ms` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {_short(value)} (use e.g. 10s, 2m)")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
        if not match:
            raise ValueError(f"invalid duration {_short(value)} (use e.g. 10s, 2m)")
        unit = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[match.group(2)]
        seconds = float(match.group(1)) * unit
    else:
        raise ValueError(f"invalid duration {_short(value)} (use e.g. 10s, 2m)")
    if not 0 < seconds <= 86400:
        raise ValueError(f"duration {_short(value)} must be more than 0 and at most 24h")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]

TCP_FLAG_BITS = {"fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08, "ack": 0x10, "urg": 0x20}


class TcpFlags(NamedTuple):
    """Bits that must be set and bits that must be clear, in knockd's `syn,!ack` notation."""

    required: int
    forbidden: int

    def __str__(self) -> str:
        names = [n for n, b in TCP_FLAG_BITS.items() if self.required & b]
        names += ["!" + n for n, b in TCP_FLAG_BITS.items() if self.forbidden & b]
        return ",".join(names)


def parse_tcp_flags(value: Any) -> TcpFlags:
    if isinstance(value, TcpFlags):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected flags like 'syn,!ack', got {_short(value)}")
    required = forbidden = 0
    for word in filter(None, (w.strip().lower() for w in value.split(","))):
        negated = word.startswith("!")
        bit = TCP_FLAG_BITS.get(word.lstrip("!"))
        if bit is None:
            raise ValueError(f"unknown TCP flag {_short(word)} (known: {', '.join(TCP_FLAG_BITS)})")
        if negated:
            forbidden |= bit
        else:
            required |= bit
    if required & forbidden:
        raise ValueError(f"flags {_short(value)} require and forbid the same flag")
    return TcpFlags(required, forbidden)


Flags = Annotated[TcpFlags, BeforeValidator(parse_tcp_flags), PlainSerializer(str)]


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(value), strict=True)
    except ValueError as exc:
        raise ValueError(f"invalid network {_short(value)}: {_clip(exc, MAX_VALUE)}") from None


Source = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network), PlainSerializer(str)]
Family = Literal["any", "ipv4", "ipv6"]


class Lockout(BaseModel):
    """`failures` failed attempts within `window` make the door ignore that source for `lock_for`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    failures: int = Field(default=5, ge=1, le=1000)
    window: Duration = 60.0
    lock_for: Duration = 300.0


def _lockout_switch(value: Any) -> Any:
    # YAML reads `lockout: off` as False.
    if value is False:
        return None
    if value is True:
        return Lockout()
    return value


DEFAULT_TRIPWIRE = 16


class Rotation(BaseModel):
    """A sequence that changes every `window`, derived from a shared secret (see rotation.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    secret_file: Path | None = None
    secret_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    window: Duration = 60.0
    length: int = Field(default=3, ge=2, le=16)
    ports: str = "20000-29999"
    proto: Proto = "tcp"
    _secret: bytes = PrivateAttr(default=b"")

    @model_validator(mode="after")
    def _check(self):
        match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", self.ports)
        if not match:
            raise ValueError(f"ports: expected a range like 20000-29999, got {_short(self.ports)}")
        first, last = int(match.group(1)), int(match.group(2))
        if not 1 <= first < last <= 65535:
            raise ValueError(f"ports: {_short(self.ports)} is not a range within 1..65535")
        if last - first + 1 < 10 * self.length:
            raise ValueError(
                f"ports: {_short(self.ports)} is too small for {self.length} steps (10 ports a step at least)"
            )
        if (self.secret_file is None) == (self.secret_env is None):
            raise ValueError("give exactly one of secret_file or secret_env")
        return self

    @property
    def range(self) -> tuple[str, int, int]:
        first, last = (int(p) for p in self.ports.split("-"))
        return (self.proto, first, last)

    @property
    def secret(self) -> bytes:
        if not self._secret:
            raise RuntimeError("the rotation secret was not loaded (load_rules or load_secrets does that)")
        return self._secret


DoorName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Steps = tuple[Port, ...]
Range = tuple[str, int, int]  # (proto, first port, last port)
FAMILIES = {"any": (4, 6), "ipv4": (4,), "ipv6": (6,)}


class _DoorBase(BaseModel):
    """What every door has: a name, the ports its grant opens, for how long, and for whom."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: DoorName
    protect: Steps = ()
    forward: tuple[Destination, ...] = ()
    publish: tuple[Publish, ...] = ()
    open_for: Duration = DEFAULT_OPEN_FOR
    sources: tuple[Source, ...] = ()
    family: Family = "any"
    lockout: Annotated[Lockout | None, BeforeValidator(_lockout_switch)] = Lockout()

    @model_validator(mode="after")
    def _common(self):
        if not self.protect and not self.forward and not self.publish:
            raise ValueError(
                "protect: required, at least 1 port (or forward or publish: destinations behind this host)"
            )
        protected = set(self.protect)
        for entry in self.publish:
            if entry.port in protected:
                raise ValueError(f"{entry.port} is both a protected port and a published port")
            if entry.port in self.knock_ports:
                raise ValueError(f"{entry.port} is both a knock port and a published port")
        if len({entry.port for entry in self.publish}) != len(self.publish):
            raise ValueError("publish lists a port twice")
        if len(set(self.forward)) != len(self.forward):
            raise ValueError("forward lists a destination twice")
        far = [str(d) for d in self.destinations if self.family != "any" and f"ipv{d.family}" != self.family]
        if far:
            raise ValueError(f"destinations {', '.join(far)} cannot be reached by a door of family {self.family}")
        for step in self.knock_ports:
            if step in protected:
                raise ValueError(f"{step} is both a knock port and a protected port")
        if len(protected) != len(self.protect):
            raise ValueError("protect lists a port twice")
        wrong = [str(n) for n in self.sources if self.family != "any" and f"ipv{n.version}" != self.family]
        if wrong:
            raise ValueError(f"sources {', '.join(wrong)} cannot match a door of family {self.family}")
        return self

    @property
    def families(self) -> tuple[int, ...]:
        """IP versions this door listens on."""
        return FAMILIES[self.family]

    @property
    def destinations(self) -> tuple[Destination, ...]:
        """Every destination behind this host a grant of the door opens: routed and published."""
        return tuple(dict.fromkeys(self.forward + tuple(entry.to for entry in self.publish)))

    @property
    def knock_ports(self) -> Steps:
        """The single ports the door listens on (queued and always dropped)."""
        return ()

    @property
    def knock_ranges(self) -> tuple[Range, ...]:
        """Port ranges all of which are knock ports (a rotating door's whole range)."""
        return ()

    @property
    def tripwire_ranges(self) -> tuple[Range, ...]:
        return ()

    @property
    def tripwire_keys(self) -> frozenset[tuple[str, int]]:
        return frozenset()


class _SequenceDoor(_DoorBase):
    """A door opened by knocking a sequence of closed ports."""

    seq_timeout: Duration = DEFAULT_SEQ_TIMEOUT
    tcp_flags: Flags = TcpFlags(TCP_FLAG_BITS["syn"], TCP_FLAG_BITS["ack"])
    tripwire: int = Field(default=DEFAULT_TRIPWIRE, ge=0, le=1024)

    @property
    def tripwire_ranges(self) -> tuple[Range, ...]:
        """(proto, first, last) port ranges within `tripwire` of any step, merged.

        A scanner walking the ports in any order touches these between the steps; a knock
        client never does. They include the steps themselves (the firewall matches steps
        first); `tripwire_keys` is the set without them.
        """
        spans = (
            sorted(
                (p.proto, max(1, p.port - self.tripwire), min(65535, p.port + self.tripwire)) for p in self.knock_ports
            )
            if self.tripwire
            else []
        )
        merged: list[Range] = []
        for proto, first, last in spans:
            if merged and merged[-1][0] == proto and first <= merged[-1][2] + 1:
                merged[-1] = (proto, merged[-1][1], max(last, merged[-1][2]))
            else:
                merged.append((proto, first, last))
        return tuple(merged)

    @property
    def tripwire_keys(self) -> frozenset[tuple[str, int]]:
        steps = {p.key for p in self.knock_ports}
        return frozenset(
            (proto, port)
            for proto, first, last in self.tripwire_ranges
            for port in range(first, last + 1)
            if (proto, port) not in steps
        )


def _advanceable(steps: Steps | None) -> Steps | None:
    # The engine ignores a repeat of the step just matched (retransmits), so a step equal to
    # the one before it could never advance: the door would never open.
    if steps is None:
        return None
    for i in range(1, len(steps)):
        if steps[i] == steps[i - 1]:
            raise ValueError(
                f"step {i + 1} ({steps[i]}) repeats step {i}; repeated knocks are ignored "
                "as retransmits, so consecutive steps must differ"
            )
    return steps


class KnockDoor(_SequenceDoor):
    """A fixed knock sequence that grants its source NEW connections to `protect`, and perhaps
    a close sequence that takes the grant back."""

    kind: Literal["knock"] = "knock"
    sequence: Steps = Field(min_length=1, max_length=MAX_SEQUENCE)
    close_sequence: Steps | None = Field(default=None, min_length=1, max_length=MAX_SEQUENCE)

    @model_validator(mode="before")
    @classmethod
    def _one_way_to_knock(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("sequence" in data) == ("rotate" in data):
            raise ValueError("give either sequence or rotate")
        return data

    @field_validator("sequence", "close_sequence")
    @classmethod
    def _steps_advance(cls, steps: Steps | None) -> Steps | None:
        return _advanceable(steps)

    @model_validator(mode="after")
    def _consistent(self):
        if self.close_sequence is not None and self.close_sequence == self.sequence:
            raise ValueError("close_sequence equals sequence; the door could never stay open")
        return self

    @property
    def knock_ports(self) -> Steps:
        """Every port of the door's sequences, without repeats, in first-seen order."""
        return tuple(dict.fromkeys(self.sequence + (self.close_sequence or ())))


class RotatingDoor(_SequenceDoor):
    """A knock door whose sequence changes every window, derived from a shared secret."""

    kind: Literal["rotating"] = "rotating"
    rotate: Rotation

    @model_validator(mode="before")
    @classmethod
    def _no_fixed_sequences(cls, data: Any) -> Any:
        if isinstance(data, dict) and "close_sequence" in data:
            raise ValueError("a rotating door has no close_sequence")
        return data

    @model_validator(mode="after")
    def _outside_the_range(self):
        proto, first, last = self.rotate.range
        for port in self.protect:
            if port.proto == proto and first <= port.port <= last:
                raise ValueError(f"{port} is a protected port inside the rotating range {self.rotate.ports}")
        return self

    @property
    def knock_ranges(self) -> tuple[Range, ...]:
        return (self.rotate.range,)


def _read_keys(text: str, where: str) -> Keys:
    """KEY_BASE64 / HMAC_KEY_BASE64 lines, as `nfknock keygen` and `fwknop --key-gen` print them."""
    values = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":") if ":" in line.split(" ")[0] else line.partition(" ")
        if sep and name.strip() in ("KEY_BASE64", "HMAC_KEY_BASE64"):
            values[name.strip()] = value.strip()
    return _decode_keys(values, where)


def _decode_keys(values: dict[str, str], where: str) -> Keys:
    try:
        encryption = base64.b64decode(values["KEY_BASE64"], validate=True)
        mac = base64.b64decode(values["HMAC_KEY_BASE64"], validate=True)
    except KeyError as exc:
        raise ValueError(f"{where} has no {exc.args[0]} line") from None
    except binascii.Error:
        raise ValueError(f"{where}: a key is not valid base64") from None
    if len(encryption) < 16 or len(mac) < 32:
        raise ValueError(f"{where}: keys too short (use 'nfknock keygen')")
    return Keys(encryption, mac)


Digest = Literal["sha1", "sha256", "sha384", "sha512"]
KeyName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")]
DEFAULT_KEY = "default"  # the name of a door's one key given by keys_file or keys_env
KEY_SUFFIX = ".keys"  # the files of a keys_dir; the name before it names the key


def parse_expiry(value: Any) -> float:
    """Unix time from `2027-01-31` (00:00 UTC that day, as fwknop's ACCESS_EXPIRE counts a
    date), an ISO date and time with its offset (`2027-01-31T18:00:00+01:00`), or Unix seconds
    (ACCESS_EXPIRE_EPOCH). A time without an offset is refused: whose midnight would it be?"""
    if isinstance(value, bool):
        raise ValueError(f"invalid expiry {_short(value)} (use e.g. 2027-01-31)")
    if isinstance(value, (int, float)):
        if not 0 < value < 2**40:
            raise ValueError(f"expiry {_short(value)} is not a plausible Unix time")
        return float(value)
    if isinstance(value, date):  # a date YAML constructed after all (an explicit !!timestamp)
        value = value.isoformat()
    if not isinstance(value, str):
        raise ValueError(f"invalid expiry {_short(value)} (use e.g. 2027-01-31)")
    text = value.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            moment = datetime.fromisoformat(text).replace(tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"invalid expiry {_short(value)} (use e.g. 2027-01-31)") from None
    if moment.tzinfo is None:
        raise ValueError(f"expiry {_short(value)} has a time but no offset (add Z or +01:00)")
    return moment.timestamp()


def format_expiry(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    if moment.hour == moment.minute == moment.second == 0:
        return moment.strftime("%Y-%m-%d")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_expiry(seconds: float) -> str:
    """How a log line or `check` says when a key expires."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")


Expiry = Annotated[float, BeforeValidator(parse_expiry), PlainSerializer(format_expiry)]


class SpaKey(BaseModel):
    """One person's key of an SPA door, and what it may do. The same settings come from an entry
    of the door's `keys` list or from the upper-case lines of a key file (USERNAME: alice)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: KeyName
    file: Path | None = None
    env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    sources: tuple[Source, ...] = ()
    username: str | None = Field(default=None, min_length=1, max_length=64)
    expires: Expiry | None = None
    ports: Steps | None = Field(default=None, min_length=1)
    open_for: Duration | None = None
    max_open_for: Duration | None = None
    hmac_digest: Digest | None = None
    force_nat: Destination | None = None  # fwknop's FORCE_NAT for this person: their grants go there only
    destinations: tuple[Destination, ...] | None = Field(default=None, min_length=1)  # NAT access: None = the door's

    @model_validator(mode="after")
    def _check(self):
        if (self.file is None) == (self.env is None):
            raise ValueError("give exactly one of file or env")
        return self


# Settings a key file may carry besides its two keys, as upper-case lines (`USERNAME: alice`).
KEY_FILE_SETTINGS = (
    "username",
    "sources",
    "expires",
    "ports",
    "open_for",
    "max_open_for",
    "hmac_digest",
    "force_nat",
    "destinations",
)
_LISTS = ("sources", "ports", "destinations")


def read_key_file(text: str, where: str, lines: dict[str, int] | None = None) -> tuple[Keys, dict[str, Any]]:
    """A per-person key file: KEY_BASE64 and HMAC_KEY_BASE64 lines (as `fwknop --key-gen` and
    `nfknock keygen` print them) and optional settings, one `NAME: value` per line, `#` comments.
    Unlike a door's single keys_file, any other line is refused: a misspelt EXPIRES must not
    leave a key that never expires. `lines`, when given, gets each setting's line number.

    The file holds keys, so an error names the line and what is wrong, never the line's text: a
    `KEY_BASE64=...` line or a bare key is not a setting, and quoting it would put the key in the
    log. Only a name shaped like a setting's (`EXPIRE:`) is quoted."""
    values: dict[str, str] = {}
    settings: dict[str, Any] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":") if ":" in line.split()[0] else line.partition(" ")
        name, value = name.strip(), value.strip()
        if name in ("KEY_BASE64", "HMAC_KEY_BASE64"):
            values[name] = value
        elif name.lower() in KEY_FILE_SETTINGS and name.isupper() and sep:
            field = name.lower()
            settings[field] = [item for item in re.split(r"[\s,]+", value) if item] if field in _LISTS else value
            if lines is not None:
                lines[field] = number
        else:
            known = ", ".join(["KEY_BASE64", "HMAC_KEY_BASE64", *(s.upper() for s in KEY_FILE_SETTINGS)])
            if sep and re.fullmatch(r"[A-Z][A-Z0-9_]{0,31}", name):
                raise ValueError(f"{where}: line {number}: unknown setting {name!r} (known: {known})")
            raise ValueError(
                f"{where}: line {number}: not a 'NAME: value' line (the line is not shown: key files hold "
                f"keys; known names: {known})"
            )
    return _decode_keys(values, where), settings


_QUOTED = re.compile(r"""'(?:[^'\\]|\\.)*(?:'|$)|"(?:[^"\\]|\\.)*(?:"|$)""")


def hide_values(message: str) -> str:
    """A validator's message without the values it quotes (every value in a message is quoted,
    `_short` does it): for what came from a file that holds keys, where a value can be a key
    pasted on the wrong line."""
    return _QUOTED.sub("(value not shown)", message)


@dataclass(frozen=True)
class DoorKey:
    """A loaded key of an SPA door with its settings resolved against the door's: what the
    engine checks a packet against. `keys` never appears in a message."""

    name: str
    keys: Keys
    open_for: float
    max_open_for: float
    sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    username: str | None = None
    expires: float | None = None
    ports: frozenset[tuple[str, int]] | None = None  # None: any port the door protects
    origin: str = ""  # where it came from, for messages
    force_nat: Destination | None = None  # every grant of this key goes to this destination only
    destinations: frozenset[tuple[str, str, int]] | None = None  # NAT access may ask for these; None: the door's

    def describe(self) -> str:
        parts = []
        if self.username is not None:
            parts.append(f"user {self.username}")
        if self.sources:
            parts.append("from " + " ".join(map(str, self.sources)))
        if self.expires is not None:
            parts.append(f"until {describe_expiry(self.expires)}")
        if self.ports is not None:
            parts.append(" ".join(f"{port}/{proto}" for proto, port in sorted(self.ports)))
        if self.force_nat is not None:
            parts.append(f"force_nat {self.force_nat}")
        if self.destinations is not None:
            parts.append("to " + " ".join(f"{host}:{port}/{proto}" for proto, host, port in sorted(self.destinations)))
        parts.append(f"open_for {self.open_for:g}s max {self.max_open_for:g}s")
        return f"{self.name} ({', '.join(parts)})"


class SpaDoor(_DoorBase):
    """A door opened by one authenticated UDP packet (fwknop-compatible SPA). The keys come from
    root-only files or from the environment, never from the rules file itself; SPA has nothing
    to scan for (one port, and a wrong packet is refused by its HMAC), so no tripwires.

    A door has one key (`keys_file` or `keys_env`, named `default`) or one per person: a `keys`
    list and/or a `keys_dir` of `*.keys` files, each key with its own sources, username, expiry
    and ports. A packet is checked against the key whose HMAC it carries, so the log can say
    who opened the door, and removing one person's key touches nobody else's."""

    kind: Literal["spa"]
    port: Port = Port(port=62201, proto="udp")
    keys_file: Path | None = None
    keys_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    keys: tuple[SpaKey, ...] = ()
    keys_dir: Path | None = None
    hmac_digest: Digest = "sha256"
    max_open_for: Duration | None = None
    max_age: Duration = 120.0
    trust_inner_address: bool = False
    force_nat: Destination | None = None  # fwknop's FORCE_NAT: every grant is for this destination only
    _keyring: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self):
        if self.keys_file is not None and self.keys_env is not None:
            raise ValueError("give at most one of keys_file or keys_env")
        if self.keys_file is None and self.keys_env is None and not self.keys and self.keys_dir is None:
            raise ValueError("give keys_dir, keys, keys_file or keys_env")
        if self.port in self.protect:
            raise ValueError(f"{self.port} is both the SPA port and a protected port")
        if self.force_nat is not None and self.force_nat not in self.destinations:
            raise ValueError(f"force_nat {self.force_nat} is not one of the door's forward or publish destinations")
        if self.max_open_for is not None and self.max_open_for < self.open_for:
            raise ValueError(
                f"max_open_for {self.max_open_for:g}s is below open_for {self.open_for:g}s "
                "(it caps the time a client may ask for with fwknop -f)"
            )
        seen = {DEFAULT_KEY} if self.keys_file is not None or self.keys_env is not None else set()
        for key in self.keys:
            if key.name in seen:
                raise ValueError(f"keys: {key.name!r} is named twice (the single key of keys_file is 'default')")
            seen.add(key.name)
            self.resolve(key, Keys(b"", b""))  # the settings' checks, before any file is read
        return self

    def resolve(self, spec: SpaKey, keys: Keys, origin: str = "") -> DoorKey:
        """A key's settings over the door's; ValueError naming the key when they do not fit."""
        protected = {p.key for p in self.protect}
        ports = None if spec.ports is None else frozenset(p.key for p in spec.ports)
        if ports is not None and not ports <= protected:
            extra = ", ".join(f"{port}/{proto}" for proto, port in sorted(ports - protected))
            raise ValueError(f"key {spec.name!r}: ports {extra} not in the door's protect")
        wrong = [str(n) for n in spec.sources if self.family != "any" and f"ipv{n.version}" != self.family]
        if wrong:
            raise ValueError(
                f"key {spec.name!r}: sources {', '.join(wrong)} cannot match a door of family {self.family}"
            )
        if spec.force_nat is not None and spec.force_nat not in self.destinations:
            raise ValueError(f"key {spec.name!r}: force_nat {spec.force_nat} is not a forward or publish destination")
        far = [str(d) for d in spec.destinations or () if d not in self.destinations]
        if far:
            raise ValueError(f"key {spec.name!r}: destinations {', '.join(far)} not in the door's forward or publish")
        open_for = spec.open_for if spec.open_for is not None else self.open_for
        most = spec.max_open_for if spec.max_open_for is not None else self.max_open_for
        if most is None:
            most = open_for
        if most < open_for:
            raise ValueError(f"key {spec.name!r}: max_open_for {most:g}s is below its open_for {open_for:g}s")
        digest = spec.hmac_digest or self.hmac_digest
        return DoorKey(
            spec.name,
            Keys(keys.encryption, keys.hmac, digest),
            open_for,
            most,
            spec.sources,
            spec.username,
            spec.expires,
            ports,
            origin,
            spec.force_nat,
            None if spec.destinations is None else frozenset(d.key for d in spec.destinations),
        )

    def single_key(self, keys: Keys, origin: str) -> DoorKey:
        """The door's one key of keys_file or keys_env: any port, any source, the door's times."""
        most = self.max_open_for if self.max_open_for is not None else self.open_for
        return DoorKey(
            DEFAULT_KEY, Keys(keys.encryption, keys.hmac, self.hmac_digest), self.open_for, most, origin=origin
        )

    @property
    def keyring(self) -> tuple[DoorKey, ...]:
        """The loaded keys, in the order they are tried. (Read from pydantic's private dict
        directly: `self._keyring` goes through BaseModel.__getattr__, some microseconds, and
        this is read for every packet at the SPA port.)"""
        ring = (self.__pydantic_private__ or {}).get("_keyring")
        if ring is None:
            raise RuntimeError("the SPA keys were not loaded (load_rules or load_secrets does that)")
        return ring

    def same_settings(self, other: object) -> bool:
        """Equal but for the keys: a reload that only adds or removes people keeps the door's state."""
        if type(other) is not SpaDoor:
            return False
        mine = {k: v for k, v in self.__dict__.items() if k != "keys"}
        theirs = {k: v for k, v in other.__dict__.items() if k != "keys"}
        return mine == theirs

    @property
    def knock_ports(self) -> Steps:
        return (self.port,)


Door = KnockDoor | RotatingDoor | SpaDoor


def _door_kind(value: Any) -> str | None:
    """`kind` says it; without one (or with 0.1.0's `kind: knock`), a `rotate` key and no
    `sequence` make a rotating door."""
    if not isinstance(value, dict):
        return getattr(value, "kind", None)
    kind = value.get("kind", "knock")
    if kind == "knock" and "rotate" in value and "sequence" not in value:
        return "rotating"
    return kind if kind in DOOR_KINDS else None


DOOR_KINDS = ("knock", "rotating", "spa")
AnyDoor = Annotated[
    Annotated[KnockDoor, Tag("knock")] | Annotated[RotatingDoor, Tag("rotating")] | Annotated[SpaDoor, Tag("spa")],
    Discriminator(
        _door_kind, custom_error_type="door_kind", custom_error_message="kind must be knock, rotating or spa"
    ),
]


def parse_door(data: Any) -> Door:
    """One door from its YAML mapping, whatever its kind (validation only: no secrets)."""
    return _DOOR.validate_python(data)


class RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    doors: list[AnyDoor] = Field(min_length=1)


@dataclass(frozen=True)
class Ruleset:
    """Every door from every file, with the file each came from (for messages)."""

    doors: tuple[Door, ...]
    origin: dict[str, Path]
    warnings: tuple[str, ...] = ()  # files `load_rules(strict=True)` would refuse, one line each

    def door(self, name: str) -> Door:
        for door in self.doors:
            if door.name == name:
                return door
        raise RulesError([f"no door named {_short(name)} (doors: {_clip(', '.join(d.name for d in self.doors))})"])


MAX_LINES_PER_FILE = 20  # problems listed for one file; the rest are counted on one more line
MAX_VALUE = 80  # characters of a value quoted in a message


def _short(value: Any) -> str:
    """repr() of a value for a message: bounded however big or deep the value is."""
    text = _REPR.repr(value)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 3] + "..."


def _clip(value: object, limit: int = 3 * MAX_VALUE) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = MAX_VALUE
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 3, 6, 4


def parse_rules_text(text: str, origin: Path) -> tuple[Door, ...]:
    """Doors from text that is not a file yet (what `import-knockd` is about to write), checked
    as `load_rules` checks a file, secrets aside; RulesError naming `origin` otherwise."""
    errors: list[str] = []
    doors = _parse_text(text, origin, errors)
    problems = _conflicts(doors, [origin] * len(doors), {door.name: origin for door in reversed(doors)})
    errors += [line for i in range(len(doors)) for line in problems.get(i, [])]
    if errors:
        raise RulesError(errors)
    return tuple(doors)


def _parse_text(text: str, file: Path, errors: list[str]) -> list[Door]:
    try:
        data = yamlsafe.load(text)
    except yamlsafe.LimitError as exc:
        errors.append(f"{file}: refused: {exc}")
        return []
    except yaml.YAMLError as exc:
        errors.append(f"{file}: invalid YAML: {_yaml_reason(exc)}")
        return []
    except Exception as exc:  # a constructor's own error: a bad !!timestamp, an int of 5000 digits
        errors.append(f"{file}: invalid YAML: {_clip(exc)}")
        return []
    if not isinstance(data, dict):
        errors.append(f"{file}: expected a mapping with a 'doors:' list, got {type(data).__name__}")
        return []
    try:
        return RuleFile.model_validate(data).doors
    except ValidationError as exc:
        errors.extend(_describe(file, data, exc))
    except Exception as exc:  # pydantic and the validators raise ValidationError; anything else is a bug
        errors.append(f"{file}: cannot load: {type(exc).__name__}: {_clip(exc)}")
    return []


def _yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return _clip(f"{where}{problem}")


def _describe(file: Path, data: dict, exc: ValidationError) -> list[str]:
    lines = []
    errors = exc.errors()
    item_locs = {err["loc"][:-1] for err in errors if isinstance(err["loc"][-1], int)}
    for err in errors:
        if err["type"] == "too_short" and err["loc"] in item_locs:
            continue  # an echo of an item error that has its own line
        loc = list(err["loc"])
        where = []
        if len(loc) >= 2 and loc[0] == "doors" and isinstance(loc[1], int):
            raw = data.get("doors") or []
            raw_door = raw[loc[1]] if loc[1] < len(raw) else None
            name = raw_door.get("name") if isinstance(raw_door, dict) else None
            where.append(f"door {_short(name)}" if isinstance(name, str) else f"door #{loc[1] + 1}")
            loc = loc[2:]
            if loc and loc[0] in DOOR_KINDS:
                loc = loc[1:]  # the tag of the door kind
        field = ""
        for part in loc:
            if isinstance(part, int):
                field += f"[{part + 1}]"
            elif not part.startswith(("function-", "tagged-")):
                field += f".{part}" if field else part
        if field:
            where.append(field)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required"
        lines.append(": ".join([str(file), *where, _clip(message)]))
    return lines


def _conflicts(doors: list, files: list[Path], origin: dict[str, Path]) -> dict[int, list[str]]:
    """Checks that need every door at once: names, sequences and ports shared between doors.

    Each problem is reported on the later of the two doors, naming the earlier one. Indexes
    by name, sequence and port keep this linear in the doors (plus one line per problem);
    comparing every pair took minutes for a few thousand doors. Returns the lines by door
    index, in the order a pairwise comparison would give them (earlier door, then check).
    """
    found: list[tuple[int, int, int, tuple, str]] = []  # (door, other, check, position, line)

    def report(i: int, j: int, check: int, position: tuple, field: str, text: str) -> None:
        """`text` names the other door with `%s`."""
        there = f"door {doors[j].name!r} in {origin[doors[j].name]}"
        found.append((i, j, check, position, f"{files[i]}: door {doors[i].name!r}: {field}: {text % there}"))

    def groups(pairs):
        index: dict = {}
        for key, value in pairs:
            index.setdefault(key, []).append(value)
        return index

    for same in groups((d.name, i) for i, d in enumerate(doors)).values():
        for a, i in enumerate(same):
            for j in same[:a]:
                report(i, j, 0, (), "name", "duplicate door name (also %s)")
    sequences = groups((d.sequence, i) for i, d in enumerate(doors) if isinstance(d, KnockDoor))
    for same in sequences.values():
        for a, i in enumerate(same):
            for j in same[:a]:
                report(i, j, 1, (), "sequence", "same open sequence as %s")
    knocks = groups((p, (i, n)) for i, d in enumerate(doors) for n, p in enumerate(d.knock_ports))
    protects = groups((p, (i, n)) for i, d in enumerate(doors) for n, p in enumerate(d.protect))
    for port, knockers in knocks.items():
        for k, kn in knockers:
            for p, pn in protects.get(port, ()):
                if p < k:
                    report(k, p, 2, (kn,), "sequence", f"{port} is a protected port of %s")
                elif k < p:
                    report(p, k, 5, (pn,), "protect", f"{port} is a knock port of %s")
    protected = sorted((p.key, i, n) for (p, entries) in protects.items() for i, n in entries)
    for r, door in enumerate(doors):
        for rn, (proto, first, last) in enumerate(door.knock_ranges):
            start = bisect.bisect_left(protected, ((proto, first),))
            stop = bisect.bisect_left(protected, ((proto, last + 1),))
            for _, p, pn in protected[start:stop]:
                port = doors[p].protect[pn]
                if p < r:
                    report(r, p, 3, (rn, pn), "rotate", f"{port} is a protected port of %s")
                elif r < p:
                    report(p, r, 4, (rn, pn), "protect", f"{port} is in the rotating range of %s")
    out: dict[int, list[str]] = {}
    for i, _, _, _, line in sorted(found, key=lambda f: f[:4]):
        out.setdefault(i, []).append(line)
    return out


_DOOR: TypeAdapter[Door] = TypeAdapter(AnyDoor)
