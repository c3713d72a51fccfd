"""Stand-ins for the workers of a sharded daemon, for tests/netns/test_shard_rules.py. Run inside the
server namespace (`ip netns exec`), as root:

    python tests/support/shard_queues.py apply FLAVOUR BASE WORKERS DOOR_JSON
        creates the granted sets, installs plan((door,), BASE, workers=WORKERS) with the backend
        FLAVOUR (legacy or nft) and prints {"installed": backend.installed()} as JSON
    python tests/support/shard_queues.py listen BASE WORKERS
        binds the 2 * WORKERS queues of the workers, prints "ready", then one JSON line per packet
        ({"queue", "source", "proto", "dport"}) and drops it; until SIGTERM
    python tests/support/shard_queues.py remove FLAVOUR
        takes the scaffolding and every nfknock set away

Nothing here is part of nfknock; it calls the firewall backends the daemon uses.
"""

import json
import logging
import os
import select
import signal
import socket
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's nfknock, not an installed one

from nfknock.doors.first_steps import MarkHistory, decide  # noqa: E402
from nfknock.doors.rules import parse_door  # noqa: E402
from nfknock.firewall import make_firewall
from nfknock.firewall.granted import GrantedSets, destroy_all  # noqa: E402
from nfknock.firewall.plan import plan  # noqa: E402
from nfknock.firewall.shards import queues  # noqa: E402


def apply(flavour: str, base: int, workers: int, door: str) -> None:
    sets = GrantedSets(base, logging.getLogger("shard_queues"))
    sets.create()  # the rules refer to the granted sets
    sets.close()
    firewall = make_firewall(flavour)
    doors = (parse_door(json.loads(door)),)
    firewall.apply(plan(doors, base, workers=workers, first_steps=decide(doors, MarkHistory())))
    print(json.dumps({"installed": firewall.installed()}), flush=True)


def summary(payload: bytes) -> tuple[str, int, int]:
    """(source, IP protocol, destination port) of an IPv4 or IPv6 packet without extensions."""
    if payload[0] >> 4 == 4:
        source, proto, l4 = socket.inet_ntop(socket.AF_INET, payload[12:16]), payload[9], (payload[0] & 15) * 4
    else:
        source, proto, l4 = socket.inet_ntop(socket.AF_INET6, payload[8:24]), payload[6], 40
    return source, proto, struct.unpack_from("!H", payload, l4 + 2)[0]


def listen(base: int, workers: int) -> None:
    from netfilterqueue import NetfilterQueue

    def stop(signum, frame):
        raise KeyboardInterrupt

    def recorder(number: int):
        def record(packet) -> None:
            try:
                source, proto, dport = summary(packet.get_payload())
                print(json.dumps({"queue": number, "source": source, "proto": proto, "dport": dport}), flush=True)
            finally:
                packet.drop()

        return record

    signal.signal(signal.SIGTERM, stop)
    bound = []
    try:
        for shard in range(workers):
            for number in queues(base, shard):
                queue = NetfilterQueue()
                queue.bind(number, recorder(number))
                os.set_blocking(queue.get_fd(), False)
                bound.append(queue)
        print("ready", flush=True)
        served = {queue.get_fd(): queue for queue in bound}
        while True:
            readable, _, _ = select.select(list(served), [], [])
            for fd in readable:
                served[fd].run(block=False)
    except KeyboardInterrupt:
        pass
    finally:
        for queue in bound:
            queue.unbind()


def remove(flavour: str) -> None:
    make_firewall(flavour).remove()
    destroy_all()


if __name__ == "__main__":
    verb, *args = sys.argv[1:]
    if verb == "apply":
        apply(args[0], int(args[1]), int(args[2]), args[3])
    elif verb == "listen":
        listen(int(args[0]), int(args[1]))
    elif verb == "remove":
        remove(args[0])
    else:
        raise SystemExit(f"unknown verb {verb!r}")
