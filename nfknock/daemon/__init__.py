"""The process around the engine: the verdict loop, its sinks, reloads, roles and workers.

`Daemon` and `DaemonConfig` are re-exported here for `nfknock run`, the bench and the fuzzer.
"""

from .core import DEFAULT_QUEUE_MAXLEN, Daemon, DaemonConfig, DaemonFailed, sd_notify

__all__ = ["DEFAULT_QUEUE_MAXLEN", "Daemon", "DaemonConfig", "DaemonFailed", "sd_notify"]
