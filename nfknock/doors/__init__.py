"""The decision core: doors as validated data and the pure engine that judges packets against them.

Nothing in this folder does I/O: no clock (callers pass `now`), no sockets, no files, no logging,
no firewall. tests/unit/test_purity.py checks every module here, and tests/unit/test_layout.py
that no import cycle hides anywhere in the package.
"""
