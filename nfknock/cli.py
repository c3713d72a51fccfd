"""Command-line entry points. Errors become one line on stderr and an exit code here only."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .daemon.control import DEFAULT_SOCKET
from .doors.rules import Port, RotatingDoor, SpaDoor
from .errors import NfknockError, UsageError
from .loading import load_rules
from .tools.client import DEFAULT_REPEAT

DEFAULT_RULES = "/etc/nfknock/rules"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    try:
        return args.func(args) or 0
    except NfknockError as exc:
        priority = _journal_error_prefix()
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"{priority}nfknock: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _journal_error_prefix() -> str:
    """ "<3>" (error) when stderr is the journal's stream (a unit that fails to start: `journalctl
    -p err` shows why), nothing on a terminal."""
    from .daemon.logs import to_journal

    return "<3>" if to_journal() else ""


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    # argparse stops filling `knock`'s PORT list at the first option (`knock HOST -u 1 2`);
    # ports after an option come back as extras and are put where they belong.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.verb == "knock" and not any(e.startswith("-") for e in extra):
            args.ports += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nfknock",
        description="Inline port knocking: knock ports and new connections to protected ports go "
        "through an NFQUEUE; no per-client firewall rule is ever written.",
    )
    parser.add_argument("--version", action="version", version=f"nfknock {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    run = verbs.add_parser("run", help="run the daemon in the foreground (SIGHUP reloads the rules)")
    run.add_argument("--rules", default=DEFAULT_RULES, help="rules file or directory of *.yaml (default: %(default)s)")
    run.add_argument(
        "--queue-num",
        type=_queue_num,
        default=0,
        help="NFQUEUE number N, 0-65534: knocks go to N, new connections from granted sources to N+1 "
        "(default: %(default)s)",
    )
    _add_workers(run)
    run.add_argument(
        "--max-sources",
        type=_positive,
        default=65536,
        help="most knock attempts (and, separately, grants) tracked at once; the oldest "
        "is dropped when full (default: %(default)s)",
    )
    run.add_argument(
        "--queue-maxlen",
        type=_int_in(16, 1_000_000, "queue length"),
        default=4096,
        help="packets the kernel holds for nfknock before it drops (default: %(default)s)",
    )
    run.add_argument(
        "--firewall",
        choices=("auto", "legacy", "nft"),
        default="auto",
        help="iptables flavour for the rules: auto follows the host's 'iptables' (default)",
    )
    run.add_argument(
        "--interface",
        metavar="IFACE",
        help="guard only packets arriving on IFACE (default: every interface); the protected "
        "ports on other interfaces then follow the rest of your firewall",
    )
    run.add_argument(
        "--state-dir",
        default="/var/lib/nfknock",
        help="where the SPA replay cache is kept across restarts (default: %(default)s)",
    )
    run.add_argument(
        "--control-socket",
        default=DEFAULT_SOCKET,
        help="unix socket (mode 0600) for status/revoke/grant; '' for none (default: %(default)s)",
    )
    listen = run.add_mutually_exclusive_group()
    listen.add_argument(
        "--metrics-port",
        type=_int_in(1, 65535, "port"),
        help="serve Prometheus metrics on 127.0.0.1:PORT (off by default)",
    )
    listen.add_argument(
        "--metrics-listen",
        type=_listen,
        metavar="ADDR:PORT",
        help="serve Prometheus metrics on this address: an IP literal, IPv6 in brackets "
        "(127.0.0.1:9474, [::1]:9474, 0.0.0.0:9474 for every interface); off by default",
    )
    run.add_argument("--log-file", help="append log lines to this file instead of stderr")
    run.add_argument("--syslog", action="store_true", help="also log to syslog (facility daemon)")
    run.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text: knockd-compatible lines (default); json: one JSON object per line",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="also log refused connections")
    _add_pass_mark(run)
    _add_cluster(run)
    run.set_defaults(func=cmd_run)

    check = verbs.add_parser("check", help="validate the rules and print the doors and the rules they install")
    check.add_argument("--rules", default=DEFAULT_RULES, help="rules file or directory (default: %(default)s)")
    check.add_argument("--queue-num", type=_queue_num, default=0, help="queue number to show in the rules")
    check.add_argument(
        "--strict",
        action="store_true",
        help="refuse what the daemon refuses (rules or key files others may write or read) instead of warning; "
        "the systemd unit's reload checks this way before it signals",
    )
    _add_workers(check)
    _add_pass_mark(check)
    _add_json(check, '"ok", "exit_code", "errors", "warnings", "doors", "rules_installed"')
    check.set_defaults(func=cmd_check)

    knock = verbs.add_parser("knock", help="knock on a host: PORT[/tcp|/udp]... or a door's sequence")
    knock.add_argument("host")
    knock.add_argument("ports", nargs="*", metavar="PORT[/PROTO]")
    knock.add_argument("--delay", type=_non_negative, default=0, metavar="MS", help="pause between steps")
    knock.add_argument(
        "--repeat",
        type=_int_in(1, 1000, "repeat"),
        default=DEFAULT_REPEAT,
        metavar="N",
        help="send every step N times, back to back (default: %(default)s); nfknock takes the copies of a "
        "step as one knock, so on a lossy or flooded link a lost packet costs nothing",
    )
    knock.add_argument("--door", help="knock this door's sequence (needs --rules)")
    knock.add_argument("--rules", help="rules file or directory holding --door")
    knock.add_argument("--close", action="store_true", help="with --door: knock the close sequence")
    knock.add_argument("-u", "--udp", action="store_true", help="send every PORT without /proto as UDP")
    family = knock.add_mutually_exclusive_group()
    family.add_argument("-4", dest="family", action="store_const", const=4, default=0, help="knock over IPv4")
    family.add_argument(
        "-6",
        dest="family",
        action="store_const",
        const=6,
        help="knock over IPv6 (a knock opens the door for the address it came from only)",
    )
    knock.set_defaults(func=cmd_knock)

    doctor = verbs.add_parser("doctor", help="check this host for what would make nfknock fail or leak")
    doctor.add_argument("--rules", default=DEFAULT_RULES, help="rules file or directory (default: %(default)s)")
    doctor.add_argument("--queue-num", type=_queue_num, default=0, help="the queue nfknock will use")
    doctor.add_argument(
        "--firewall", choices=("auto", "legacy", "nft"), default="auto", help="the backend nfknock will use"
    )
    _add_workers(doctor)
    _add_pass_mark(doctor)
    _add_json(doctor, '"ok", "exit_code", "errors", "findings" (level ok/warn/fail, text), "counts"')
    doctor.add_argument("--cluster", metavar="URL", help="also check the fleet's Redis deployment (redis://...)")
    doctor.add_argument("--cluster-password-file", metavar="FILE", help="Redis AUTH password (mode 0600)")
    doctor.set_defaults(func=cmd_doctor)

    export = verbs.add_parser(
        "export",
        help="print the host firewall manager's base rule that keeps the protected ports closed through its reloads",
    )
    export.add_argument("manager", choices=("nftables", "iptables", "firewalld", "ufw"), help="the firewall manager")
    export.add_argument("--rules", default=DEFAULT_RULES, help="rules file or directory (default: %(default)s)")
    _add_pass_mark(export)
    export.set_defaults(func=cmd_export)

    spa = verbs.add_parser("spa", help="send one SPA packet (fwknop-compatible) to open an SPA door")
    spa.add_argument("host")
    spa.add_argument("--door", required=True, help="the SPA door (keys, port and protected ports come from it)")
    spa.add_argument("--rules", required=True, help="rules file or directory holding --door")
    spa.add_argument(
        "--access", nargs="+", metavar="PORT/PROTO", help="ports to ask for (default: all the door protects)"
    )
    spa.add_argument(
        "--allow-ip", help="address to put inside the packet (default: this host's source address towards HOST)"
    )
    spa.add_argument("--key", help="which of the door's keys to use (needed when it has several)")
    spa.add_argument(
        "--user", default="nfknock", help="the username in the packet, as fwknop -U (default: %(default)s)"
    )
    spa.add_argument(
        "--fw-timeout",
        type=_int_in(1, 86400, "timeout"),
        metavar="SECONDS",
        help="ask for this long, as fwknop -f (the door grants at most its max_open_for)",
    )
    spa.add_argument(
        "--repeat",
        type=_int_in(1, 20, "repeat"),
        default=1,
        metavar="N",
        help="send the packet N times, 100 ms apart (default: %(default)s): copies are harmless replays, and "
        "one of them gets through a junk flood that fills the server's queue (docs/spa-flood.md)",
    )
    spa.set_defaults(func=cmd_spa)

    otp = verbs.add_parser(
        "otp",
        help="print a rotating door's current sequence (for any knock client, e.g. knock HOST $(nfknock otp ...))",
    )
    otp.add_argument("--door", required=True)
    otp.add_argument("--rules", required=True, help="rules file or directory holding --door")
    otp.set_defaults(func=cmd_otp)

    schema = verbs.add_parser("schema", help="print the JSON Schema of rules files (for editor validation)")
    schema.set_defaults(func=cmd_schema)

    status = verbs.add_parser(
        "status",
        help="doors, live grants (source, time left), lockouts and counters of the running daemon; exits 3 "
        "while it runs on its last good rules (the rules on disk did not load at start)",
    )
    revoke = verbs.add_parser(
        "revoke", help="end the grants of an address, or of an SPA key, now (established connections stay)"
    )
    revoke.add_argument("address", nargs="?")
    revoke.add_argument("--key", help="end the grants opened with this SPA key (a person), from any address")
    revoke.add_argument("--door", help="only this door (default: all)")
    grant = verbs.add_parser("grant", help="break-glass: let an address open new connections through a door")
    grant.add_argument("address")
    grant.add_argument("--door", required=True)
    grant.add_argument("--for", dest="duration", required=True, metavar="DURATION", help="e.g. 10m, 1h")
    for verb, func in ((status, cmd_status), (revoke, cmd_revoke), (grant, cmd_grant)):
        verb.add_argument(
            "--control-socket", default=DEFAULT_SOCKET, help="the daemon's control socket (default: %(default)s)"
        )
        verb.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
        verb.set_defaults(func=func)

    importer = verbs.add_parser(
        "import-knockd", help="turn a knockd.conf into nfknock doors (YAML) and list what cannot be carried over"
    )
    importer.add_argument("config", help="the knockd.conf to read")
    importer.add_argument("-o", "--output", help="write the doors here (default: standard output)")
    importer.set_defaults(func=cmd_import_knockd)

    fwknop = verbs.add_parser(
        "import-fwknop",
        help="turn fwknopd's access.conf into an SPA door (YAML) and a key file per stanza; list what cannot be",
    )
    fwknop.add_argument("config", help="the access.conf to read")
    fwknop.add_argument("--keys-dir", required=True, help="where to write the key files (made 0700; files 0600)")
    fwknop.add_argument("-o", "--output", help="write the door here (default: standard output)")
    fwknop.add_argument("--door", default="fwknop", help="the door's name (default: %(default)s)")
    fwknop.add_argument(
        "--protect",
        nargs="+",
        default=["22/tcp"],
        metavar="PORT/PROTO",
        help="ports for stanzas without OPEN_PORTS (fwknopd opens whatever they ask; default: %(default)s)",
    )
    fwknop.set_defaults(func=cmd_import_fwknop)

    keygen = verbs.add_parser(
        "keygen",
        help="a fresh SPA key pair: printed as fwknop --key-gen prints it, or with --name written as a key file",
    )
    keygen.add_argument(
        "--name", help="write NAME.keys (mode 0600) for an SPA door's keys_dir and print the client's command line"
    )
    keygen.add_argument("--dir", default=".", help="with --name: the directory to write it in (default: %(default)s)")
    keygen.add_argument("--username", help="with --name: the username the key requires (the client sends it with -U)")
    keygen.add_argument(
        "--sources", nargs="+", metavar="NETWORK", help="with --name: networks the key may be used from"
    )
    keygen.add_argument(
        "--expires", metavar="DATE", help="with --name: the key stops working on this date (2027-01-31)"
    )
    keygen.add_argument("--ports", nargs="+", metavar="PORT/PROTO", help="with --name: ports the key may open")
    keygen.add_argument("--server", default="SERVER", help="the server's address in the printed command line")
    keygen.set_defaults(func=cmd_keygen)

    down = verbs.add_parser(
        "down",
        help="remove nfknock's firewall rules, both iptables flavours, both families (after a daemon was killed)",
    )
    down.add_argument(
        "--firewall",
        choices=("legacy", "nft"),
        help="only this flavour's chain (one an earlier run left there while a daemon runs with the other), "
        "and the sets no other chain uses",
    )
    down.set_defaults(func=cmd_down)
    return parser


def _add_json(verb: argparse.ArgumentParser, keys: str) -> None:
    verb.add_argument(
        "--json",
        action="store_true",
        help=f"print one JSON object on stdout, errors included (keys: {keys}); the exit code is unchanged",
    )


def _add_pass_mark(verb: argparse.ArgumentParser) -> None:
    from .firewall.plan import PASS_MARK

    verb.add_argument(
        "--pass-mark",
        type=_pass_mark,
        default=PASS_MARK,
        metavar="0xHEX",
        help="the packet-mark bit nfknock sets on tripwire packets it hands back (its chain "
        f"returns packets carrying it); pick one no other rule of this host uses (default: {PASS_MARK:#x})",
    )


def _add_cluster(run: argparse.ArgumentParser) -> None:
    fleet = run.add_argument_group("fleet mode (members share grants, revocations and replay records through Redis)")
    fleet.add_argument("--cluster", metavar="URL", help="redis://HOST:PORT/DB or rediss://... (off by default)")
    fleet.add_argument("--cluster-key-file", metavar="FILE", help="the fleet key (base64, >= 32 bytes; mode 0600)")
    fleet.add_argument("--cluster-password-file", metavar="FILE", help="Redis AUTH password (mode 0600)")
    fleet.add_argument(
        "--cluster-name", default="nfknock", help="fleets sharing one Redis need different names (default: %(default)s)"
    )
    fleet.add_argument("--cluster-member", default="", help="this member's name in status and logs (default: hostname)")
    fleet.add_argument(
        "--cluster-offline",
        choices=("accept", "refuse"),
        default="accept",
        help="SPA and rotating doors while Redis cannot be asked: accept with this member's replay check "
        "(default) or refuse",
    )


def _pass_mark(text: str) -> int:
    from .firewall.plan import parse_pass_mark

    try:
        return parse_pass_mark(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"pass mark {exc}") from None


def _int_in(low: int, high: int, what: str):
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be in {low}..{high}, got {value}")
        return value

    return convert


def _listen(text: str) -> tuple[str, int]:
    from .daemon.metrics import parse_listen

    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_queue_num = _int_in(0, 65534, "queue number")
_positive = _int_in(1, 100_000_000, "value")
_non_negative = _int_in(0, 3_600_000, "delay")


def cmd_run(args) -> int:
    from pathlib import Path

    from .daemon import Daemon, DaemonConfig
    from .daemon.config import sd_notify
    from .daemon.lastgood import starting_rules
    from .daemon.logs import setup_logging
    from .firewall import make_firewall

    try:
        logger = setup_logging(args.log_file, args.syslog, args.verbose, args.log_format)
    except OSError as exc:
        raise UsageError(f"cannot open the log: {exc}") from None
    import faulthandler

    try:
        faulthandler.enable()  # a SIGABRT (systemd's watchdog) prints every thread's stack to stderr (the journal)
    except (OSError, ValueError):
        pass  # stderr is not a file (an embedding caller, tests): no stacks, nothing else changes
    _check_queues(args)
    config = DaemonConfig(
        rules_path=Path(args.rules),
        queue_num=args.queue_num,
        workers=args.workers,
        max_sources=args.max_sources,
        queue_maxlen=args.queue_maxlen,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        control_socket=Path(args.control_socket) if args.control_socket else None,
        **_metrics_listen(args),
        pass_mark=args.pass_mark,
        fleet=_fleet(args),
    )
    firewall = make_firewall(args.firewall, args.interface)
    # The rules on disk, or the last good ones (loudly), or ports closed and a non-zero exit.
    ruleset, last_good = starting_rules(
        config.rules_path,
        config.state_dir,
        logger,
        firewall.apply,
        config.queue_num,
        config.pass_mark,
        notify=sd_notify,
    )
    Daemon(config, firewall, logger, ruleset=ruleset, last_good=last_good).run()
    return 0


def _metrics_listen(args) -> dict:
    """DaemonConfig's metrics fields from --metrics-port PORT (localhost) or --metrics-listen."""
    if args.metrics_listen is not None:
        addr, port = args.metrics_listen
        return {"metrics_addr": addr, "metrics_port": port}
    return {"metrics_port": args.metrics_port}


def _add_workers(parser) -> None:
    parser.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N|auto",
        help="verdict loops, each a process on its own pair of queues (N+2i, N+2i+1), packets shared "
        "out by source address; auto: one per CPU this process may use, at most 16 (default: 1)",
    )


def _workers(text: str) -> int:
    import os

    from .firewall.shards import MAX_WORKERS

    if text == "auto":
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    return _int_in(1, MAX_WORKERS, "worker count")(text)


# Where the gateway doors' chains hang (docs/gateway.md), by the suffix of their key in `check`'s rules.
GATEWAY_WHERE = {
    "forward": "filter table, chain jumped to from FORWARD position 1",
    "nat": "nat table, chain jumped to from PREROUTING position 1",
}


def _gateway_specs(planned) -> dict[str, list[str]]:
    """The gateway doors' chains, keyed "iptables forward", "ip6tables nat", ... (none without destinations)."""
    gateway = getattr(planned, "gateway", None)
    if gateway is None:
        return {}
    found = {}
    for family in (4, 6):
        tool = "iptables" if family == 4 else "ip6tables"
        for specs, chain in ((gateway.forward.get(family), "forward"), (gateway.nat.get(family), "nat")):
            if specs:
                found[f"{tool} {chain}"] = [str(spec) for spec in specs]
    return found


def _check_queues(args) -> None:
    last = args.queue_num + 2 * args.workers - 1
    if last > 65535:
        raise UsageError(
            f"--queue-num {args.queue_num} with --workers {args.workers} needs queues up to {last}: at most 65535"
        )


def _fleet(args):
    if not args.cluster:
        if args.cluster_key_file or args.cluster_password_file:
            raise UsageError("--cluster-key-file and --cluster-password-file need --cluster URL")
        return None
    from .fleet.config import fleet_config

    return fleet_config(
        args.cluster,
        args.cluster_key_file,
        args.cluster_password_file,
        args.cluster_name,
        args.cluster_member,
        args.cluster_offline,
    )


def cmd_check(args) -> int:
    if args.json:
        return _json_report(CHECK_KEYS, lambda: _check_report(args))
    ruleset, specs, port_warnings = _checked(args)
    for line in ruleset.warnings:  # what 'run' refuses; 'check' also serves to look at others' files
        print(f"nfknock: warning: {line}", file=sys.stderr)
    from .doors.describe import as_block

    for door in ruleset.doors:
        print(f"door {door.name} ({ruleset.origin[door.name]})")
        print("\n".join(as_block(door)))
    for tool, lines in specs.items():
        where = GATEWAY_WHERE.get(tool.split(" ", 1)[-1], "filter table, chain jumped to from INPUT position 1")
        print(f"{tool.split(' ', 1)[0]} rules ({where}):")
        for spec in lines:
            print(f"  {spec}")
    for text in port_warnings:
        print(f"nfknock: warning: {text}", file=sys.stderr)
    return 0


def _checked(args):
    """What `check` says: the rules, the scaffolding per tool (iptables, ip6tables), warnings
    about the local port range."""
    from .doors.first_steps import MarkHistory, decide
    from .firewall.plan import plan
    from .tools.doctor import WARN, check_local_ports, read_local_ports

    ruleset = load_rules(args.rules, strict=args.strict)
    _check_queues(args)
    # What a start installs where no rules are in place (no earlier meaning of a mark bit to keep).
    first_steps = decide(ruleset.doors, MarkHistory())
    planned = plan(ruleset.doors, args.queue_num, args.pass_mark, args.workers, first_steps=first_steps)
    specs = {
        "iptables" if family == 4 else "ip6tables": [str(spec) for spec in family_specs]
        for family, family_specs in planned.items()
        if family_specs
    }
    specs.update(_gateway_specs(planned))
    ports = [f.text for f in check_local_ports(ruleset.doors, *read_local_ports()) if f.level == WARN]
    return ruleset, specs, ports


# The keys of `check --json` and `doctor --json`, always all present (CI scripts read them).
CHECK_KEYS = {"ok": True, "exit_code": 0, "errors": [], "warnings": [], "doors": [], "rules_installed": {}}
DOCTOR_KEYS = {"ok": True, "exit_code": 0, "errors": [], "findings": [], "counts": {"ok": 0, "warn": 0, "fail": 0}}


def _check_report(args) -> dict:
    from .doors.describe import describe

    ruleset, specs, port_warnings = _checked(args)
    doors = [
        {"name": door.name, "kind": door.kind, "file": str(ruleset.origin[door.name]), "fields": dict(describe(door))}
        for door in ruleset.doors
    ]
    return {"warnings": [*ruleset.warnings, *port_warnings], "doors": doors, "rules_installed": specs}


def _json_report(keys: dict, report) -> int:
    """Print `report()` as one JSON object with every key of `keys`; an error is in it too
    ("errors": its lines), with the exit code the text form has."""
    import json

    try:
        result = {**keys, **report()}
    except NfknockError as exc:
        lines = str(exc).splitlines() or [type(exc).__name__]
        result = {**keys, "ok": False, "exit_code": exc.exit_code, "errors": lines}
    print(json.dumps(result, indent=2, sort_keys=False))
    return result["exit_code"]


def cmd_knock(args) -> int:
    from .tools.client import knock

    steps = _knock_steps(args)
    results = knock(args.host, steps, args.delay, args.family, args.repeat)
    failed = [r for r in results if not r.sent]
    for result in failed:
        print(f"nfknock: knock on {result.step} not sent: {result.error}", file=sys.stderr)
    return 1 if failed else 0


def current_sequence(door: RotatingDoor) -> list[Port]:
    import time

    from .doors.rotation import current_steps

    return [
        Port.model_validate({"port": port, "proto": proto})
        for proto, port in current_steps(door.rotate, door.name, time.time())
    ]


def cmd_otp(args) -> int:
    door = load_rules(args.rules).door(args.door)
    if not isinstance(door, RotatingDoor):
        raise UsageError(f"door {door.name!r} does not rotate")
    steps = current_sequence(door)
    print(" ".join(str(s.port) if s.proto == "tcp" else f"{s.port}:udp" for s in steps))
    return 0


def _knock_steps(args) -> list[Port]:
    if args.door:
        if args.ports:
            raise UsageError("give either PORTs or --door, not both")
        if not args.rules:
            raise UsageError("--door needs --rules DIR to find the door")
        door = load_rules(args.rules).door(args.door)
        if isinstance(door, SpaDoor):
            raise UsageError(f"door {door.name!r} is an SPA door; use 'nfknock spa'")
        if isinstance(door, RotatingDoor):
            if args.close:
                raise UsageError(f"door {door.name!r} rotates and has no close sequence")
            return current_sequence(door)
        if args.close:
            if not door.close_sequence:
                raise UsageError(f"door {door.name!r} has no close_sequence")
            return list(door.close_sequence)
        return list(door.sequence)
    if args.close:
        raise UsageError("--close needs --door")
    if not args.ports:
        raise UsageError("nothing to knock: give PORT[/PROTO]... or --door NAME --rules DIR")
    # knockd spells a protocol 7000:udp, nfknock 7000/udp: -u adds one only where neither is given
    return [port_argument(text if "/" in text or ":" in text or not args.udp else text + "/udp") for text in args.ports]


def port_argument(text: str, option: str = "") -> Port:
    """A PORT[/PROTO] from the command line, or a UsageError naming it (and the option)."""
    try:
        return Port.model_validate(text)
    except ValueError as exc:  # pydantic's ValidationError is one
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ") if hasattr(exc, "errors") else exc
        raise UsageError(f"{option + ': ' if option else ''}port {text!r}: {reason}") from None


def cmd_doctor(args) -> int:
    if args.json:
        return _json_report(DOCTOR_KEYS, lambda: _doctor_report(args))
    findings = _diagnose(args)
    for finding in findings:
        print(finding)
    return _doctor_exit(findings)


def _diagnose(args) -> list:
    from pathlib import Path

    from .tools.doctor import diagnose

    _check_queues(args)
    if args.cluster_password_file and not args.cluster:
        raise UsageError("--cluster-password-file needs --cluster URL")
    findings = diagnose(Path(args.rules), args.queue_num, args.firewall, pass_mark=args.pass_mark, workers=args.workers)
    if args.cluster:
        from .tools.doctor import check_redis, gather_redis

        findings += check_redis(gather_redis(args.cluster, args.cluster_password_file))
    return findings


def _doctor_exit(findings) -> int:
    from .tools.doctor import FAIL

    return 1 if any(f.level == FAIL for f in findings) else 0


def _doctor_report(args) -> dict:
    findings = _diagnose(args)
    rows = [{"level": finding.level.lower(), "text": finding.text} for finding in findings]
    counts = {level: sum(row["level"] == level for row in rows) for level in ("ok", "warn", "fail")}
    code = _doctor_exit(findings)
    return {"ok": code == 0, "exit_code": code, "findings": rows, "counts": counts}


def cmd_spa(args) -> int:
    import ipaddress

    from .tools.client import send_spa

    ports = [port_argument(text, "--access") for text in args.access or ()]
    if args.allow_ip:
        try:
            ipaddress.ip_address(args.allow_ip)
        except ValueError:
            raise UsageError(f"--allow-ip: {args.allow_ip!r} is not an IP address") from None
    door = load_rules(args.rules).door(args.door)
    if not isinstance(door, SpaDoor):
        raise UsageError(f"door {door.name!r} is a knock door; use 'nfknock knock'")
    names = [key.name for key in door.keyring]
    if args.key is not None:
        if args.key not in names:
            raise UsageError(f"door {door.name!r} has no key {args.key!r} (keys: {', '.join(names) or 'none'})")
        key = door.keyring[names.index(args.key)]
    elif len(names) == 1:
        key = door.keyring[0]
    else:
        raise UsageError(f"door {door.name!r} has {len(names)} keys: pick one with --key ({', '.join(names)})")
    wanted = [p.key for p in ports] or sorted(key.ports or (p.key for p in door.protect))
    send_spa(
        args.host,
        key.keys,
        door.port.port,
        wanted,
        args.allow_ip,
        user=args.user,
        timeout=args.fw_timeout,
        copies=args.repeat,
    )
    return 0


def _answer(args, request: dict) -> dict:
    import json

    from .daemon.control import call

    answer = call(args.control_socket, request)
    if args.json:
        print(json.dumps(answer, indent=2))
    return answer


def cmd_status(args) -> int:
    from .daemon.lastgood import EXIT_DEGRADED
    from .tools.statusview import render_status

    answer = _answer(args, {"cmd": "status"})
    if not args.json:
        print("\n".join(render_status(answer)))
    if not args.json and answer.get("fleet"):
        print("\n".join(["", *fleet_lines(answer["fleet"])]))
    return EXIT_DEGRADED if answer.get("degraded") else 0  # on the last good rules: monitoring sees it


def fleet_lines(fleet: dict) -> list[str]:
    """The fleet part of `nfknock status`."""
    state = "reachable" if fleet["reachable"] else f"UNREACHABLE for {fleet['since']:.0f}s ({fleet['detail']})"
    lines = [
        f"fleet {fleet['name']}: Redis {fleet['redis']} {state}; SPA when unreachable: {fleet['offline_policy']}",
        f"  published {fleet['published']}, received {fleet['received']}, waiting {fleet['backlog']}, "
        f"dropped {fleet['dropped']}, rejected (not signed with the fleet key) {fleet['rejected']}",
        "members seen recently:",
    ]
    for member in fleet["members"]:
        seen = "this member" if member["self"] else f"seen {member['seen_ago']:.1f}s ago"
        lines.append(f"  {member['member']:<30} {member['instance']:<14} {seen}")
    lines.append("grants from other members:" if fleet["shared_grants"] else "grants from other members: none")
    for row in fleet["shared_grants"]:
        lines.append(
            f"  {row['source']:<40} {row['door']:<20} from {row['from']:<20} {row['seconds_left']:>8.1f}s left"
        )
    return lines


def cmd_revoke(args) -> int:
    if (args.address is None) == (args.key is None):
        raise UsageError("give an ADDRESS or --key NAME")
    if args.key is not None:
        answer = _answer(args, {"cmd": "revoke", "key": args.key, "door": args.door})
        if not args.json:
            doors, sources = answer["revoked"], answer["addresses"]
            print(
                f"revoked key {args.key} on {', '.join(doors)} ({', '.join(sources)})"
                if doors
                else f"key {args.key} had no grant"
            )
            _fleet_confirmations(args, answer)
        return 0
    answer = _answer(args, {"cmd": "revoke", "address": args.address, "door": args.door})
    if not args.json:
        doors = answer["revoked"]
        print(f"revoked {args.address} on {', '.join(doors)}" if doors else f"{args.address} had no grant")
        _fleet_confirmations(args, answer)
    return 0


def _fleet_confirmations(args, answer: dict, wait: float = 3.0) -> None:
    """In a fleet: which members confirmed the revocation within `wait` seconds, which did not."""
    import time

    from .daemon.control import call

    revoke_id = answer.get("fleet_revoke")
    if not revoke_id:
        return
    end = time.monotonic() + wait
    row: dict = {"confirmed": [], "missing": {}}
    while True:
        fleet = call(args.control_socket, {"cmd": "status"}).get("fleet") or {}
        row = next((r for r in fleet.get("revokes", []) if r["id"] == revoke_id), row)
        if (row["confirmed"] and not row["missing"]) or time.monotonic() > end:
            break
        time.sleep(0.1)
    print(f"fleet: confirmed by {', '.join(row['confirmed']) or 'no other member'}")
    if row["missing"]:
        names = ", ".join(f"{name} (seen {ago:.0f}s ago)" for name, ago in sorted(row["missing"].items()))
        print(
            f"fleet: NOT confirmed by {names}: cut off or stale, the door may still be open there "
            "until it reads the revocation"
        )


def cmd_grant(args) -> int:
    from .doors.rules import parse_duration

    try:
        seconds = parse_duration(args.duration)
    except ValueError as exc:
        raise UsageError(f"--for: {exc}") from None
    answer = _answer(args, {"cmd": "grant", "address": args.address, "door": args.door, "seconds": seconds})
    if not args.json:
        print(f"granted {answer['address']} on {answer['granted']} for {answer['seconds']:g}s")
    return 0


def _read_config(path: str) -> str:
    """The text of a file to import (knockd.conf, access.conf), or one line saying why not:
    bounded, never a FIFO or device (tools/importfile.py)."""
    from .tools.importfile import read_config

    return read_config(path)


def cmd_import_knockd(args) -> int:
    from pathlib import Path

    from .doors.rules import parse_rules_text
    from .tools.knockd_import import import_knockd

    text = _read_config(args.config)
    imported = import_knockd(text)
    for line in imported.notes:
        print(f"nfknock: {args.config} {line}", file=sys.stderr)
    for line in imported.unmapped:
        print(f"nfknock: {args.config} {line} -- NOT IMPORTED", file=sys.stderr)
    if not imported.doors:
        raise UsageError(f"{args.config}: no door could be imported")
    output = imported.yaml()
    parse_rules_text(output, Path(args.output or "imported.yaml"))  # what we write must be valid rules
    _write_output(args.output, output)
    return 0


def _write_output(path: str | None, text: str) -> None:
    """An importer's doors to -o PATH (one line if it cannot be written), or to stdout."""
    if path is None:
        print(text, end="")
        return
    from pathlib import Path

    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write: {exc.strerror}") from None


def cmd_export(args) -> int:
    from pathlib import Path

    from .tools.export import export

    ruleset = load_rules(args.rules)
    for line in ruleset.warnings:
        print(f"nfknock: warning: {line}", file=sys.stderr)
    sys.stdout.write(export(args.manager, ruleset.doors, str(Path(args.rules).absolute()), args.pass_mark))
    return 0


def cmd_schema(args) -> int:
    import json

    from .doors.rules import RuleFile

    print(json.dumps(RuleFile.model_json_schema(), indent=2))
    return 0


def cmd_keygen(args) -> int:
    from .doors.spa import generate_keys

    encryption, mac = generate_keys()
    if args.name is None:
        extra = [name for name in ("username", "sources", "expires", "ports") if getattr(args, name) is not None]
        if extra:
            raise UsageError(f"--{extra[0]} needs --name (settings go into a named key file)")
        print(f"KEY_BASE64: {encryption}\nHMAC_KEY_BASE64: {mac}")
        return 0
    from pathlib import Path

    from .tools.keyfiles import client_command, key_file_text, write_key_file

    text = key_file_text(
        args.name, encryption, mac, username=args.username, sources=args.sources, expires=args.expires, ports=args.ports
    )
    path = write_key_file(Path(args.dir), args.name, text)
    print(f"nfknock: wrote {path} (mode 0600): put it in the SPA door's keys_dir and reload", file=sys.stderr)
    print(client_command(args.server, encryption, mac, ports=args.ports, username=args.username))
    return 0


def cmd_import_fwknop(args) -> int:
    from pathlib import Path

    from .doors.rules import parse_rules_text
    from .tools.fwknop_import import import_fwknop
    from .tools.keyfiles import write_key_file

    text = _read_config(args.config)
    protect = [str(port_argument(text, "--protect")) for text in args.protect]
    keys_dir = Path(args.keys_dir)
    imported = import_fwknop(text, args.door, keys_dir, protect)
    for line in imported.notes:
        print(f"nfknock: {args.config} {line}", file=sys.stderr)
    for line in imported.unmapped:
        print(f"nfknock: {args.config} {line} -- NOT IMPORTED", file=sys.stderr)
    if not imported.key_files:
        raise UsageError(f"{args.config}: no stanza could be imported")
    output = imported.yaml()
    parse_rules_text(output, Path(args.output or "imported.yaml"))  # what we write must be valid rules
    existing = [name for name in imported.key_files if (keys_dir / f"{name}.keys").exists()]
    if existing:
        raise UsageError(f"{keys_dir}: {existing[0]}.keys exists already (nothing written; pick another --keys-dir)")
    if args.output and not Path(args.output).parent.is_dir():
        raise UsageError(f"{args.output}: cannot write: no such directory (nothing written)")
    for name, key_text in imported.key_files.items():
        path = write_key_file(keys_dir, name, key_text)
        print(f"nfknock: wrote {path}", file=sys.stderr)
    _write_output(args.output, output)
    return 0


def cmd_down(args) -> int:
    from .firewall import FLAVOURS, make_firewall
    from .firewall.granted import destroy_all

    if args.firewall is not None:
        return _down_one(args.firewall)
    running = _running_queues()
    if running:
        print(
            f"nfknock: a running nfknock binds queue(s) {running} and would put its rules back at once: stop it "
            "first (systemctl stop nfknock), then run nfknock down; the rules stay in place",
            file=sys.stderr,
        )
        return 1
    removed, failed = [], False
    for flavour in FLAVOURS:  # both flavours, even when one fails
        try:
            if make_firewall(flavour).remove():
                removed.append(flavour)
        except NfknockError as exc:
            failed = True
            print(f"nfknock: {flavour}: {exc}", file=sys.stderr)
    if not failed:  # a set still used by a rule cannot go
        try:
            destroy_all()
        except NfknockError as exc:
            failed = True
            print(f"nfknock: {exc}", file=sys.stderr)
    if removed:
        print(
            f"nfknock: scaffolding removed ({', '.join(removed)}); protected ports now follow the rest of your firewall"
        )
    elif not failed:
        print("nfknock: no nfknock rules were installed")
    return 1 if failed else 0


def _running_queues() -> str:
    """The queues our chains (either flavour) send to that a process binds now: a daemon that
    watches its rules (daemon/guard.py) would re-install them right after a `down`."""
    from .daemon.stats import QUEUE_PROC, parse_queue_table
    from .firewall import FLAVOURS, make_firewall
    from .firewall.host import chain_queues, spans

    queues: set[int] = set()
    for flavour in FLAVOURS:
        try:
            queues |= chain_queues(make_firewall(flavour).installed())
        except NfknockError:
            continue  # down says what is wrong with that flavour
    try:
        listened = set(parse_queue_table(QUEUE_PROC.read_text()))
    except OSError:
        return ""
    return spans(queues & listened)


def _down_one(flavour: str) -> int:
    """`nfknock down --firewall F`: F's chain and jumps go, the other flavour's rules (a running
    daemon's, usually) stay, and so do the sets its chain uses; F's other sets go."""
    from .firewall import FLAVOURS, make_firewall
    from .firewall.granted import destroy
    from .firewall.host import chain_sets, saved_chain

    firewall = make_firewall(flavour)
    try:
        used = chain_sets(firewall.installed())
        removed = firewall.remove()
    except NfknockError as exc:
        print(f"nfknock: {flavour}: {exc}", file=sys.stderr)
        return 1
    other = next(name for name in FLAVOURS if name != flavour)
    kept = saved_chain(other)
    try:
        destroy(sorted(used - chain_sets(kept)))
    except NfknockError as exc:
        print(f"nfknock: {exc}", file=sys.stderr)
        return 1
    if not removed:
        print(f"nfknock: no nfknock rules were installed in the {flavour} tables")
    elif any(kept.values()):
        print(f"nfknock: scaffolding removed ({flavour}); nfknock's chain in the {other} tables stays")
    else:
        print(
            f"nfknock: scaffolding removed ({flavour}); no other nfknock chain is installed: protected ports now "
            "follow the rest of your firewall"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
