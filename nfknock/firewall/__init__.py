"""The firewall: a pure plan of the fixed scaffolding (plan.py), the backends that install it in one
step per family (legacy.py: python-iptables; nft.py: iptables-nft-restore; both on backend.py),
the kernel sets the rules name (granted.py, sessions.py), conntrack (handshakes.py) and what the
host already has (host.py). This module is the registry of backends and nothing else."""

from __future__ import annotations

from collections.abc import Callable

from .backend import Firewall
from .host import iptables_flavour

FLAVOURS = ("legacy", "nft")


def resolve_flavour(choice: str = "auto", host_flavour: Callable[[], str | None] | None = None) -> str:
    """The backend a --firewall choice means: 'legacy' or 'nft'. `auto` follows the flavour of the
    host's `iptables` command (iptables_flavour(), or what `host_flavour` returns): nft when it is
    nf_tables, legacy otherwise (no iptables command included)."""
    if choice == "auto":
        detected = (host_flavour or iptables_flavour)()
        return "nft" if detected == "nf_tables" else "legacy"
    if choice in FLAVOURS:
        return choice
    raise ValueError(f"unknown firewall {choice!r} (auto, legacy or nft)")


def make_firewall(choice: str = "auto", interface: str | None = None) -> Firewall:
    """The backend for a --firewall choice (see resolve_flavour)."""
    choice = resolve_flavour(choice)
    if choice == "legacy":
        from .legacy import LegacyFirewall

        return LegacyFirewall(interface)
    if choice == "nft":
        from .nft import NftFirewall

        return NftFirewall(interface)
    raise ValueError(f"unknown firewall {choice!r} (auto, legacy or nft)")
