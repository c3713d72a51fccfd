"""The optional parts of nfknock and what each one needs.

A plain `pip install nfknock` is the client: knock, spa, otp, keygen and check need only dpkt,
pydantic, PyYAML and cryptography, and nothing has to be compiled. The daemon needs the
`server` extra (netfilterqueue, python-iptables, pyroute2), its exporter the `metrics` extra
(prometheus-client), fleet mode (--cluster) the `fleet` extra (redis). Those modules are
imported only where they are used; `require` turns a missing one into a single line that names
the extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import FirewallError, NfknockError

SERVER = "server"
METRICS = "metrics"
FLEET = "fleet"
SERVER_MODULES = {
    "netfilterqueue": "netfilterqueue",
    "iptc": "python-iptables",
    "pyroute2": "pyroute2",
}  # module -> distribution


class MissingExtra(NfknockError):
    """An optional dependency is not installed; the message names the extra that brings it."""

    exit_code = 2


def require(module: str, extra: str, needed_by: str) -> ModuleType:
    """Import `module`, or raise MissingExtra: '<needed_by> needs the <extra> extra: ...'.

    Only the module itself being absent is reported this way; a module that is there but fails
    to load (a missing shared library, say) raises its own error for the caller to explain."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module.partition(".")[0]:
            raise
        raise MissingExtra(
            f"{needed_by} needs the {extra} extra: pip install 'nfknock[{extra}]' ({exc.name} is not installed)"
        ) from None


def require_for_run(metrics_port: int | None, firewall_name: str) -> None:
    """Everything `nfknock run` will import, checked before it binds a queue or installs a rule."""
    require("netfilterqueue", SERVER, "nfknock run")
    require("pyroute2", SERVER, "nfknock run")
    if firewall_name == "legacy":  # the nft backend runs the nft command instead
        load_iptc()
    if metrics_port:
        require("prometheus_client", METRICS, "--metrics-port")


def absent(modules) -> list[str]:
    """Which of these modules are not installed (looked up, not imported: for `nfknock doctor`)."""
    return [module for module in modules if importlib.util.find_spec(module) is None]


def load_iptc():
    """python-iptables (the `server` extra), or one error that says what is wrong with it."""
    try:
        import iptc
    except ModuleNotFoundError as exc:
        if exc.name == "iptc":
            raise MissingExtra(
                f"the legacy iptables backend needs the {SERVER} extra: "
                f"pip install 'nfknock[{SERVER}]' (python-iptables is not installed)"
            ) from None
        raise FirewallError(f"python-iptables cannot load the iptables libraries: {exc}") from None
    except Exception as exc:  # missing libxtables/libip4tc raises assorted errors
        raise FirewallError(f"python-iptables cannot load the iptables libraries: {exc}") from None
    return iptc
