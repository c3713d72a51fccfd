"""Stand-ins for what the daemon talks to, shared by the unit tests and bench/fuzz.py: a
firewall backend that records its calls, and a queued packet that records its verdicts."""

from __future__ import annotations


class FakeFirewall:
    """A firewall backend (nfknock.firewall.Firewall) that installs nothing and records each call."""

    name = "fake"

    def __init__(self, in_place=None):
        self.calls = []
        self.in_place = in_place or {}  # what installed() reports: rules an earlier run left

    def apply(self, plan):
        self.calls.append(("apply", plan))

    def remove(self):
        self.calls.append(("remove",))
        return True

    def installed(self):
        return self.in_place


class Queued:
    """Stands in for netfilterqueue.Packet; records verdicts."""

    def __init__(self, payload, mark=0):
        self.payload, self.verdicts, self.mark = payload, [], mark

    def get_payload(self):
        return self.payload

    def get_mark(self):
        return self.mark

    def set_mark(self, mark):
        self.mark = mark

    def repeat(self):
        self.verdicts.append("repeat")

    def accept(self):
        self.verdicts.append("accept")

    def drop(self):
        self.verdicts.append("drop")


class Numbered(Queued):
    """A queued packet with the kernel's id (netfilterqueue's Packet.id), for batch verdicts."""

    def __init__(self, payload, id, mark=0):
        super().__init__(payload, mark)
        self.id = id


class Wire:
    """Stands in for os.write on a queue's netlink socket (daemon/drops.py): keeps what was sent."""

    def __init__(self, fails=False):
        self.sent, self.fails = [], fails

    def __call__(self, fd, message):
        if self.fails:
            raise OSError(105, "No buffer space available")
        self.sent.append((fd, message))
        return len(message)

    @property
    def last_ids(self):
        """The id each batch verdict named (its last four bytes, big-endian)."""
        return [int.from_bytes(message[-4:], "big") for _, message in self.sent]
