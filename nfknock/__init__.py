"""nfknock: inline NFQUEUE port knocking for Linux bastion hosts."""

__version__ = "0.1.0"
