.PHONY: run test bench lint

# Install everything and generate from the default model.
run:
	bash scripts/setup.sh
	.venv/bin/hawker generate "What is the capital of France?" --chat --max-tokens 64

# Install everything (with test tools) and run the whole test suite.
test:
	bash scripts/setup.sh test
	.venv/bin/python -m pytest tests

bench:
	bash scripts/setup.sh
	.venv/bin/hawker bench throughput

lint:
	.venv/bin/ruff format --check . && .venv/bin/ruff check .
