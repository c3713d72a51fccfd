"""What the engine reports. Callers act on the type; logging and counters are consumers."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Sequence(StrEnum):
    """Which of a door's two sequences an attempt belongs to."""

    OPEN = "open"
    CLOSE = "close"


@dataclass(frozen=True, slots=True)
class KnockAdvanced:
    """A knock matched the next step; `stage` steps of `sequence` are now done."""

    src: str
    door: str
    sequence: Sequence
    stage: int


@dataclass(frozen=True, slots=True)
class SequenceReset:
    """A knock on another port of the door ended the attempt that had reached `stage`."""

    src: str
    door: str
    sequence: Sequence
    stage: int
    port: str


@dataclass(frozen=True, slots=True)
class SequenceTimeout:
    """The attempt did not finish within the door's seq_timeout."""

    src: str
    door: str
    sequence: Sequence
    stage: int


@dataclass(frozen=True, slots=True)
class DoorOpened:
    """The open sequence completed: `src` may make NEW connections until `until` (engine time).
    An SPA door says whose `key` opened it and for how many `seconds` (a client may ask, -f)."""

    src: str
    door: str
    until: float
    key: str | None = None
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class DoorClosed:
    """The close sequence completed; `was_open` says whether a grant was revoked."""

    src: str
    door: str
    was_open: bool


@dataclass(frozen=True, slots=True)
class GrantExpired:
    """open_for ran out; connections already established are not affected."""

    src: str
    door: str
    key: str | None = None


@dataclass(frozen=True, slots=True)
class LockedOut:
    """`failures` failed attempts within the window: the door ignores `src` until `until`."""

    src: str
    door: str
    failures: int
    until: float


@dataclass(frozen=True, slots=True)
class LockReleased:
    src: str
    door: str


@dataclass(frozen=True, slots=True)
class SequenceReused:
    """A rotating door's sequence completed again in a window where it had opened already
    (a replay of a sniffed sequence, or a user knocking twice): not opened."""

    src: str
    door: str


@dataclass(frozen=True, slots=True)
class SpaRefused:
    """An SPA packet was refused; `reason` is a stable label, `detail` never holds key material."""

    src: str
    door: str
    reason: str
    detail: str
    key: str | None = None  # the key whose HMAC the packet carries, once known


@dataclass(frozen=True, slots=True)
class GrantsRevoked:
    """Grants ended because their key left the door (removed, or changed, at a reload)."""

    door: str
    key: str
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ConnectionAccepted:
    src: str
    door: str
    port: str  # "22/tcp"; forwarded: the destination, "10.0.0.5:22/tcp"
    forwarded: bool = False  # to a destination behind this host (a gateway door)
    # The connection's own address and port: a revoke cuts its handshake by this exact conntrack
    # tuple (daemon/cutter.py) instead of dumping the whole table. Not part of what it means.
    dst: str = field(default="", compare=False)
    sport: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class ConnectionRefused:
    src: str
    port: str


@dataclass(frozen=True, slots=True)
class Recorded:
    """Something that may be used once (an SPA packet, a rotating sequence in its window) was
    recorded in the replay cache until `expires` (wall-clock seconds). Not logged: the daemon
    keeps the cache on disk from these."""

    key: str
    expires: float


@dataclass(frozen=True, slots=True)
class ClaimNeeded:
    """Fleet mode: an SPA packet or a rotating sequence passed every local check, but what it
    opens waits until the fleet agrees that no other member used `record` first. The daemon
    asks, then calls Engine.claimed with this event and the answer. `ports`: what an SPA packet
    asked for (sorted), None for all the door protects; `key`: whose SPA key it was."""

    src: str
    door: str
    record: str
    expires: float
    seconds: float
    ports: tuple[tuple[str, int], ...] | None = None
    key: str | None = None
    dests: tuple[tuple[str, str, int], ...] = ()  # an SPA packet's destinations behind this host (gateway)


Event = (
    KnockAdvanced
    | SequenceReset
    | SequenceTimeout
    | DoorOpened
    | DoorClosed
    | GrantExpired
    | LockedOut
    | LockReleased
    | SpaRefused
    | SequenceReused
    | GrantsRevoked
    | ConnectionAccepted
    | ConnectionRefused
    | Recorded
    | ClaimNeeded
)
