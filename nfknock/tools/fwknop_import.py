"""`nfknock import-fwknop`: fwknopd's access.conf turned into one SPA door and a key file per
stanza, and a list, by line, of what could not be carried over.

fwknopd tries each stanza whose SOURCE matches; nfknock tries each key of the door and knows the
sender by the HMAC key, so a stanza becomes a person's key: its SOURCE the key's sources,
OPEN_PORTS its ports, FW_ACCESS_TIMEOUT / MAX_FW_TIMEOUT its open_for / max_open_for,
REQUIRE_USERNAME its username, ACCESS_EXPIRE(_EPOCH) its expiry. What nfknock does not do
(GPG, commands, NAT) is reported, never guessed at. Pure: text in, texts out; the CLI writes.

access.conf holds keys (KEY, HMAC_KEY, GPG_DECRYPT_PW and their _BASE64 forms), and a key typed
on a wrong or misspelt line is still a key: what this prints names the line and the keyword,
never a value, but for SOURCE and DESTINATION when they read as addresses (`_shown`).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

from ..doors.spa import generate_keys
from ..errors import UsageError
from .keyfiles import key_file_text

PLACEHOLDER = "__CHANGEME__"
DIGESTS = {"SHA1": "sha1", "SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}
FWKNOPD_MAX_FW_TIMEOUT = 300  # fwknopd's default when a stanza sets none
# Keywords read below; every other one is listed as not imported, with why.
WHY_NOT = {
    "GPG": "GPG mode: nfknock takes Rijndael keys only (see docs/rules.md, GPG)",
    "CMD": "commands: nfknock refuses command messages and never runs commands",
    "ENABLE_CMD": "commands: nfknock refuses command messages and never runs commands",
    "FORCE_SNAT": "SNAT: nfknock never rewrites sources; route the replies via this host (docs/gateway.md)",
    "FORCE_MASQUERADE": "SNAT: nfknock never rewrites sources; route the replies via this host (docs/gateway.md)",
    "FORCE": "NAT: no nfknock equivalent",
    "DISABLE_DNAT": "NAT: nfknock's published ports are fixed DNAT rules of the door (publish)",
    "FORWARD_ALL": "NAT: nfknock forwards only to the destinations a door lists (forward)",
    "%INCLUDE": "include directives are not followed: import each file on its own",
}


@dataclass
class Stanza:
    line: int
    values: dict[str, tuple[int, str]] = field(default_factory=dict)  # KEYWORD -> (line, value)


@dataclass
class Imported:
    door: dict
    key_files: dict[str, str]  # key name -> text of NAME.keys
    unmapped: list[str]  # "line N: ... (why)"
    notes: list[str]  # how something was carried over

    def yaml(self) -> str:
        return yaml.safe_dump({"doors": [self.door]}, sort_keys=False, default_flow_style=None)


def parse_stanzas(text: str) -> tuple[list[Stanza], list[str]]:
    """Stanzas (each begins with SOURCE) with their keywords, upper-cased as fwknopd reads them."""
    stanzas: list[Stanza] = []
    outside = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, value = line.partition(" ") if " " in line else line.partition("\t")
        keyword, value = keyword.strip().upper(), value.strip()
        if keyword == "SOURCE":
            stanzas.append(Stanza(number))
        if not stanzas or keyword.startswith("%"):
            outside.append(f"line {number}: {_keyword(raw)} ({_why_not(keyword) or 'outside any stanza'})")
            continue
        stanzas[-1].values[keyword] = (number, value)
    return stanzas, outside


def _keyword(raw: str) -> str:
    """How a message names a line's keyword: as written if it has a value after it and is shaped
    like a keyword; a bare token (a key on a line of its own, `KEY_BASE64=...`) is not shown."""
    keyword, _, value = raw.strip().partition(" ") if " " in raw.strip() else raw.strip().partition("\t")
    if value.strip() and re.fullmatch(r"%?[A-Za-z][A-Za-z0-9_]{0,39}", keyword):
        return keyword
    return "a line that is not 'KEYWORD value' (not shown: access.conf holds keys)"


def _shown(keyword: str, value: str) -> str:
    """`SOURCE 10.0.1.0/24` when the value reads as addresses (or ANY); the keyword alone otherwise."""
    items = [item for item in re.split(r"[,\s]+", value) if item]
    try:
        for item in items:
            if item.upper() != "ANY":
                ipaddress.ip_network(item, strict=False)
    except ValueError:
        return f"{keyword} (not an address list; not shown)"
    return _clip(f"{keyword} {value}") if items else keyword


def _why_not(keyword: str) -> str | None:
    for prefix, why in WHY_NOT.items():
        if keyword.startswith(prefix):
            return why
    return None


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ports(value: str) -> list[str]:
    """`tcp/22, udp/53` as nfknock writes ports (22/tcp); ValueError on anything else."""
    ports = []
    for item in filter(None, (part.strip() for part in re.split(r"[,\s]+", value))):
        match = re.fullmatch(r"(tcp|udp)/(\d+)", item.lower())
        if not match or not 1 <= int(match.group(2)) <= 65535:
            raise ValueError("an item is not proto/port (like tcp/22; the value is not shown)")
        ports.append(f"{int(match.group(2))}/{match.group(1)}")
    return ports


def _secret(values: dict[str, tuple[int, str]], plain: str, b64: str) -> tuple[bytes | None, int | None]:
    """The key of KEY_BASE64 (or KEY, a passphrase used as it is), with its line; None if unset
    or a placeholder."""
    if b64 in values:
        number, text = values[b64]
        if text == PLACEHOLDER:
            return None, number
        try:
            return base64.b64decode(text, validate=True), number
        except binascii.Error:
            raise ValueError(f"line {number}: {b64} is not valid base64") from None
    if plain in values:
        number, text = values[plain]
        return (None if text == PLACEHOLDER else text.encode()), number
    return None, None


def import_fwknop(text: str, door_name: str, keys_dir: Path, protect: list[str]) -> Imported:
    stanzas, unmapped = parse_stanzas(text)
    forwarding = next(
        (
            values["ENABLE_IPT_FORWARDING"][0]
            for values in (s.values for s in stanzas)
            if values.get("ENABLE_IPT_FORWARDING", (0, "N"))[1].upper() == "Y"
        ),
        None,
    )
    notes: list[str] = []
    forward: list[str] = []
    key_files: dict[str, str] = {}
    door_ports: list[str] = []
    macs: dict[bytes, tuple[str, int]] = {}
    for index, stanza in enumerate(stanzas, start=1):
        values = stanza.values
        where = f"line {stanza.line}: stanza {index} ({_shown('SOURCE', values['SOURCE'][1])})"
        try:
            name, file_text, ports, mac = _stanza(index, stanza, protect, unmapped, notes, set(key_files))
        except ValueError as exc:
            unmapped.append(f"{where}: {exc} (stanza skipped)")
            continue
        if mac in macs:
            other, line = macs[mac]
            unmapped.append(
                f"{where}: same HMAC key as the stanza of line {line} (key {other}); nfknock tells people "
                "apart by their HMAC key: merge the two stanzas by hand (stanza skipped)"
            )
            continue
        if name in key_files:  # _stanza picks a free name: never overwrite someone's key
            unmapped.append(f"{where}: key name {name} is taken (stanza skipped)")
            continue
        macs[mac] = (name, stanza.line)
        key_files[name] = file_text
        forced = _force_nat(stanza.values)
        if forced is not None:  # its holders reach that destination only: not a port of this host
            if forced not in forward:
                forward.append(forced)
            continue
        door_ports += [port for port in ports if port not in door_ports]
    door: dict = {"name": door_name, "kind": "spa", "keys_dir": str(keys_dir)}
    if door_ports or not forward:
        door["protect"] = door_ports or list(protect)
    if forward:
        door["forward"] = forward
        notes.append(
            f"FORCE_NAT: the door forwards to {', '.join(forward)}: fwknopd DNATs the port the client asks "
            "for; with nfknock the client connects to the destination itself (routed via this host), or add "
            "a `publish: [{port: ..., to: ...}]` entry for a fixed port of this host (docs/gateway.md)"
        )
    if forwarding:
        notes.append(
            f"line {forwarding}: ENABLE_IPT_FORWARDING: NAT access messages (fwknop -N host:port) are accepted "
            "for the door's forward and publish destinations only: list them (docs/gateway.md)"
        )
    return Imported(door, key_files, unmapped, notes)


def _force_nat(values: dict[str, tuple[int, str]]) -> str | None:
    """A stanza's FORCE_NAT (`IP PORT`) as an nfknock destination (`10.0.0.5:22/tcp`, the
    protocol of its first OPEN_PORTS entry); None without one. ValueError names the line."""
    if "FORCE_NAT" not in values:
        return None
    number, text = values["FORCE_NAT"]
    parts = text.split()
    try:
        address = ipaddress.ip_address(parts[0])
        port = int(parts[1])
        if len(parts) != 2 or not 1 <= port <= 65535:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"line {number}: FORCE_NAT is not 'IP PORT'") from None
    ports = _ports(values["OPEN_PORTS"][1]) if "OPEN_PORTS" in values else []
    proto = ports[0].split("/")[1] if ports else "tcp"
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{host}:{port}/{proto}"


def _stanza(
    index: int, stanza: Stanza, protect: list[str], unmapped: list[str], notes: list[str], taken: set[str]
) -> tuple[str, str, list[str], bytes]:
    """One stanza as (key name, key file text, its ports, HMAC key); ValueError skips it."""
    values = stanza.values
    used = {"SOURCE", "KEY", "KEY_BASE64", "HMAC_KEY", "HMAC_KEY_BASE64", "OPEN_PORTS", "RESTRICT_PORTS"}
    used |= {"FW_ACCESS_TIMEOUT", "MAX_FW_TIMEOUT", "REQUIRE_USERNAME", "ACCESS_EXPIRE", "ACCESS_EXPIRE_EPOCH"}
    used |= {"HMAC_DIGEST_TYPE", "ENCRYPTION_MODE", "REQUIRE_SOURCE_ADDRESS", "DESTINATION", "USE_HMAC"}
    used |= {"FORCE_NAT", "ENABLE_IPT_FORWARDING"}  # gateway doors (docs/gateway.md)
    gpg_only = "KEY" not in values and "KEY_BASE64" not in values and any(k.startswith("GPG") for k in values)
    if gpg_only:
        raise ValueError("a GPG-only stanza: nfknock takes Rijndael keys only (see docs/rules.md, GPG)")
    for keyword, (number, value) in values.items():
        if keyword not in used:
            why = _why_not(keyword) or "no nfknock equivalent"
            unmapped.append(f"line {number}: {_keyword(f'{keyword} {value}')} ({why})")
    mode = values.get("ENCRYPTION_MODE", (0, "CBC"))[1].upper()
    if mode != "CBC":
        raise ValueError(
            f"line {values['ENCRYPTION_MODE'][0]}: ENCRYPTION_MODE is not CBC: nfknock speaks fwknop's default"
        )
    digest_text = values.get("HMAC_DIGEST_TYPE", (0, "SHA256"))[1].upper()
    digest = DIGESTS.get(digest_text)
    if digest is None:
        raise ValueError(f"line {values['HMAC_DIGEST_TYPE'][0]}: HMAC_DIGEST_TYPE: nfknock takes {', '.join(DIGESTS)}")
    settings: dict[str, str | list[str] | None] = {}
    comments = [f"imported from fwknopd's access.conf, stanza {index} (line {stanza.line})"]

    username = values.get("REQUIRE_USERNAME", (0, None))[1]
    settings["username"] = username
    base = username if username and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,60}", username) else "stanza"
    name = _free_name(base, index, taken)
    if base != "stanza" and name != base:
        notes.append(
            f"line {stanza.line}: stanza {index}: key {base} is another stanza's already: this one is key {name} "
            f"({name}.keys)"
        )

    source = values["SOURCE"][1]
    if source.strip().upper() != "ANY":
        networks = []
        for item in filter(None, (part.strip() for part in re.split(r"[,\s]+", source))):
            try:
                networks.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise ValueError("SOURCE: an item is not an address or network (not shown)") from None
        settings["sources"] = networks
    destination = values.get("DESTINATION")
    if destination and destination[1].strip().upper() != "ANY":
        unmapped.append(
            f"line {destination[0]}: {_shown('DESTINATION', destination[1])} (nfknock guards this host; "
            "--interface narrows it to one interface)"
        )

    forced = _force_nat(values)
    if forced is not None:  # the key's holder reaches that destination only (docs/gateway.md)
        settings["force_nat"] = forced
        ports: list[str] = []
    else:
        ports = _ports(values["OPEN_PORTS"][1]) if "OPEN_PORTS" in values else []
        if "RESTRICT_PORTS" in values:
            restricted = set(_ports(values["RESTRICT_PORTS"][1]))
            ports = [port for port in (ports or protect) if port not in restricted]
            if not ports:
                raise ValueError("RESTRICT_PORTS leaves no port to open")
        if ports:
            settings["ports"] = ports
        else:
            ports = list(protect)
            notes.append(
                f"line {stanza.line}: stanza {index} has no OPEN_PORTS (fwknopd opens whatever a packet asks); "
                f"key {name} may open the door's ports: {' '.join(protect)} (--protect)"
            )

    open_for = _seconds(values, "FW_ACCESS_TIMEOUT")
    most = _seconds(values, "MAX_FW_TIMEOUT")
    if open_for is not None:
        settings["open_for"] = f"{open_for}s"
    if most is not None:
        if most < (open_for or 30):
            notes.append(f"line {values['MAX_FW_TIMEOUT'][0]}: MAX_FW_TIMEOUT below the access timeout: raised to it")
            most = open_for or 30
        settings["max_open_for"] = f"{most}s"
    else:
        notes.append(
            f"line {stanza.line}: stanza {index} sets no MAX_FW_TIMEOUT: fwknopd honours fwknop -f up to "
            f"{FWKNOPD_MAX_FW_TIMEOUT}s, nfknock only up to the key's open_for (MAX_OPEN_FOR in {name}.keys)"
        )

    if "ACCESS_EXPIRE" in values:
        number, text = values["ACCESS_EXPIRE"]
        try:
            settings["expires"] = datetime.strptime(text.strip(), "%m/%d/%Y").strftime("%Y-%m-%d")
        except ValueError:
            raise ValueError(f"line {number}: ACCESS_EXPIRE is not MM/DD/YYYY") from None
        notes.append(f"line {number}: ACCESS_EXPIRE counted from 00:00 UTC (fwknopd: the server's local time)")
    if "ACCESS_EXPIRE_EPOCH" in values:
        number, text = values["ACCESS_EXPIRE_EPOCH"]
        if not text.strip().isdigit() or not 0 < int(text) < 2**40:
            raise ValueError(f"line {number}: ACCESS_EXPIRE_EPOCH is not Unix seconds")
        moment = datetime.fromtimestamp(int(text), UTC)
        settings["expires"] = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    if digest != "sha256":
        settings["hmac_digest"] = digest

    encryption, key_line = _secret(values, "KEY", "KEY_BASE64")
    mac, mac_line = _secret(values, "HMAC_KEY", "HMAC_KEY_BASE64")
    fresh_encryption, fresh_mac = generate_keys()
    if encryption is None or len(encryption) < 16:
        why = "a placeholder" if encryption is None else "shorter than the 16 bytes nfknock requires"
        comments.append("fresh keys: give them to this key's users")
        notes.append(
            f"line {key_line or stanza.line}: the encryption key is {why}: key {name} has a fresh one "
            f"(in {name}.keys; clients need it)"
        )
        encryption = base64.b64decode(fresh_encryption)
    if mac is None or len(mac) < 32:
        why = "missing" if mac_line is None else "a placeholder" if mac is None else "shorter than 32 bytes"
        notes.append(
            f"line {mac_line or stanza.line}: the HMAC key is {why}: key {name} has a fresh one "
            f"(in {name}.keys; clients need it, with --use-hmac)"
        )
        mac = base64.b64decode(fresh_mac)
    if values.get("REQUIRE_SOURCE_ADDRESS", (0, "N"))[1].upper() != "Y":
        notes.append(
            f"line {stanza.line}: stanza {index}: nfknock requires the address in the packet to be its source "
            "(as REQUIRE_SOURCE_ADDRESS Y): clients use -a or -R, not -s"
        )
    try:
        text = key_file_text(
            name,
            base64.b64encode(encryption).decode(),
            base64.b64encode(mac).decode(),
            comments=tuple(comments),
            **settings,
        )
    except UsageError as exc:
        raise ValueError(str(exc)) from None
    return name, text, ports, mac


def _free_name(base: str, index: int, taken: set[str]) -> str:
    """The stanza's key name: its username, else `stanza<N>`; never one taken by an earlier
    stanza (two stanzas with one username, or a username `stanza2` before stanza 2)."""
    candidates = [base] if base != "stanza" else []
    candidates += [f"{base}{index}"] + [f"{base}{index}_{n}" for n in range(2, len(taken) + 3)]
    return next(name for name in candidates if name not in taken)


def _seconds(values: dict[str, tuple[int, str]], keyword: str) -> int | None:
    if keyword not in values:
        return None
    number, text = values[keyword]
    if not text.strip().isdigit() or not 0 < int(text) <= 86400:
        raise ValueError(f"line {number}: {keyword} is not a number of seconds in 1..86400")
    return int(text)
