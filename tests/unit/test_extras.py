"""The optional parts: a missing extra is one line naming what to install, exit code 2."""

import sys

import pytest

from nfknock import extras
from nfknock.errors import FirewallError
from nfknock.extras import MissingExtra, require, require_for_run


def absent(monkeypatch, *modules):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ModuleNotFoundError


def test_a_missing_module_names_its_extra(monkeypatch):
    absent(monkeypatch, "netfilterqueue")
    with pytest.raises(MissingExtra) as caught:
        require("netfilterqueue", extras.SERVER, "nfknock run")
    assert str(caught.value) == (
        "nfknock run needs the server extra: pip install 'nfknock[server]' (netfilterqueue is not installed)"
    )
    assert caught.value.exit_code == 2


def test_a_present_module_is_returned():
    assert require("json", extras.SERVER, "x").__name__ == "json"


def test_a_module_missing_inside_an_installed_one_is_not_blamed_on_the_extra(monkeypatch, tmp_path):
    (tmp_path / "brokenpkg.py").write_text("import nfknock_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError):
        require("brokenpkg", extras.SERVER, "x")


def test_run_checks_the_server_extra_first(monkeypatch):
    absent(monkeypatch, "netfilterqueue", "prometheus_client")
    with pytest.raises(MissingExtra, match=r"^nfknock run needs the server extra"):
        require_for_run(9474, "nft")


@pytest.mark.parametrize("port", [None, 0])
def test_prometheus_client_is_needed_only_with_a_metrics_port(monkeypatch, port):
    absent(monkeypatch, "prometheus_client")
    require_for_run(port, "nft")


def test_a_metrics_port_needs_the_metrics_extra(monkeypatch):
    absent(monkeypatch, "prometheus_client")
    with pytest.raises(
        MissingExtra, match=r"^--metrics-port needs the metrics extra: pip install 'nfknock\[metrics\]'"
    ):
        require_for_run(9474, "nft")


def test_the_legacy_backend_needs_python_iptables(monkeypatch):
    absent(monkeypatch, "iptc")
    require_for_run(None, "nft")  # the nft backend runs commands, not python-iptables
    with pytest.raises(
        MissingExtra, match=r"needs the server extra: pip install 'nfknock\[server\]' \(python-iptables"
    ):
        require_for_run(None, "legacy")


def test_python_iptables_that_cannot_load_its_libraries_is_a_firewall_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name == "iptc":
            raise OSError("libxtables.so.12: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "iptc", raising=False)
    monkeypatch.setattr(builtins, "__import__", failing)
    with pytest.raises(FirewallError, match="cannot load the iptables libraries: libxtables"):
        require_for_run(None, "legacy")
