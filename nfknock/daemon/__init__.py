"""The process around the engine. Read in this order:

- config.py     what `nfknock run` was asked to do
- verdicts.py   the hot path: one queued packet, one verdict
- sinks.py      where the engine's events go (log, granted set, metrics, replay store, claims, fleet)
- judge.py      engine + sinks + verdicts: what a process that judges packets is made of
- loop.py       select, wake-ups, signals, hooks; fail closed on every way out
- reload.py     rules read in a thread and switched; the one owner of first-step history
- scaffold.py   installing the plan, its sets, the sessions sets; what rules in place mean
- front.py      the control socket and the metrics exporter
- guard.py      the scaffolding watcher: puts back what other programs remove
- lastgood.py   the last good rules (rulescopy.py: the copy on disk); writer.py: the replay cache's writer
- single.py, supervisor.py, worker.py   the three roles, each composed of the above
- workers.py    the supervisor's pool of worker processes; watchdog.py: workers that do not answer
- control.py, metrics.py, logs.py, stats.py, store.py, claims.py   what those use

`Daemon(config, firewall, ...)` picks the role for the configuration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..doors.rules import Ruleset
from ..firewall.backend import Firewall
from .config import DEFAULT_QUEUE_MAXLEN, DaemonConfig, DaemonFailed, sd_notify
from .single import Single
from .supervisor import Supervisor

__all__ = ["DEFAULT_QUEUE_MAXLEN", "Daemon", "DaemonConfig", "DaemonFailed", "Single", "Supervisor", "sd_notify"]


def Daemon(  # noqa: N802 - reads as the class it stands for
    config: DaemonConfig,
    firewall: Firewall,
    logger: logging.Logger | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    ruleset: Ruleset | None = None,
    claims: Any = None,
    last_good: Any = None,
) -> Single | Supervisor:
    """The daemon for `config`: one process, or a supervisor of `config.workers` workers.
    `last_good` (lastgood.py): keeps a copy of the rules each install, and says whether the
    daemon started on such a copy because the rules on disk did not load."""
    if config.workers > 1:
        return Supervisor(config, firewall, logger, clock, wall_clock, ruleset, last_good)
    return Single(config, firewall, logger, clock, wall_clock, ruleset, claims, last_good)
