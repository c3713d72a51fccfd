"""What one log line costs each handler, in microseconds (median of 5 runs of N lines), with the
stdlib handler it replaced as the baseline measured in the same run:
- --log-file: logging.FileHandler (before) vs ReopeningFileHandler (a stat of the path per line);
- under journald: the stream (stderr, to /dev/null here) vs the native socket (a local receiver
  drained by a thread; journald itself is not measured).
A figure of this machine under its current load, printed, never asserted.

    python bench/log_handlers.py [N]
"""

import logging
import os
import socket
import statistics
import sys
import tempfile
import time

from nfknock.daemon.journal import JournalHandler
from nfknock.daemon.logfile import ReopeningFileHandler
from nfknock.daemon.logs import log_events
from nfknock.doors.events import KnockAdvanced, Sequence


def per_line(handler: logging.Handler, lines: int) -> float:
    log = logging.getLogger(f"bench-{id(handler)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    event = [KnockAdvanced("10.0.0.2", "openSSH", Sequence.OPEN, 1)]
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(lines):
            log_events(log, event)
        runs.append((time.perf_counter() - start) / lines * 1e6)
    handler.close()
    return statistics.median(runs)


class Counted(logging.Handler):
    def __init__(self, inner: logging.Handler):
        super().__init__()
        self.inner, self.count = inner, 0

    def handle(self, record):  # type: ignore[override]
        self.count += 1
        return self.inner.handle(record)


def drain(sock: socket.socket) -> int:
    """A child process that reads `sock` until killed."""
    pid = os.fork()
    if pid == 0:
        try:
            while sock.recv(65536):
                pass
        finally:
            os._exit(0)
    sock.close()
    return pid


def main() -> None:
    lines = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    stamped = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory() as directory:
        results = {}
        for name, make in (
            ("FileHandler (before)", logging.FileHandler),
            ("ReopeningFileHandler", ReopeningFileHandler),
        ):
            handler = make(os.path.join(directory, f"{name[:4]}.log"))
            handler.setFormatter(stamped)
            results[name] = per_line(handler, lines)
        # journald's two doors, each drained by another process (as journald is): its stream
        # (a Unix stream socket, what stderr is under the unit) and its native datagram socket
        stream_ours, stream_theirs = socket.socketpair()
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(os.path.join(directory, "journal.socket"))
        drains = [drain(stream_theirs), drain(receiver)]
        stream_file = stream_ours.makefile("w")
        results["stream to journald (before)"] = per_line(logging.StreamHandler(stream_file), lines)
        fallback = logging.StreamHandler(stream_file)
        journal = JournalHandler(fallback, os.path.join(directory, "journal.socket"))
        counted = Counted(fallback)
        journal.fallback = counted
        results["JournalHandler (native)"] = per_line(journal, lines)
        print(f"(native: {counted.count} of {5 * lines} lines went to the stream: the socket's queue was full)")
        for pid in drains:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    for name, micros in results.items():
        print(f"{name:30s} {micros:6.2f} us/line")


if __name__ == "__main__":
    main()
