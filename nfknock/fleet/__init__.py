"""Fleet mode: several nfknock members share grants, revocations and replay records through
Redis. records.py is pure (signing with the fleet key); link.py is the Redis I/O, in threads of
its own; member.py is what the daemon's loop calls. The engine never sees any of it."""
