# One dev loop, reused by CI (.ci/run -> make test).
.PHONY: install check test test-rabbitmq4 cluster unit demo bench fmt clean

install:
	@scripts/install

check: install
	@scripts/check

fmt: install
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

# Installs everything, starts RabbitMQ when needed, runs check and the tests.
test:
	@scripts/test

# Only the broker-facing suites on RabbitMQ 4.x (scripts/rabbitmq4, needs root).
test-rabbitmq4:
	@scripts/test --rabbitmq4

# A three-node RabbitMQ 4.x cluster on 5691-5693 (scripts/cluster 4 stop ends it).
cluster:
	@scripts/cluster 4 start

unit: install
	.venv/bin/pytest tests/unit

demo: install
	@scripts/ensure-rabbitmq
	.venv/bin/llmq demo

bench:
	@scripts/install bench
	@scripts/ensure-rabbitmq
	LITELLM_LOCAL_MODEL_COST_MAP=True .venv-bench/bin/python -m bench all

clean:
	rm -rf .venv .venv-bench .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov
