"""Drop counters: read from the kernel's table, reported only when they grow."""

from nfknock.daemon.stats import (
    QueueCounters,
    QueueDrops,
    Reporter,
    parse_queue_table,
    read_queue_counters,
    read_queue_drops,
)

PROC = """\
    0  12345     0 2 65531     0     0        0  1
    7  23456    12 2 65531   904     3     5000  1
"""


def test_reads_the_right_queue(tmp_path):
    path = tmp_path / "nfnetlink_queue"
    path.write_text(PROC)
    assert read_queue_drops(7, path) == QueueDrops(904, 3)
    assert read_queue_drops(0, path) == QueueDrops(0, 0)
    assert read_queue_drops(9, path) is None
    assert read_queue_drops(7, tmp_path / "missing") is None


def test_reporter_speaks_only_of_growth():
    reporter = Reporter()
    assert reporter.report(7, QueueDrops(0, 0), {}, 0, 0, 100) == []
    assert "dropped 10 packets" in reporter.report(7, QueueDrops(10, 0), {}, 0, 0, 100)[0]
    assert reporter.report(7, QueueDrops(10, 0), {}, 0, 0, 100) == []
    (line,) = reporter.report(7, QueueDrops(30, 2), {}, 0, 0, 100)
    assert "dropped 22 packets" in line and "queue full: 20" in line and "socket buffer: 2" in line
    lines = reporter.report(7, QueueDrops(30, 2), {"empty": 2, "not tcp or udp": 1}, 5, 1, 100)
    assert lines == [
        "unparsable packets dropped since the last report: empty: 2, not tcp or udp: 1",
        "state full: 5 oldest entries evicted since the last report (--max-sources 100)",
        "1 packets dropped after internal errors since the last report",
    ]
    assert reporter.report(7, QueueDrops(30, 2), {"empty": 3, "not tcp or udp": 1}, 5, 1, 100) == [
        "unparsable packets dropped since the last report: empty: 1"
    ]


def test_one_parser_gives_every_counter_of_a_queue(tmp_path):
    path = tmp_path / "nfnetlink_queue"
    path.write_text(PROC)
    assert read_queue_counters(7, path) == QueueCounters(
        queue_num=7, peer_portid=23456, queue_total=12, dropped=904, user_dropped=3, id_sequence=5000
    )
    assert read_queue_counters(9, path) is None
    assert read_queue_counters(7, tmp_path / "missing") is None
    assert parse_queue_table("garbage\n\n" + PROC.splitlines()[0] + "\n    1  2  3\n").keys() == {0}
