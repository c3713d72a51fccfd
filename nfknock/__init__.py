"""nfknock: inline NFQUEUE port knocking for Linux bastion hosts."""

# The one place the version is written: setup.cfg reads it (`attr:`, evaluated statically, so
# building never imports nfknock), and a checkout without an install reports the same number.
__version__ = "0.2.0"
