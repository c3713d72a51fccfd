"""The Debian package's inputs, as an admin or a packager checks them before trusting a build:
the bundled Python distributions are pinned with hashes and cover what setup.cfg asks for, the
dependency floors admit Debian 12's own packages, and the release files agree with the version.
(scripts/build-deb.sh builds the package; CI builds it twice and compares, and runs lintian.)"""

import configparser
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from nfknock import __version__

ROOT = Path(__file__).resolve().parents[2]


def setup_requirements(*extras: str) -> list[Requirement]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    text = config["options"]["install_requires"]
    for extra in extras:
        text += "\n" + config["options.extras_require"][extra]
    lines = (line.split("#")[0].strip() for line in text.splitlines())
    return [Requirement(line) for line in lines if line]


def lock(name: str) -> dict[str, tuple[Version, list[str]]]:
    """name -> (version, hashes) of a lock file; every entry must be `NAME==VERSION --hash=...`."""
    text = (ROOT / "requirements" / name).read_text().replace("\\\n", " ")
    pinned = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)\s*", line)
        assert match, f"requirements/{name}: not pinned with a sha256 hash: {line!r}"
        pinned[match[1].lower().replace("_", "-")] = (Version(match[2]), match[3].split())
    return pinned


def test_every_bundled_distribution_is_pinned_with_a_hash_and_meets_setup_cfg():
    pinned = lock("deb.lock")
    for requirement in setup_requirements("server", "metrics", "fleet"):
        name = requirement.name.lower().replace("_", "-")
        assert name in pinned, f"deb.lock lacks {requirement.name} (setup.cfg asks for it): run scripts/lock-deps.sh"
        assert requirement.specifier.contains(pinned[name][0], prereleases=True), (
            f"deb.lock pins {name} {pinned[name][0]}, setup.cfg asks for {requirement}: run scripts/lock-deps.sh"
        )


def test_the_sdists_build_tools_are_pinned_too():
    assert {"cython", "setuptools", "wheel"} <= set(lock("build.lock"))


def test_debian_12s_own_python_packages_meet_the_floors():
    """python3-cryptography 38.0.4, python3-prometheus-client 0.16.0 and python3-redis 4.3.4
    (Debian 12): the unit tests that use them pass with exactly these versions."""
    debian12 = {"cryptography": "38.0.4", "prometheus-client": "0.16.0", "redis": "4.3.4"}
    floors = {r.name.lower(): r for r in setup_requirements("metrics", "fleet")}
    for name, version in debian12.items():
        assert floors[name].specifier.contains(version), f"setup.cfg's {floors[name]} excludes Debian 12's {version}"


def test_the_changelog_starts_with_this_version():
    headings = re.findall(r"^## (\S+) \((\d{4}-\d{2}-\d{2})\)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert headings, "CHANGELOG.md has no '## VERSION (YYYY-MM-DD)' heading"
    assert headings[0][0] == __version__, f"CHANGELOG.md's newest entry is {headings[0][0]}, nfknock is {__version__}"
    versions = [Version(v) for v, _ in headings]
    assert versions == sorted(versions, reverse=True), "CHANGELOG.md: newest first"


def test_licence_and_security_policy_are_there():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["metadata"]["license"] == "MIT"
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "Copyright (c) 2026 nfknock authors" in licence
    assert re.search(r"\b[\w.-]+@[\w.-]+\b", (ROOT / "SECURITY.md").read_text()), "SECURITY.md names no address"


def test_each_lintian_override_says_why():
    lines = (ROOT / "deploy" / "debian" / "lintian-overrides").read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("nfknock:"):
            above = next(prev for prev in reversed(lines[:number]) if not prev.startswith("nfknock:"))
            assert above.startswith("# "), f"lintian-overrides line {number + 1} has no comment saying why: {line}"
