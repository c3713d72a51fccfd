"""A baseline: the same rules and queue as nfknock, and a netfilterqueue callback that gives
every packet the same verdict (drop: the throughput baseline; accept: what the queue round trip
alone costs a new connection). Runs until SIGTERM; prints how many packets it saw."""

import signal
import sys
from dataclasses import replace

from netfilterqueue import NetfilterQueue

from nfknock.daemon import DEFAULT_QUEUE_MAXLEN
from nfknock.firewall import make_firewall, plan
from nfknock.loading import load_rules


def main(rules: str, queue_num: int, verdict: str) -> None:
    count = [0]

    def drop(packet):
        count[0] += 1
        packet.drop()

    def accept(packet):
        count[0] += 1
        packet.accept()

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    queue = NetfilterQueue()
    queue.bind(queue_num, accept if verdict == "accept" else drop, max_len=DEFAULT_QUEUE_MAXLEN)
    firewall = make_firewall("auto")
    # nfknock's chain, but every new connection straight to this one queue: no granted set (only
    # the daemon fills it) and no limit in front of the queue, so the baseline is the queue alone.
    scaffolding = {
        family: [replace(spec, limit=None) for spec in specs if spec.match_set is None]
        for family, specs in plan(load_rules(rules).doors, queue_num).items()
    }
    firewall.apply(scaffolding)
    print("ready", flush=True)
    try:
        queue.run()
    except KeyboardInterrupt:
        pass
    finally:
        firewall.remove()
        queue.unbind()
    print(count[0], flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "drop")
