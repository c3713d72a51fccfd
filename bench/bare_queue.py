"""A baseline: the same rules and queues as nfknock, and a netfilterqueue callback that gives
every packet the same verdict (drop: the throughput baseline; accept: what the queue round trip
alone costs a new connection). With WORKERS > 1, that many processes, each on the main queue of
its shard, with the scaffolding sharded as `nfknock run --workers` shards it. Runs until SIGTERM;
prints how many packets all of them saw.

    bare_queue.py RULES QUEUE [drop|accept] [WORKERS]
"""

import os
import signal
import sys
from dataclasses import replace

from netfilterqueue import NetfilterQueue

from nfknock.daemon.config import DEFAULT_QUEUE_MAXLEN
from nfknock.doors.first_steps import FirstSteps, MarkHistory
from nfknock.firewall import make_firewall
from nfknock.firewall.plan import scaffolding
from nfknock.firewall.plan import shard as shard_rules
from nfknock.firewall.shards import queues
from nfknock.loading import load_rules


def serve(queue_num: int, verdict: str, bound) -> int:
    """Give every packet of one queue the verdict until SIGTERM; returns how many there were."""
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
    bound()
    try:
        queue.run()
    except KeyboardInterrupt:
        pass
    finally:
        queue.unbind()
    return count[0]


def main(rules: str, queue_num: int, verdict: str, workers: int) -> None:
    children = []
    for shard in range(1, workers):
        ready_r, ready_w = os.pipe()
        count_r, count_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            count = serve(queues(queue_num, shard)[0], verdict, lambda ready_w=ready_w: os.write(ready_w, b"b"))
            os.write(count_w, str(count).encode())
            os._exit(0)
        os.read(ready_r, 1)
        children.append((pid, count_r))
    firewall = make_firewall("auto")
    # nfknock's chain, but every knock and new connection straight to the main queues: no first
    # step recorded by the kernel (no group), no granted set (only the daemon fills it) and no
    # limit in front of the queue, so the baseline is the queue alone.
    doors = load_rules(rules).doors
    none = FirstSteps((), {}, MarkHistory())
    chain = {}
    for family in (4, 6):
        specs = scaffolding(tuple(d for d in doors if family in d.families), queue_num, family=family, first_steps=none)
        chain[family] = [
            replace(spec, limit=None)
            for spec in shard_rules(specs, queue_num, family, workers)
            if spec.match_set is None
        ]

    def ready() -> None:
        firewall.apply(chain)
        print("ready", flush=True)

    total = 0
    try:
        total = serve(queue_num, verdict, ready)
    finally:
        firewall.remove()
        for pid, count_r in children:
            os.kill(pid, signal.SIGTERM)
            total += int(os.read(count_r, 64) or b"0")
            os.waitpid(pid, 0)
    print(total, flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], int(args[1]), args[2] if len(args) > 2 else "drop", int(args[3]) if len(args) > 3 else 1)
