"""nfknock's SPA encoder against the real peer: stock fwknopd 2.6 (test mode, UDP server) in the
server namespace accepts the packet nfknock builds. (The other direction, stock client to our
decoder, is covered by the recorded packets in tests/unit/spa_vectors.)"""

import base64
import shutil
import socket
import subprocess
import time

import pytest

from nfknock.doors.spa import Keys, encode, generate_keys
from support.sandbox import entered, wait_for_line


@pytest.mark.parametrize("digest", ["sha256", "sha512"])
def test_stock_fwknopd_accepts_our_packet(sandbox, alice, tmp_path, digest):
    if shutil.which("fwknopd") is None:
        pytest.fail("fwknopd is missing: scripts/setup.sh installs fwknop-server")
    encryption, mac = generate_keys()
    keys = Keys(base64.b64decode(encryption), base64.b64decode(mac), digest)
    access = tmp_path / "access.conf"
    access.write_text(
        f"SOURCE ANY\nREQUIRE_SOURCE_ADDRESS Y\nKEY_BASE64 {encryption}\n"
        f"HMAC_KEY_BASE64 {mac}\nHMAC_DIGEST_TYPE {digest.upper()}\nOPEN_PORTS tcp/22\n"
    )
    config = tmp_path / "fwknopd.conf"
    config.write_text(f"PCAP_INTF nk{sandbox.token}1s\n")
    access.chmod(0o600)
    config.chmod(0o600)
    log = tmp_path / "fwknopd.log"
    with log.open("w") as out:
        daemon = sandbox.spawn(
            sandbox.server,
            [
                "fwknopd",
                "--foreground",
                "--test",
                "--udp-server",
                "--verbose",
                "-c",
                str(config),
                "-a",
                str(access),
                "-p",
                str(tmp_path / "pid"),
                "-r",
                str(tmp_path),
                "-d",
                str(tmp_path / "digest.cache"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        wait_for_line(log, "listen on port 62201", daemon)
        with entered(alice.namespace):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.sendto(encode(keys, alice.address, [("tcp", 22)], time.time()), (alice.server_address, 62201))
        sock.close()
        wait_for_line(log, "--test mode enabled, skipping firewall manipulation", daemon)
    text = log.read_text()
    assert "SPA Decode (res=0)" in text and "Message String: 10.199.1.2,tcp/22" in text
