"""A laptop's install: `pip install nfknock` (no extras) gives the client verbs — knock, spa, otp,
keygen, check — and compiles nothing: netfilterqueue and python-iptables are not pulled in
(dependencies are taken as wheels only, so a dependency that needs a compiler fails the install).

This builds the wheel of the checkout and installs it into a fresh virtualenv with pip's usual
configuration (the package index, or PIP_FIND_LINKS); it takes some seconds.
"""

import base64
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*argv, **kwargs):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("client")
    wheels = base / "wheels"
    built = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, REPO)
    assert built.returncode == 0, built.stderr
    venv = base / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    (wheel,) = wheels.glob("nfknock-*.whl")
    installed = run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--only-binary", ":all:", wheel)
    assert installed.returncode == 0, installed.stderr
    return venv


def test_the_server_side_is_not_installed(client_venv):
    for module in ("netfilterqueue", "iptc", "prometheus_client"):
        result = run(client_venv / "bin" / "python", "-c", f"import {module}")
        assert result.returncode == 1 and "ModuleNotFoundError" in result.stderr, module


def test_client_verbs_work_and_run_names_the_missing_extra(client_venv, tmp_path):
    nfknock = client_venv / "bin" / "nfknock"
    keys = run(nfknock, "keygen")
    assert keys.returncode == 0 and keys.stdout.startswith("KEY_BASE64: "), keys.stderr
    rules = tmp_path / "rules"
    rules.mkdir(mode=0o700)
    secret = tmp_path / "rot.key"
    secret.write_text(base64.b64encode(b"r" * 32).decode() + "\n")
    secret.chmod(0o600)
    spa_keys = tmp_path / "spa.keys"
    spa_keys.write_text(keys.stdout)
    spa_keys.chmod(0o600)
    (rules / "doors.yaml").write_text(
        "doors:\n"
        "  - name: knockSSH\n    sequence: [40000, 50000, 60000]\n    protect: [22/tcp]\n"
        f"  - name: rotSSH\n    rotate: {{secret_file: {secret}, window: 60s, length: 3, ports: 20000-29999}}\n"
        "    protect: [2222/tcp]\n"
        f"  - name: spaSSH\n    kind: spa\n    keys_file: {spa_keys}\n    protect: [22/tcp]\n"
    )
    (rules / "doors.yaml").chmod(0o600)
    check = run(nfknock, "check", "--rules", rules)
    assert check.returncode == 0 and "door knockSSH" in check.stdout, check.stderr
    otp = run(nfknock, "otp", "--door", "rotSSH", "--rules", rules)
    assert otp.returncode == 0 and len(otp.stdout.split()) == 3, otp.stderr
    # No packet leaves this host: the names below do not resolve (.invalid), and that is the error.
    knock = run(nfknock, "knock", "bastion.invalid", "40000", "50000")
    assert knock.returncode == 2 and "bastion.invalid" in knock.stderr, knock.stderr
    spa = run(nfknock, "spa", "bastion.invalid", "--door", "spaSSH", "--rules", rules)
    assert spa.returncode == 2 and "bastion.invalid" in spa.stderr, spa.stderr
    daemon = run(nfknock, "run", "--rules", rules, "--state-dir", tmp_path / "state", "--control-socket", "")
    assert daemon.returncode == 2
    assert daemon.stderr.startswith("nfknock: nfknock run needs the server extra: pip install 'nfknock[server]'")
