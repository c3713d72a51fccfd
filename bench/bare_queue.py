"""The baseline for the throughput benchmark: the same rules and queue as nfknock, and a
netfilterqueue callback that only drops. Runs until SIGTERM; prints how many it dropped."""

import signal
import sys

from netfilterqueue import NetfilterQueue

from nfknock.daemon import DEFAULT_QUEUE_MAXLEN
from nfknock.firewall import scaffolding
from nfknock.firewall.legacy import LegacyFirewall
from nfknock.rules import load_rules


def main(rules: str, queue_num: int) -> None:
    count = [0]

    def drop(packet):
        count[0] += 1
        packet.drop()

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    queue = NetfilterQueue()
    queue.bind(queue_num, drop, max_len=DEFAULT_QUEUE_MAXLEN)
    firewall = LegacyFirewall()
    firewall.apply(scaffolding(load_rules(rules).doors, queue_num))
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
    main(sys.argv[1], int(sys.argv[2]))
