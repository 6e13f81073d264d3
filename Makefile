.PHONY: run test bench lint

# Install everything and serve the default model on http://127.0.0.1:8000.
run:
	bash scripts/setup.sh
	.venv/bin/hawker serve

# Install everything (with test tools), type-check hawker/ and run the whole test suite.
test:
	bash scripts/setup.sh test
	.venv/bin/mypy
	.venv/bin/python -m pytest tests

bench:
	bash scripts/setup.sh
	.venv/bin/hawker bench throughput

lint:
	.venv/bin/ruff format --check . && .venv/bin/ruff check .
