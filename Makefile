.PHONY: check test demo bench

check:  ## lint, format check and strict types
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy shared sdk services cumulus_core job_image

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

bench:
	.venv/bin/python bench/latency.py
