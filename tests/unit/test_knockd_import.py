"""import-knockd on real knockd.conf files: the Debian package's default, the seed's door, and
variants; what maps becomes valid doors, what does not is listed by line."""

from pathlib import Path

import yaml

from nfknock.cli import main
from nfknock.loading import load_rules
from nfknock.tools.knockd_import import import_knockd

CONFS = Path(__file__).parent / "knockd_conf"


def imported(name, tmp_path):
    result = import_knockd((CONFS / name).read_text())
    (tmp_path / "doors.yaml").write_text(result.yaml())
    return result, {door.name: door for door in load_rules(tmp_path).doors}


def test_debian_default(tmp_path):
    result, doors = imported("debian-default.conf", tmp_path)
    assert set(doors) == {"openSSH"}
    door = doors["openSSH"]
    assert [str(p) for p in door.sequence] == ["7000/tcp", "8000/tcp", "9000/tcp"]
    assert [str(p) for p in door.close_sequence] == ["9000/tcp", "8000/tcp", "7000/tcp"]
    assert [str(p) for p in door.protect] == ["22/tcp"] and door.seq_timeout == 5
    assert str(door.tcp_flags) == "syn"
    assert any(line.startswith("line 19: [openHTTPS]") and "knock_add" in line for line in result.unmapped)
    assert any(line.startswith("line 2: UseSyslog") for line in result.unmapped)


def test_seed_door_with_start_and_stop_commands(tmp_path):
    result, doors = imported("seed.conf", tmp_path)
    door = doors["openSSH"]
    assert [p.port for p in door.sequence] == [40000, 50000, 60000]
    assert door.seq_timeout == 25 and door.open_for == 10 and door.close_sequence is None
    assert [line.split(":")[0] for line in result.unmapped] == ["line 3", "line 4"]  # LogFile, Interface


def test_variants(tmp_path):
    result, doors = imported("variants.conf", tmp_path)
    assert set(doors) == {"openWeb", "openDNS"}
    web = doors["openWeb"]
    assert [str(p) for p in web.sequence] == ["2222/udp", "3333/tcp", "4444/udp"]
    assert [str(p) for p in web.close_sequence] == ["4444/udp", "3333/tcp", "2222/udp"]
    dns = doors["openDNS"]
    assert [str(p) for p in dns.protect] == ["53/udp"] and dns.open_for == 60 and str(dns.tcp_flags) == "syn,!ack"
    lost = "\n".join(result.unmapped)
    assert "[openDNS] target      = 10.0.0.5 (no nfknock equivalent)" in lost
    assert "[otp] has no sequence" in lost and "one_time_sequences" in lost
    assert "[mail] command     = /usr/bin/mail" in lost


def test_cli_writes_valid_yaml_and_lists_losses(tmp_path, capsys):
    out = tmp_path / "knockd.yaml"
    assert main(["import-knockd", str(CONFS / "debian-default.conf"), "-o", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["doors"][0]["name"] == "openSSH"
    err = capsys.readouterr().err
    assert "line 19: [openHTTPS]" in err and "NOT IMPORTED" in err


def test_cli_with_nothing_importable(tmp_path, capsys):
    conf = tmp_path / "k.conf"
    conf.write_text("[x]\n  sequence = 1,2\n  command = /bin/true\n")
    assert main(["import-knockd", str(conf)]) == 2
    assert "no door could be imported" in capsys.readouterr().err


def test_a_step_the_rules_cannot_take_skips_its_door_and_names_the_line():
    text = (
        "[good]\n  sequence = 7000:UDP, 8000\n  command = /sbin/iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT\n"
        "[bad]\n  sequence = 7000:icmp,8000\n  command = /sbin/iptables -A INPUT -s %IP% -p tcp --dport 23 -j ACCEPT\n"
    )
    result = import_knockd(text)
    assert [door["sequence"] for door in result.doors] == [["7000/udp", "8000/tcp"]]
    assert (
        "line 5: [bad] sequence = 7000:icmp,8000 ('7000:icmp': protocol must be tcp or udp, got 'icmp': door skipped)"
        in result.unmapped
    )
