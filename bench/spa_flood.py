"""SPA under a junk flood (issue 24, goal 3), run from bench/run.py (`--only spa_flood`).

A flood at the SPA port from 100k spoofed sources from bob's side (bench/spaflood.c, full rate; the
client is alice, on another link, as in the other flood measurements),
of two kinds: random bytes of an SPA packet's length, and well-formed junk: real packets made
with keys the door does not have (only an HMAC tells them apart from a client's; the worst case
for the daemon). With a door of 1 and of 20 keys (the client uses the last key: 20 HMACs to
find it), 10 tries each of the stock `fwknop` client (one packet), and our own (`nfknock spa
--repeat 10`: 10 copies 100 ms apart), each followed by a connect (2 s); and in the same run fwknopd 2.6 (pcap, --test:
a try counts when it accepted the packet within 2 s) under the same floods. Then the capacity:
junk packets the daemon decides per second of its CPU (one core), well-formed junk, 1 and 20
keys; and the daemon's side alone (no kernel): CPU per junk packet of spa_access.identify beside
one HMAC per key by `cryptography` as before, measured in the same run.
"""

from __future__ import annotations

import base64
import os
import struct
import subprocess
import time
import timeit

from support.sandbox import EchoService, connect, cpu_seconds, nfknock_argv, process_tree, wait_for_line

KINDS = ("random", "wellformed")
KEYS = (1, 20)
PORT = 62201
PAYLOADS = 1024


def payload_file(path, kind: str, length: int) -> None:
    from nfknock.doors.spa import Keys, encode

    records = []
    for i in range(PAYLOADS):
        if kind == "random":
            data = os.urandom(length)
        else:  # a real packet, under a key nobody has, asking for a spoofed address
            keys = Keys(os.urandom(32), os.urandom(64))
            data = encode(keys, f"11.0.{i >> 8}.{i & 255}", [("tcp", 22)], time.time() + 3600)
        records.append(struct.pack("!H", len(data)) + data)
    path.write_bytes(b"".join(records))


class SpaFlood:
    def __init__(self, bench, sender, log):
        self.bench, self.sender, self.log = bench, sender, log
        self.box, self.alice, self.figures = bench.box, bench.alice, bench.figures
        self.workdir = bench.workdir / "spa_flood"
        # 0700 whatever the umask: nfknock refuses keys under a directory others may write to
        self.workdir.mkdir(mode=0o700, exist_ok=True)
        self.workdir.chmod(0o700)
        self.trials = 4 if bench.smoke else 10

    def run(self, run: int) -> None:

        self.python_cost(run)
        service = EchoService(self.box.server)  # what the door protects: 22/tcp
        try:
            self._floods(run)
        finally:
            service.close()

    def _floods(self, run: int) -> None:
        from nfknock.doors.spa import generate_keys

        for count in KEYS:
            keys_dir = self.workdir / f"keys{count}"
            keys_dir.mkdir(mode=0o700, exist_ok=True)
            pairs = [generate_keys() for _ in range(count)]
            for i, (encryption, mac) in enumerate(pairs):
                path = keys_dir / f"k{i:02d}.keys"
                path.write_text(f"KEY_BASE64: {encryption}\nHMAC_KEY_BASE64: {mac}\n")
                path.chmod(0o600)
            rules = self.bench.rules / "spa_flood.yaml"
            rules.write_text(
                f"doors:\n  - {{name: spaFlood, kind: spa, keys_dir: {keys_dir}, protect: [22/tcp], open_for: 10m}}\n"
            )
            try:
                from nfknock.doors.spa import Keys, encode

                # the length of the stock client's packet (SHA-256 HMAC, one port): the kernel's
                # length check passes it, as it would a real packet
                length = len(encode(Keys(b"k" * 32, b"h" * 64), self.alice.address, [("tcp", 22)], time.time()))
                for kind in KINDS:
                    payloads = self.workdir / f"{kind}.bin"
                    payload_file(payloads, kind, length)
                    self.nfknock(run, count, kind, payloads, pairs[-1], f"k{count - 1:02d}")
                    self.fwknopd(run, count, kind, payloads, pairs)
            finally:
                rules.unlink()

    # -- the daemon ------------------------------------------------------------------------

    def _flood(self, payloads, seconds: float = 600) -> subprocess.Popen:
        return self.box.spawn(
            self.bench.bob.namespace,
            [
                str(self.sender),
                self.bench.bob.server_address,
                str(PORT),
                str(seconds),
                "11.0.0.1",
                "100000",
                str(payloads),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )

    def _stock(self, pair) -> list[str]:
        return [
            "fwknop",
            *("-A", "tcp/22", "-a", self.alice.address, "-D", self.alice.server_address, "--use-hmac"),
            *("--rc-file", "/dev/null", "--key-base64-rijndael", pair[0], "--key-base64-hmac", pair[1]),
        ]

    def nfknock(self, run: int, count: int, kind: str, payloads, pair, key: str) -> None:
        from nfknock.daemon import control

        sock = self.workdir / "spa_flood.sock"
        rules = str(self.bench.rules)
        ours = nfknock_argv(
            "spa", self.alice.server_address, "--door", "spaFlood", "--rules", rules, "--key", key, "--repeat", "10"
        )
        openers = {"stock": self._stock(pair), "ours": ours}
        daemon = self.bench.start_nfknock("--control-socket", str(sock))
        pids = process_tree(daemon.pid)
        flood = self._flood(payloads)
        try:
            time.sleep(1.0)
            t0, (ids0, over0, full0), cpu0 = time.monotonic(), self.bench.queue_counters(), cpu_seconds(pids)
            time.sleep(2.0)
            t1, (ids1, over1, full1), cpu1 = time.monotonic(), self.bench.queue_counters(), cpu_seconds(pids)
            decided = (ids1 - ids0) - (over1 - over0)
            self.figures.add(f"spa_flood.{kind}.keys{count}.queued", decided / (t1 - t0), "packets/s")
            if kind == "wellformed":
                per_core = decided / max(1e-9, cpu1 - cpu0)
                self.figures.add(f"spa_flood.capacity.keys{count}", per_core, "packets/s per core")
                self.log(
                    f"SPA flood run {run + 1}, {count} key(s): the daemon decides {decided / (t1 - t0):,.0f} "
                    f"well-formed junk packets/s, {per_core:,.0f} per second of its CPU; "
                    f"{(full1 - full0) / (t1 - t0):,.0f}/s dropped at the full queue, "
                    f"{(over1 - over0) / (t1 - t0):,.0f}/s at the socket's full buffer"
                )
            for who, argv in openers.items():
                ok = 0
                for _ in range(self.trials):
                    self.box.run(self.alice.namespace, argv, cwd=self.bench_repo())
                    ok += connect(self.alice, timeout=2).connected
                    control.call(sock, {"cmd": "revoke", "address": self.alice.address})
                still = flood.poll() is None
                self.figures.add(f"spa_flood.{kind}.keys{count}.{who}", ok, f"of {self.trials}")
                if not ok:  # say why, or the figure is a riddle
                    self.log(
                        "  the daemon's log ends:\n" + "".join(self.bench.daemon_log.read_text().splitlines(True)[-15:])
                    )
                self.log(
                    f"SPA flood run {run + 1}, {kind} junk, {count} key(s), {who} client: {ok}/{self.trials} got in"
                    f"{'' if still else ' (the flood ended early)'}"
                )
            text = self.bench.daemon_log.read_text()
            self.figures.add(f"spa_flood.{kind}.keys{count}.lockouts", text.count("locked out"), "lockouts")
        finally:
            flood.kill()
            flood.wait(10)
            self.bench.stop(daemon)

    def bench_repo(self):
        from pathlib import Path

        return Path(__file__).resolve().parent.parent

    # -- fwknopd in the same run ----------------------------------------------------------------

    def fwknopd(self, run: int, count: int, kind: str, payloads, pairs) -> None:
        directory = self.workdir / f"fwknopd{count}"
        directory.mkdir(mode=0o700, exist_ok=True)
        access = directory / "access.conf"
        access.write_text(
            "".join(
                f"SOURCE ANY\nREQUIRE_SOURCE_ADDRESS Y\nKEY_BASE64 {encryption}\nHMAC_KEY_BASE64 {mac}\n"
                f"OPEN_PORTS tcp/22\n\n"
                for encryption, mac in pairs
            )
        )
        config = directory / "fwknopd.conf"
        config.write_text("PCAP_INTF any\n")  # the flood's link and the client's
        access.chmod(0o600)
        config.chmod(0o600)
        log = directory / "fwknopd.log"
        log.unlink(missing_ok=True)
        argv = [
            "fwknopd",
            *("--foreground", "--test", "--verbose", "-c", str(config), "-a", str(access)),
            *("-p", str(directory / "pid"), "-r", str(directory), "-d", str(directory / "digest.cache")),
        ]
        (directory / "digest.cache").unlink(missing_ok=True)
        with log.open("w") as out:
            daemon = self.box.spawn(self.box.server, argv, stdout=out, stderr=subprocess.STDOUT)
        accepted = "skipping firewall manipulation"
        flood = None

        def attempt() -> bool:
            before = log.read_text().count(accepted)
            self.box.run(self.alice.namespace, self._stock(pairs[-1]))
            end = time.monotonic() + 2
            while time.monotonic() < end and log.read_text().count(accepted) == before:
                time.sleep(0.05)
            return log.read_text().count(accepted) > before

        try:
            wait_for_line(log, "Sniffing interface", daemon)
            time.sleep(0.5)
            # Without a flood first: a figure of 0 under the flood means something only if
            # fwknopd accepts the same client's packet here at all.
            control = attempt()
            self.figures.add(f"spa_flood.keys{count}.fwknopd_without_flood", float(control), "of 1")
            if not control:
                self.log(f"  fwknopd did not accept a packet without a flood:\n{log.read_text()[-2000:]}")
            flood = self._flood(payloads)
            time.sleep(1.0)
            ok = sum(attempt() for _ in range(self.trials))
            self.figures.add(f"spa_flood.{kind}.keys{count}.fwknopd", ok, f"of {self.trials}")
            self.log(f"SPA flood run {run + 1}, {kind} junk, {count} key(s), fwknopd: {ok}/{self.trials} accepted")
        finally:
            if flood is not None:
                flood.kill()
                flood.wait(10)
            daemon.terminate()
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(10)

    # -- the daemon's side alone ---------------------------------------------------------------

    def python_cost(self, run: int) -> None:
        """CPU microseconds per junk packet of spa_access.identify (shape checks once, then one
        HMAC per key from a precomputed state), beside one `cryptography` HMAC per key as the
        daemon did before, over the same packets, in this process."""
        from nfknock.doors import spa_access
        from nfknock.doors.rules import DoorKey, parse_door
        from nfknock.doors.spa import Keys, encode, generate_keys
        from nfknock.errors import SpaError

        for count in KEYS:
            door = parse_door({"name": "t", "kind": "spa", "keys_dir": "/nonexistent", "protect": ["22/tcp"]})
            ring = []
            for i in range(count):
                encryption, mac = generate_keys()
                ring.append(DoorKey(f"k{i}", Keys(base64.b64decode(encryption), base64.b64decode(mac)), 30.0, 30.0))
            door._keyring = tuple(ring)
            junk = [encode(Keys(os.urandom(32), os.urandom(64)), "11.0.0.1", [("tcp", 22)], 0) for _ in range(64)]

            def new(door=door, junk=junk) -> None:
                for wire in junk:
                    try:
                        spa_access.identify(door, wire)
                    except SpaError:
                        pass

            def old(ring=ring, junk=junk) -> None:
                for wire in junk:
                    try:
                        _before(ring, wire)
                    except SpaError:
                        pass

            for name, body in (("identify", new), ("per_key_hmac", old)):
                loops = 20
                seconds = min(timeit.repeat(body, number=loops, repeat=5))
                us = seconds / (loops * len(junk)) * 1e6
                self.figures.add(f"spa_flood.python_us.keys{count}.{name}", us, "us")
                self.log(f"SPA junk in Python, {count} key(s), {name}: {us:.2f} us per packet")


def _before(ring, wire: bytes):
    """spa_access.identify as it was before this measurement's change (one `cryptography` HMAC
    per key, each key's checks done again per key), the baseline of `python_cost`."""
    import binascii

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hmac

    from nfknock.doors.spa import HMAC_DIGESTS, SALTED_B64, _b64decode, _b64encode
    from nfknock.errors import SpaError

    def authenticate(keys):
        try:
            text = wire.decode("ascii").strip()
        except UnicodeDecodeError:
            raise SpaError("malformed", "not ASCII") from None
        if text.startswith(SALTED_B64):
            raise SpaError("malformed", "prefix")
        tag_length = len(_b64encode(bytes(HMAC_DIGESTS[keys.digest]().digest_size)))
        if len(text) <= tag_length + 16:
            raise SpaError("malformed", "too short")
        data, tag = text[:-tag_length], text[-tag_length:]
        check = hmac.HMAC(keys.hmac, HMAC_DIGESTS[keys.digest]())
        check.update((SALTED_B64 + data).encode())
        try:
            check.verify(_b64decode(tag))
        except (InvalidSignature, binascii.Error, ValueError):
            raise SpaError("bad hmac", "HMAC does not match") from None
        return data

    failure = None
    for key in ring:
        try:
            return key, authenticate(key.keys)
        except SpaError as exc:
            failure = exc
    raise failure


GOALS = {"random": "stock >= 9/10", "wellformed": "ours >= 9/10, stock >= fwknopd"}
LABELS = {"random": "random bytes of an SPA packet's length", "wellformed": "well-formed (real packets, unknown keys)"}


def render_rows(f: dict) -> list[str]:
    """The report's rows for what this run measured (none when it did not run)."""

    def fig(name, fmt="{:,.0f}"):
        s = f[name]
        return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}..{fmt.format(s['max'])})"

    rows = []
    for kind in KINDS:
        for count in KEYS:
            base = f"spa_flood.{kind}.keys{count}"
            if f"{base}.stock" not in f:
                continue
            rows.append(
                f"| SPA flood at 62201 from 100k spoofed sources, {LABELS[kind]}, {count} key(s): tries that got in | "
                f"stock fwknop {fig(base + '.stock')}; `nfknock spa --repeat 10` {fig(base + '.ours')} of "
                f"{f[base + '.stock']['unit'][3:]} | fwknopd 2.6 (pcap) {fig(base + '.fwknopd')} | "
                f"junk the daemon decided: {fig(base + '.queued')}/s; lockouts: "
                f"{fig(base + '.lockouts')} | {GOALS[kind]} |"
                + (
                    ""
                    if f.get(f"spa_flood.keys{count}.fwknopd_without_flood", {}).get("min", 1)
                    else " (fwknopd refused a packet without a flood too: its figure means nothing)"
                )
            )
    for count in KEYS:
        name = f"spa_flood.capacity.keys{count}"
        if name in f:
            rows.append(
                f"| capacity: well-formed SPA junk the daemon decides per second of one core, {count} key(s) | "
                f"{fig(name)} | | | see docs/spa-flood.md |"
            )
        new, old = f"spa_flood.python_us.keys{count}.identify", f"spa_flood.python_us.keys{count}.per_key_hmac"
        if new in f and old in f:
            rows.append(
                f"| CPU per well-formed junk SPA packet in Python, us, {count} key(s) (no kernel) | "
                f"{fig(new, '{:.2f}')} | {fig(old, '{:.2f}')} (one `cryptography` HMAC per key, as before) | "
                f"{f[new]['median'] / f[old]['median']:.2f} | |"
            )
    return rows
