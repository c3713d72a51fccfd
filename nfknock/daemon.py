"""The I/O shell: the only place that touches netfilterqueue, signals and the clock.

Start order matters for a security tool: rules are validated before anything changes; the queue
is bound before the scaffolding sends packets to it; the scaffolding goes away in `finally`.
Every queued packet gets exactly one verdict, drop unless the engine said accept.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
import os
import select
import signal
import socket
import time
from pathlib import Path

from .engine import DEFAULT_MAX_SOURCES, Engine, Verdict
from .errors import NfknockError, PacketError, QueueError
from .firewall import PASS_MARK, Firewall, iptables_flavour, plan
from .logs import RateLimit, log_events
from .packet import parse
from .rules import Ruleset, load_rules
from . import metrics
from .control import ControlServer
from .metrics import tally
from .stats import Reporter, read_queue_drops

BATCH = 256  # packets handled before signals and timers are looked at again
MAX_SLEEP = 1.0
STATS_EVERY = 5.0  # seconds between looks at the drop counters
DEFAULT_QUEUE_MAXLEN = 4096
_ACCEPT, _DROP, _PASS = Verdict.ACCEPT, Verdict.DROP, Verdict.PASS  # enum access is slow per packet


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op when not started by systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), path)
    except OSError:
        pass


class _YieldLoop(Exception):
    """Raised by the queue callback, after the verdict, to leave NetfilterQueue.run() so that a
    flood cannot starve signals and timers (run() returns only when the socket is empty).
    netfilterqueue propagates callback exceptions out of run(); one netlink message is one
    packet, so no other packet is left without a verdict."""


class Daemon:
    def __init__(
        self,
        rules_path: str | Path,
        firewall: Firewall,
        queue_num: int = 0,
        max_sources: int = DEFAULT_MAX_SOURCES,
        logger: logging.Logger | None = None,
        clock=time.monotonic,
        queue_maxlen: int = DEFAULT_QUEUE_MAXLEN,
        state_dir: str | Path | None = None,
        wall_clock=time.time,
        control_socket: str | Path | None = None,
        metrics_port: int | None = None,
        pass_mark: int = PASS_MARK,
    ):
        self.rules_path = Path(rules_path)
        self.firewall = firewall
        self.queue_num = queue_num
        self.pass_mark = pass_mark  # the mark bit on packets handed back; the chain returns them
        self.queue_maxlen = queue_maxlen
        self.max_sources = max_sources
        self.reporter = Reporter()
        self.log_limit = RateLimit()
        self.log = logger or logging.getLogger("nfknock")
        self.clock = clock
        self.ruleset: Ruleset = load_rules(self.rules_path)  # RulesError: nothing touched yet
        self.engine = Engine(self.ruleset.doors, max_sources)
        self.stopping = False
        self._reload_requested = False
        self.unparsable: dict[str, int] = {}
        self.errors = 0
        self.handled = dict.fromkeys(Verdict, 0)
        self._budget = 0
        self.wall_clock = wall_clock
        self.control_socket = control_socket
        self.metrics_port = metrics_port
        self.control = None
        self.tallies: Counter = Counter()  # event tallies for the metrics
        self.replay_file = Path(state_dir) / "spa-replay.json" if state_dir else None
        self._load_replays()

    # -- the packet path -----------------------------------------------------------------

    def on_packet(self, queued) -> None:
        verdict = _DROP
        try:
            packet = parse(queued.get_payload())
            now = self.clock()
            decision = self.engine.handle(packet, now, self.wall_clock())
            verdict = decision.verdict
            if decision.events:
                log_events(self.log, decision.events, self.log_limit, now)
                if self.metrics_port:  # metrics are off by default: no per-event cost then
                    tally(self.tallies, decision.events)
            if self.engine.replays_changed:
                self._save_replays()
        except PacketError as exc:
            self.unparsable[exc.reason] = self.unparsable.get(exc.reason, 0) + 1
        except Exception:  # never let a packet kill the loop; drop it instead
            self.errors += 1
            if self.errors <= 10 or self.errors % 1000 == 0:
                self.log.exception("internal error on a packet (dropped; %d so far)", self.errors)
        finally:
            self.handled[verdict] += 1
            try:
                if verdict is _ACCEPT:
                    queued.accept()
                elif verdict is _PASS:
                    queued.set_mark(queued.get_mark() | self.pass_mark)
                    queued.repeat()  # back to the top of INPUT; our chain returns marked packets
                else:
                    queued.drop()
            except Exception:
                self.errors += 1
                if verdict is not _DROP:
                    try:
                        queued.drop()
                    except Exception:
                        pass

    # -- the SPA replay cache: on disk, so a restart never re-enables a captured packet ------

    def _load_replays(self) -> None:
        if self.replay_file is None or not self.replay_file.exists():
            return
        try:
            entries = json.loads(self.replay_file.read_text())
            self.engine.restore_replays({str(k): float(v) for k, v in entries.items()}, self.wall_clock())
        except (OSError, ValueError, AttributeError) as exc:
            raise NfknockError(f"{self.replay_file}: cannot read the SPA replay cache: {exc} (move it away to "
                               "start with an empty cache; captured packets younger than max_age then work once)"
                               ) from None

    def _save_replays(self) -> None:
        self.engine.replays_changed = False
        if self.replay_file is None:
            return
        try:
            self.replay_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.replay_file.with_suffix(".tmp")
            with open(tmp, "w") as out:
                json.dump(dict(self.engine.replays), out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.replay_file)
        except OSError as exc:
            self.log.error("cannot write the SPA replay cache %s: %s", self.replay_file, exc)

    def _on_queued(self, queued) -> None:
        self.on_packet(queued)
        self._budget -= 1
        if self._budget <= 0 or self.stopping or self._reload_requested:
            raise _YieldLoop

    # -- lifecycle -----------------------------------------------------------------------

    def run(self, ready=None) -> None:
        from netfilterqueue import NetfilterQueue

        queue = NetfilterQueue()
        try:
            queue.bind(self.queue_num, self._on_queued, max_len=self.queue_maxlen)
        except OSError as exc:
            raise QueueError(
                f"cannot bind NFQUEUE {self.queue_num}: {exc} "
                "(is another nfknock or NFQUEUE listener using it? pick another with --queue-num)"
            ) from None
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        previous = self._install_signals(wake_w)
        try:
            self._warn_about_flavour()
            self.firewall.apply(plan(self.ruleset.doors, self.queue_num, self.pass_mark))
            self._start_control()
            self._log_ready()
            sd_notify(f"READY=1\nSTATUS=guarding {len(self.ruleset.doors)} door(s) on queue {self.queue_num}")
            if ready is not None:
                ready()
            self._loop(queue, wake_r)
        finally:
            self._teardown(queue, previous)
            wake_r.close()
            wake_w.close()

    def _loop(self, queue, wake_r: socket.socket) -> None:
        queue_fd = queue.get_fd()
        next_stats = self.clock()
        while not self.stopping:
            deadline = self.engine.next_deadline()
            sleep = MAX_SLEEP if deadline is None else min(MAX_SLEEP, max(0.0, deadline - self.clock()))
            watched = [queue_fd, wake_r] + ([self.control] if self.control else [])
            readable, _, _ = select.select(watched, [], [], sleep)
            if self.control is not None and self.control in readable:
                self.control.serve_one()
            if queue_fd in readable:
                self._budget = BATCH
                try:
                    queue.run(block=False)
                except _YieldLoop:
                    pass
            if wake_r in readable:
                _drain(wake_r)
            if self._reload_requested:
                self._reload_requested = False
                sd_notify("RELOADING=1")
                self.reload()
                sd_notify("READY=1")
            now = self.clock()
            if deadline is not None and now >= deadline:
                log_events(self.log, self.engine.expire(now), self.log_limit, now)
            if now >= next_stats:
                next_stats = now + STATS_EVERY
                self.report_counters()

    def report_counters(self) -> None:
        lines = self.reporter.report(self.queue_num, read_queue_drops(self.queue_num), self.unparsable,
                                     self.engine.evicted, self.errors, self.max_sources)
        for line in lines + self.log_limit.held_back():
            self.log.warning("%s", line)

    def reload(self) -> bool:
        """Apply the rules on disk; on any problem keep the old rules and say why."""
        try:
            ruleset = load_rules(self.rules_path)
            self.firewall.apply(plan(ruleset.doors, self.queue_num, self.pass_mark))
        except NfknockError as exc:
            for line in str(exc).splitlines():
                self.log.error("reload refused, keeping the current rules: %s", line)
            return False
        dropped = self.engine.reload(ruleset.doors)
        self.ruleset = ruleset
        self.log.info(
            "reloaded %s: %d door(s)%s", self.rules_path, len(ruleset.doors),
            f"; state reset for changed door(s): {', '.join(dropped)}" if dropped else "",
        )
        return True

    def _teardown(self, queue, previous) -> None:
        sd_notify("STOPPING=1")
        if self.control is not None:
            self.control.close()
        for signum, handler in previous.items():
            try:
                signal.signal(signum, handler)
            except (ValueError, OSError):
                pass
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        self.report_counters()
        self.log.info(
            "handled %d packets: %d accepted, %d dropped, %d passed back; %d attempts and %d grants tracked",
            sum(self.handled.values()), self.handled[Verdict.ACCEPT], self.handled[Verdict.DROP],
            self.handled[Verdict.PASS], self.engine.tracked, len(self.engine.grants(self.clock())),
        )
        try:
            self.firewall.remove()
            self.log.info("scaffolding removed; nfknock stopped")
        except NfknockError as exc:
            self.log.error("could not remove the scaffolding: %s; run 'nfknock down'", exc)
        try:
            queue.unbind()
        except Exception:
            pass

    # -- control socket and metrics ----------------------------------------------------------

    def _start_control(self) -> None:
        if self.control_socket:
            try:
                self.control = ControlServer(self.control_socket, self.command)
            except OSError as exc:
                self.log.error("no control socket at %s: %s (status/revoke/grant will not work)",
                               self.control_socket, exc)
        if self.metrics_port:
            try:
                metrics.serve(self, self.metrics_port)
                self.log.info("metrics on http://127.0.0.1:%d/metrics", self.metrics_port)
            except OSError as exc:
                self.log.error("no metrics on 127.0.0.1:%d: %s", self.metrics_port, exc)

    def command(self, request: dict) -> dict:
        """One control request (from the loop, never concurrently with a packet)."""
        now = self.clock()
        verb = request.get("cmd")
        if verb == "status":
            return self.status(now)
        if verb == "revoke":
            doors = self.engine.revoke(str(request.get("address")), request.get("door"))
            self.log.info("%s: revoked by the operator (%s)", request.get("address"), ", ".join(doors) or "no grant")
            return {"revoked": doors}
        if verb == "grant":
            address, door, seconds = request.get("address"), request.get("door"), request.get("seconds")
            try:
                import ipaddress

                ipaddress.ip_address(address)
                until = self.engine.grant(address, door, float(seconds), now)
            except KeyError:
                return {"error": f"no door named {door!r}"}
            except (TypeError, ValueError):
                return {"error": f"grant needs an IP address and seconds, got {address!r} and {seconds!r}"}
            self.log.warning("%s: %s: break-glass grant for %gs by the operator", address, door, float(seconds))
            return {"granted": door, "address": address, "seconds": until - now}
        return {"error": f"unknown command {verb!r} (status, revoke, grant)"}

    def status(self, now: float) -> dict:
        drops = read_queue_drops(self.queue_num)
        return {
            "queue": self.queue_num,
            "firewall": self.firewall.name,
            "doors": [{"name": d.name, "kind": d.kind, "protect": [str(p) for p in d.protect]}
                      for d in self.ruleset.doors],
            "grants": [{"door": door, "source": src, "seconds_left": round(left, 1)}
                       for door, src, left in self.engine.grants(now)],
            "locked": [{"door": door, "source": src, "seconds_left": round(left, 1)}
                       for door, src, left in self.engine.locked(now)],
            "tracked_attempts": self.engine.tracked,
            "packets": {verdict.value: count for verdict, count in self.handled.items()},
            "unparsable": dict(self.unparsable),
            "internal_errors": self.errors,
            "evicted": self.engine.evicted,
            "kernel_queue_drops": drops.total if drops else 0,
        }

    def _install_signals(self, wake_w: socket.socket) -> dict:
        def stop(signum, frame):
            self.stopping = True

        def reload(signum, frame):
            self._reload_requested = True

        previous = {}
        for signum, handler in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, reload)):
            previous[signum] = signal.signal(signum, handler)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        return previous

    def _warn_about_flavour(self) -> None:
        if self.firewall.name == "legacy" and iptables_flavour() == "nf_tables":
            self.log.warning(
                "this host's 'iptables' is the nf_tables flavour but --firewall legacy was chosen; nfknock's "
                "rules live in the legacy tables: list them with 'iptables-legacy -S %s' (the kernel applies "
                "both)", "NFKNOCK"
            )

    def _log_ready(self) -> None:
        for door in self.ruleset.doors:
            if door.kind == "spa":
                self.log.info("door %s: SPA on %s protects %s (open_for %gs, max_age %gs)", door.name, door.port,
                              " ".join(map(str, door.protect)), door.open_for, door.max_age)
                continue
            self.log.info(
                "door %s: sequence %s%s protects %s (seq_timeout %gs, open_for %gs)",
                door.name, " ".join(map(str, door.sequence)) if door.sequence else
                f"rotating in {door.rotate.ports}/{door.rotate.proto} every {door.rotate.window:g}s",
                f", close {' '.join(map(str, door.close_sequence))}," if door.close_sequence else "",
                " ".join(map(str, door.protect)), door.seq_timeout, door.open_for,
            )
        self.log.info("ready: pid %d, queue %d, firewall %s", os.getpid(), self.queue_num, self.firewall.name)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(512):
            pass
    except BlockingIOError:
        pass
