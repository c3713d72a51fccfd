"""Code shared by the tests, the benchmarks and the demo: network namespaces, flood senders,
fakes and fault injection. Not part of the nfknock package (not in the wheel).

Imported as the top-level package `support`: tests/conftest.py puts tests/ on sys.path for the
test suite; bench/*.py and scripts/demo.py put it there themselves.
"""
