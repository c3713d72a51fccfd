"""systemd's watchdog (the unit's WatchdogSec=): the verdict loop says, from its own turns, that
it still turns.

Why: a verdict loop wedged inside a callback (a bug, a library that never returns, a SIGSTOP)
keeps its queues bound. The kernel then holds what they get and drops what does not fit: closed,
the safe side (no --queue-bypass), but nobody can knock until someone notices. With WatchdogSec=,
systemd passes WATCHDOG_USEC to the daemon and restarts it when WATCHDOG=1 does not come within
that time; the restart unbinds the queues (the kernel drops what they held, so ports stay
closed throughout) and binds them again in a fresh process.

So the ping is sent by a hook of the loop (loop.py runs its hooks once per turn, at least once a
second), never by a thread or a timer that would go on while the loop is stuck: no turn, no ping.
With workers the supervisor's loop never sees a packet, so it pings only while every worker
answers the supervisor's own pings (watchdog.py): a worker that is stuck, or dead, stops the pings
and systemd restarts the whole daemon, closed meanwhile.

Pure: the environment, the clock and the sender are passed in; `Heartbeat` is called with `now`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

PING = "WATCHDOG=1"


def interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two pings (half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises), or
    None when systemd watches no one here: no WatchdogSec=, a value that is not a positive whole
    number of microseconds, or WATCHDOG_PID naming another process (the variables were inherited,
    e.g. by a worker or a program nfknock started)."""
    text = environ.get("WATCHDOG_USEC", "")
    if not text.isdigit() or int(text) <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner is not None and owner != str(pid):
        return None
    return int(text) / 2e6


@dataclass
class Heartbeat:
    """A loop hook: WATCHDOG=1 every `every` seconds, on a turn where `healthy(now)` holds.

    An unhealthy turn sends nothing and does not move the schedule: the next healthy turn pings at
    once, and if none comes within WatchdogSec, systemd restarts the daemon."""

    every: float
    send: Callable[[str], None]
    healthy: Callable[[float], bool] = lambda now: True
    next: float = float("-inf")
    sent: int = 0  # pings sent (tests, status)

    def __call__(self, now: float) -> None:
        if now < self.next or not self.healthy(now):
            return
        self.next = now + self.every
        self.send(PING)
        self.sent += 1


def heartbeat(
    environ: Mapping[str, str],
    pid: int,
    send: Callable[[str], None],
    healthy: Callable[[float], bool] = lambda now: True,
) -> Heartbeat | None:
    """The hook for this process, or None when systemd does not watch it."""
    every = interval(environ, pid)
    return None if every is None else Heartbeat(every, send, healthy)
