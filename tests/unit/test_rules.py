"""Rules validation: every rejection names the file, the door and the field on one line."""

import textwrap
from pathlib import Path

import pytest

from nfknock.doors.rules import Port, parse_duration
from nfknock.errors import RulesError
from nfknock.loading import load_rules

REPO_RULES = Path(__file__).resolve().parents[2] / "rules"

GOOD_DOOR = """\
  - name: openSSH
    sequence: [40000, 50000, 60000]
    close_sequence: [60000, 50000, 40000]
    protect: [22/tcp]
"""


def write(tmp_path, text, name="doors.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def errors_for(path):
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert info.value.exit_code == 2
    for line in info.value.lines:
        assert "\n" not in line
    return list(info.value.lines)


def test_shipped_seed_door_is_the_one_the_issue_describes():
    ruleset = load_rules(REPO_RULES)
    (door,) = ruleset.doors
    assert [str(p) for p in door.sequence] == ["40000/tcp", "50000/tcp", "60000/tcp"]
    assert [str(p) for p in door.close_sequence] == ["60000/tcp", "50000/tcp", "40000/tcp"]
    assert [str(p) for p in door.protect] == ["22/tcp"]
    assert str(door.tcp_flags) == "syn,!ack"


def test_defaults_and_durations(tmp_path):
    path = write(
        tmp_path,
        """\
        doors:
          - name: web
            sequence: [1000/udp, "2000 / TCP", 3000]
            protect: [443, 8443/tcp]
            seq_timeout: 2m
            open_for: 500ms
            sources: [192.0.2.0/24]
        """,
    )
    (door,) = load_rules(path).doors
    assert [p.key for p in door.sequence] == [("udp", 1000), ("tcp", 2000), ("tcp", 3000)]
    assert door.seq_timeout == 120 and door.open_for == 0.5
    assert door.close_sequence is None
    assert str(door.sources[0]) == "192.0.2.0/24"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("10s", 10),
        ("2m", 120),
        ("1h", 3600),
        ("1.5s", 1.5),
        (7, 7),
        ("250ms", 0.25),
    ],
)
def test_duration_forms(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "door_fields,field,reason",
    [
        ("sequence: [40000, 70000]\n    protect: [22]", "sequence[2]", "outside 1..65535"),
        ("sequence: [0, 50000]\n    protect: [22]", "sequence[1]", "outside 1..65535"),
        ("sequence: [40000]\n    protect: [65536/tcp]", "protect[1]", "outside 1..65535"),
        ("sequence: []\n    protect: [22]", "sequence", "at least 1"),
        ("sequence: [1, 2]\n    protect: []", "protect", "at least 1"),
        ("sequence: [1, 2]\n    close_sequence: []\n    protect: [22]", "close_sequence", "at least 1"),
        ("sequence: [1, 22, 3]\n    protect: [22]", "openSSH'", "both a knock port and a protected port"),
        (
            "sequence: [1, 2]\n    close_sequence: [1, 2]\n    protect: [22]",
            "openSSH'",
            "close_sequence equals sequence",
        ),
        ("sequence: [1, 1, 2]\n    protect: [22]", "sequence", "repeats step 1"),
        ("sequence: [1, 2/icmp]\n    protect: [22]", "sequence[2]", "tcp or udp"),
        ("sequence: [1, 2]\n    protect: [22]\n    open_for: soon", "open_for", "invalid duration"),
        ("sequence: [1, 2]\n    protect: [22]\n    seq_timeout: 0s", "seq_timeout", "more than 0"),
        ("sequence: [1, 2]\n    protect: [22]\n    tcp_flags: syn,bogus", "tcp_flags", "unknown TCP flag"),
        ("sequence: [1, 2]\n    protect: [22]\n    sources: [10.0.0.1/8]", "sources[1]", "host bits"),
        ("sequence: [1, 2]\n    protect: [22]\n    colour: red", "colour", "unknown key"),
        ("sequence: [1, 2]\n    protect: [22, 22]", "openSSH'", "protect lists a port twice"),
    ],
)
def test_each_bad_field_is_named(tmp_path, door_fields, field, reason):
    path = write(tmp_path, f"doors:\n  - name: openSSH\n    {door_fields}\n")
    (line,) = errors_for(path)
    assert line.startswith(f"{path}: door 'openSSH'")
    assert field in line and reason in line


def test_door_without_name_is_named_by_position(tmp_path):
    path = write(tmp_path, "doors:\n" + GOOD_DOOR + "  - sequence: [1, 2]\n    protect: [80]\n")
    assert errors_for(path) == [f"{path}: door #2: name: required"]


def test_duplicate_door_names_across_files(tmp_path):
    write(tmp_path, "doors:\n" + GOOD_DOOR, "a.yaml")
    b = write(tmp_path, "doors:\n  - name: openSSH\n    sequence: [1, 2]\n    protect: [80]\n", "b.yaml")
    (line,) = errors_for(tmp_path)
    assert line.startswith(f"{b}: door 'openSSH': name: duplicate door name")
    assert "a.yaml" in line


def test_two_doors_with_the_same_open_sequence(tmp_path):
    path = write(
        tmp_path, "doors:\n" + GOOD_DOOR + "  - name: web\n    sequence: [40000, 50000, 60000]\n    protect: [80]\n"
    )
    (line,) = errors_for(path)
    assert "door 'web': sequence: same open sequence as door 'openSSH'" in line


def test_knock_port_of_one_door_protected_by_another(tmp_path):
    path = write(tmp_path, "doors:\n" + GOOD_DOOR + "  - name: web\n    sequence: [1, 2]\n    protect: [50000]\n")
    (line,) = errors_for(path)
    assert "door 'web': protect: 50000/tcp is a knock port of door 'openSSH'" in line


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    path = write(tmp_path, "doors:\n  - name: a\n    sequence: [70000]\n    protect: [22]\n    open_for: x\n")
    assert len(errors_for(path)) == 2


@pytest.mark.parametrize(
    "text,reason",
    [
        ("doors: [\n", "invalid YAML: line"),
        ("- just a list\n", "expected a mapping with a 'doors:' list"),
        ("doors: []\n", "doors: List should have at least 1 item"),
        ("door:\n" + GOOD_DOOR, "door: unknown key"),
    ],
)
def test_file_level_problems(tmp_path, text, reason):
    path = write(tmp_path, text)
    lines = errors_for(path)
    assert any(line.startswith(str(path)) and reason in line for line in lines), lines


def test_missing_and_empty_locations(tmp_path):
    assert errors_for(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: no such file or directory"]
    assert "no rule files" in errors_for(tmp_path)[0]


def test_unreadable_file(tmp_path):
    path = write(tmp_path, "\xff\xfe")
    path.write_bytes(b"\xff\xfe\x00bad")
    (line,) = errors_for(path)
    assert line.startswith(f"{path}: cannot read")


def test_knockd_port_spelling_is_taken_in_rules_files(tmp_path):
    """A knockd sequence pasted as it is (`7000:udp`), in flow and block lists, reads as 7000/udp."""
    path = write(
        tmp_path,
        """\
        doors:
          - name: pasted
            sequence: [7000:udp, 8000:tcp, 9000, 9100/udp]
            close_sequence:
              - 9000:UDP
              - 8000
            protect: [22:tcp]
        """,
    )
    (door,) = load_rules(path).doors
    assert [str(p) for p in door.sequence] == ["7000/udp", "8000/tcp", "9000/tcp", "9100/udp"]
    assert [str(p) for p in door.close_sequence] == ["9000/udp", "8000/tcp"]
    assert [str(p) for p in door.protect] == ["22/tcp"]
    for bad, says in (
        ("7000:icmp", "protocol must be tcp or udp"),
        ("7000:", "expected a port"),
        ("7000/:udp", "expected a port"),
    ):
        with pytest.raises(ValueError, match=says):
            Port.model_validate(bad)


def test_port_text_forms():
    assert Port.model_validate("53/UDP").key == ("udp", 53)
    assert Port.model_validate(22).key == ("tcp", 22)
    with pytest.raises(ValueError):
        Port.model_validate(True)


def _pairwise_conflicts(doors, path):
    """The definition of the checks between doors, as the first version wrote it: every door
    against every earlier one. Quadratic; the reference the indexed checks must agree with."""
    out = []
    for n, door in enumerate(doors):
        here = f"{path}: door {door.name!r}"
        for other in doors[:n]:
            there = f"door {other.name!r} in {path}"
            if other.name == door.name:
                out.append(f"{here}: name: duplicate door name (also {there})")
            if getattr(other, "sequence", None) is not None and other.sequence == getattr(door, "sequence", None):
                out.append(f"{here}: sequence: same open sequence as {there}")
            out += [
                f"{here}: sequence: {p} is a protected port of {there}" for p in door.knock_ports if p in other.protect
            ]
            out += [
                f"{here}: rotate: {p} is a protected port of {there}"
                for proto, first, last in door.knock_ranges
                for p in other.protect
                if p.proto == proto and first <= p.port <= last
            ]
            out += [
                f"{here}: protect: {p} is in the rotating range of {there}"
                for proto, first, last in other.knock_ranges
                for p in door.protect
                if p.proto == proto and first <= p.port <= last
            ]
            out += [f"{here}: protect: {p} is a knock port of {there}" for p in door.protect if p in other.knock_ports]
    return out


def test_conflicts_between_many_doors_are_all_found(tmp_path, monkeypatch):
    import random

    import yaml

    from nfknock.doors.rules import parse_door

    monkeypatch.setenv("ROT_SECRET", "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0")
    rng = random.Random(7)
    ports = [f"{rng.randint(1, 60)}/{rng.choice(['tcp', 'udp'])}" for _ in range(40)]
    raw = []
    while len(raw) < 300:
        fields = {"name": f"d{rng.randint(1, 200)}", "protect": rng.sample(ports, rng.randint(1, 3))}
        if rng.random() < 0.1:
            first = rng.randint(1, 40)
            fields["rotate"] = {
                "secret_env": "ROT_SECRET",
                "length": 2,
                "ports": f"{first}-{first + 20}",
                "proto": rng.choice(["tcp", "udp"]),
            }
        else:
            fields["sequence"] = rng.sample(ports[:12], 2)
            if rng.random() < 0.3:
                fields["close_sequence"] = rng.sample(ports, 2)
        try:
            parse_door(fields)
        except ValueError:
            continue  # wrong on its own; only conflicts between doors are under test here
        raw.append(fields)
    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump({"doors": raw}))
    expected = _pairwise_conflicts([parse_door(d) for d in raw], path)
    assert len(expected) > 300  # every kind of conflict, many times over
    for kind in (
        "name: duplicate door name",
        "sequence: same open sequence",
        "is a protected port of",
        "rotate: ",
        "is in the rotating range of",
        "is a knock port of",
    ):
        assert any(kind in line for line in expected), kind
    assert errors_for(path) == expected


def test_ten_thousand_doors_load(tmp_path):
    lines = ["doors:"]
    for i in range(10_000):
        first = 20000 + i * 4
        lines.append(f"  - {{name: d{i}, sequence: [{first}, {first + 1}, {first + 2}], protect: [{1 + i}]}}")
    path = tmp_path / "big.yaml"
    path.write_text("\n".join(lines) + "\n")
    ruleset = load_rules(path)
    assert len(ruleset.doors) == 10_000
    assert [str(p) for p in ruleset.door("d9999").sequence] == ["59996/tcp", "59997/tcp", "59998/tcp"]


@pytest.mark.parametrize("name", ["2026-02-30", "2026-02-28", "2001-12-14"])
def test_date_like_door_names_are_names(tmp_path, name):
    # PyYAML's safe_load makes dates of these (and raises ValueError on 2026-02-30): rules have no dates.
    path = write(tmp_path, f"doors: [{{name: {name}, sequence: [1, 2, 3], protect: [22/tcp]}}]\n")
    assert [door.name for door in load_rules(path).doors] == [name]


def test_anchors_and_aliases_still_work(tmp_path):
    path = write(
        tmp_path,
        """\
        doors:
          - &ssh {name: a, sequence: [1, 2], protect: &both [22/tcp, 2222/tcp], open_for: 1m}
          - {name: b, sequence: [3, 4], protect: *both}
          - {<<: *ssh, name: c, sequence: [5, 6]}
        """,
    )
    doors = load_rules(path).doors
    assert [(d.name, [str(p) for p in d.protect], d.open_for) for d in doors] == [
        ("a", ["22/tcp", "2222/tcp"], 60),
        ("b", ["22/tcp", "2222/tcp"], 30),
        ("c", ["22/tcp", "2222/tcp"], 60),
    ]


@pytest.mark.parametrize(
    "loader", __import__("nfknock.doors.yamlsafe").doors.yamlsafe.LOADERS, ids=lambda c: c.__name__
)
@pytest.mark.parametrize(
    "text,reason",
    [
        ("doors: " + "[" * 600 + "]" * 600, "nested more than 16 levels deep"),
        (
            "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
            ),
            "more than 250000 YAML nodes once aliases are expanded",
        ),
        ("a: &a [1, *a]", "an alias refers to a node that contains it"),
        ("a: &a [1]\nb: {x: " + "[" * 14 + "*a" + "]" * 14 + "}", "nested more than 16 levels deep"),
    ],
)
def test_yaml_shape_limits_with_and_without_libyaml(loader, text, reason):
    from nfknock.doors import yamlsafe

    with pytest.raises(yamlsafe.LimitError, match=reason):
        yamlsafe.load(text, loader)


def test_file_over_the_size_limit_is_refused_unread(tmp_path):
    from nfknock.loading import MAX_RULES_BYTES

    path = write(tmp_path, "doors:\n" + GOOD_DOOR + "#" * MAX_RULES_BYTES + "\n")
    assert errors_for(path) == [
        f"{path}: cannot read: larger than 1024 KiB; put the doors in several files of a rules directory"
    ]


def test_a_fifo_is_refused_not_waited_for(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.yaml")
    assert errors_for(tmp_path) == [f"{tmp_path / 'pipe.yaml'}: cannot read: not a regular file"]


def test_huge_values_are_cut_in_messages(tmp_path):
    wide = "[" + ", ".join(["lol"] * 5000) + "]"
    path = write(
        tmp_path,
        f"doors: [{{name: {'n' * 5000}, sequence: [1, 2], protect: [22], "
        f"open_for: {wide}, tcp_flags: {wide}, sources: [{'a' * 5000}]}}]\n",
    )
    lines = errors_for(path)
    assert len(lines) == 4
    assert all(len(line) < len(str(path)) + 400 for line in lines), lines  # the file had 40 KB of values


def test_problems_of_one_file_are_capped(tmp_path):
    path = write(tmp_path, "doors: [{name: a, sequence: [1, 2], protect: [" + ", ".join(["x"] * 5000) + "]}]\n")
    lines = errors_for(path)
    assert len(lines) == 21
    assert lines[-1] == f"{path}: 4980 more problems not listed"


def test_load_rules_raises_only_rules_errors(tmp_path, monkeypatch):
    from nfknock import loading
    from nfknock.doors import rules

    path = write(tmp_path, "doors:\n" + GOOD_DOOR)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(rules.RuleFile, "model_validate", broken)
    assert errors_for(path) == [f"{path}: cannot load: RuntimeError: a bug"]
    monkeypatch.setattr(loading, "_conflicts", broken)
    assert errors_for(tmp_path) == [f"{tmp_path}: cannot load: RuntimeError: a bug"]
