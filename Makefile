# Shortcuts; the scripts work without make (a fresh machine may not have it).
.PHONY: setup demo test lint check fuzz bench deb
setup:
	bash scripts/setup.sh
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
lint:
	bash scripts/lint.sh
check: setup
	.venv/bin/nfknock check --rules rules
fuzz:
	bash scripts/fuzz.sh
bench:
	bash scripts/bench.sh
deb:
	bash scripts/build-deb.sh
