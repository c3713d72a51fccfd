"""The one error hierarchy. The CLI turns these into a one-line message and an exit code."""


class NfknockError(Exception):
    """Base of every error nfknock reports to a user."""

    exit_code = 1


class RulesError(NfknockError):
    """Rules that cannot be used. Each line of the message names file, door and field."""

    exit_code = 2

    def __init__(self, lines):
        self.lines = tuple(lines)
        super().__init__("\n".join(self.lines))


class PacketError(NfknockError):
    """A queued packet nfknock cannot use; `reason` is a short stable label for counters."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class FirewallError(NfknockError):
    """The scaffolding could not be installed or removed."""


class QueueError(NfknockError):
    """The NFQUEUE could not be bound (usually: another process holds the number)."""


class UsageError(NfknockError):
    """Bad command-line input that argparse cannot catch by itself."""

    exit_code = 2


class SpaError(NfknockError):
    """An SPA packet refused; `reason` is a short stable label (for counters and rate-limited
    logs), `detail` says what was wrong without any key material."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")
