.PHONY: check test demo bench

check:  ## lint (with a complexity ceiling), format check and strict types
	bash scripts/check.sh

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

bench:
	.venv/bin/python bench/latency.py
