"""Last good rules: what the daemon starts with when the rules on disk do not load.

Why: at boot the kernel has no rules at all. A rules file that stopped loading since the last
start (an edit never reloaded, a key file with the wrong mode) used to make the daemon exit before
it installed anything, and a protected port then followed the rest of the firewall: often open.
So every time the daemon has installed rules (start or reload), it keeps a copy of them in the
state directory; when the rules do not load at start, it starts on that copy, logs at error level
what failed, says so in `nfknock status` (and exits 3 there), in the metrics
(`nfknock_running_on_last_good_rules`) and in the unit's status line, and knocking works with the
doors of that copy. The next reload that loads the rules ends it.

With no copy (the first start, or no --state-dir), the daemon installs rules that only close: every
port the broken files still let us read as protected gets the scaffolding's established/sessions
rules and a DROP, no door, no queue, and so does every destination behind this host that they
still name (a gateway door's `forward` and `publish` targets: established accepted, the rest
dropped in the FORWARD chain, no DNAT); then it exits 2 with the problems and what it did, one line
each (the unit fails, which an admin sees). When not even one port or destination can be read, nothing
is installed and it exits as before.

The copy (`last-good.json`, 0600, written atomically in the root-only state directory) holds the
rules files' doors and the content of the key and secret files they name, with those paths
pointed into the copy: a key file whose mode went wrong, or that went missing, cannot take the
doors down with it. Key material is kept only as safely as the originals (root-only files, 0600,
in a 0700 directory that `trust.why_unsafe` checks); keys from the environment stay in the
environment (`keys_env`, `env`, `secret_env`: read again at start). The copy is written only
after loading it back gives the same doors and keys, so a file edited while being read never
becomes the last good one. To use it, it is written out as a rules directory under the state
directory, loaded as any rules are (strict), and removed again. Nothing here logs a secret:
only paths, door names and the loaders' one-line errors, which never quote key material.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..doors.rules import Ruleset
from ..errors import RulesError
from ..firewall.plan import Plan
from ..loading import load_rules
from ..trust import why_unsafe
from .rulescopy import (  # noqa: F401 - re-exported: the copy's API
    EXIT_DEGRADED,
    FILE_NAME,
    LastGoodError,
    Store,
    closed_gated_plan,
    closed_plan,
    readable_destinations,
    readable_ports,
    reason_of,
    when_saved,
)

# -- the daemon's side -----------------------------------------------------------------------------


@dataclass
class Degraded:
    """Why the daemon runs on the last good rules."""

    reason: str  # the first line of what failed
    saved: float | None  # when the copy was made (wall clock)
    since: float  # wall clock


class LastGood:
    """Keeps the copy current (`installed`) and knows whether the daemon runs on it."""

    def __init__(
        self,
        state_dir: Path | None,
        rules_path: Path,
        log: logging.Logger,
        wall_clock: Callable[[], float] = time.time,
        degraded: Degraded | None = None,
        fallback: Ruleset | None = None,
        notify: Callable[[str], None] | None = None,
    ):
        self.store = Store(state_dir) if state_dir is not None else None
        self.rules_path = rules_path
        self.log = log
        self.wall_clock = wall_clock
        self.degraded = degraded
        self.fallback = fallback
        self.notify = notify
        self._lock = threading.Lock()
        self.saved = 0  # copies written by this process (for tests and the log)

    def installed(self, ruleset: Ruleset, wait: bool = False) -> None:
        """Called once `ruleset` is in the kernel (start, reload). The fallback itself is not
        copied again; any other ruleset ends a degraded start and becomes the last good one
        (in a thread: loading the copy back must not hold up verdicts)."""
        if ruleset is self.fallback:
            return
        if self.degraded is not None:
            self.degraded, self.fallback = None, None
            self.log.warning("%s loads again: no longer running on the last good rules", self.rules_path)
            if self.notify is not None:
                self.notify(f"STATUS=guarding {len(ruleset.doors)} door(s)")
        if self.store is None:
            return
        worker = threading.Thread(target=self._save, args=(ruleset,), name="nfknock-last-good", daemon=True)
        worker.start()
        if wait:
            worker.join()

    def _save(self, ruleset: Ruleset) -> None:
        assert self.store is not None
        with self._lock:
            try:
                if self.store.save(self.rules_path, ruleset, self.wall_clock()):
                    self.saved += 1
                    self.log.debug("kept the rules as the last good ones in %s", self.store.path)
                else:
                    self.log.warning(
                        "%s changed while it was loaded: the last good rules in %s were not updated",
                        self.rules_path,
                        self.store.path,
                    )
            except Exception as exc:  # noqa: BLE001 - the daemon runs on; the copy is older
                self.log.warning("cannot keep the last good rules in %s: %s", self.store.path, reason_of(exc))

    def status(self) -> dict[str, Any] | None:
        """The `degraded` field of `nfknock status`: None when the rules on disk are in force."""
        if self.degraded is None:
            return None
        return {
            "running_on": "last good rules",
            "reason": self.degraded.reason,
            "saved": self.degraded.saved,
            "since": self.degraded.since,
            "rules": str(self.rules_path),
        }

    def ready_status(self, doors: int) -> str:
        """The unit's status line (sd_notify STATUS) once ready."""
        if self.degraded is None:
            return f"guarding {doors} door(s)"
        return f"DEGRADED: on the last good rules, {self.rules_path} does not load; guarding {doors} door(s)"


def ready_status(last_good: LastGood | None, doors: int) -> str:
    """The unit's status line once ready, with or without a keeper of last good rules (tests)."""
    return f"guarding {doors} door(s)" if last_good is None else last_good.ready_status(doors)


def starting_rules(
    rules_path: Path,
    state_dir: Path | None,
    log: logging.Logger,
    close: Callable[[Plan], None],
    queue_num: int,
    pass_mark: int,
    wall_clock: Callable[[], float] = time.time,
    notify: Callable[[str], None] | None = None,
) -> tuple[Ruleset, LastGood]:
    """The rules to start with: those at `rules_path`, or else the last good ones (loudly).
    With neither, installs rules that close every protected port still readable (`close` applies
    a plan) and raises the RulesError, so the daemon exits non-zero with those ports closed."""
    try:
        ruleset = load_rules(rules_path, strict=True)
        return ruleset, LastGood(state_dir, rules_path, log, wall_clock, notify=notify)
    except RulesError as exc:
        error = exc
    why_not = "no --state-dir"
    if state_dir is not None:
        try:
            unsafe = why_unsafe(state_dir)
            if unsafe:
                raise LastGoodError(f"--state-dir {state_dir}: not trusted: {unsafe}")
            fallback, about = Store(state_dir).load()
        except LastGoodError as exc:
            why_not = str(exc)
        else:
            for line in error.lines:
                log.error("the rules do not load: %s", line)
            saved = about.get("saved") if isinstance(about.get("saved"), (int, float)) else None
            when = when_saved(saved)
            log.error(
                "STARTING ON THE LAST GOOD RULES (kept %s, %d door(s): %s) because %s does not load; knocking "
                "works with those doors; fix the rules and reload (nfknock check --rules %s)",
                when,
                len(fallback.doors),
                ", ".join(door.name for door in fallback.doors),
                rules_path,
                rules_path,
            )
            degraded = Degraded(error.lines[0], saved, wall_clock())
            return fallback, LastGood(state_dir, rules_path, log, wall_clock, degraded, fallback, notify)
    # From here the start fails: the CLI prints these lines (stderr: the journal under systemd),
    # as it always printed the problems of rules that do not load; nothing is logged twice.
    ports = readable_ports(rules_path)
    destinations = readable_destinations(rules_path)  # a gateway door's, docs/gateway.md
    shown = ", ".join([*(f"{port}/{proto}" for proto, port in ports), *map(str, destinations)])
    if not ports and not destinations:
        raise RulesError(
            [*error.lines, f"no last good rules ({why_not}) and no protected port readable: nothing installed"]
        )
    try:
        close(closed_gated_plan(ports, destinations, queue_num, pass_mark))
    except Exception as exc:  # noqa: BLE001 - said, and the start fails anyway
        raise RulesError(
            [*error.lines, f"no last good rules ({why_not}); could not install rules closing {shown}: {reason_of(exc)}"]
        ) from None
    raise RulesError(
        [*error.lines, f"no last good rules ({why_not}): installed rules that keep {shown} closed (no door opens them)"]
    )
