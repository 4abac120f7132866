# queue-bridge developer commands. `make help` lists them.
SHELL := /bin/bash
PY := .venv/bin/python
STATE := deploy/local/state
# The test command that README.md shows and .ci/run runs.
PYTEST := .venv/bin/pytest -p no:cacheprovider

.PHONY: help venv node-deps browser run bridge demo test test-unit test-quorum soak lint bandit typecheck check bench bench-quick bench-json bench-decode bench-counts keyring clean \
	stack-up stack-down stack-status

help:
	@echo "make run         start RabbitMQ + Cassandra, the bridge and the demo engine/worker"
	@echo "make test        start the stack and run the whole test suite against it"
	@echo "make lint        ruff (check + format)"
	@echo "make check       ruff + mypy (strict on bridge/) + bandit"
	@echo "make bench       benchmark suite (add --quick via make bench-quick)"
	@echo "make stack-up | stack-down | stack-status"

venv: .venv/.synced
.venv/.synced: pyproject.toml uv.lock
	bash deploy/local/python.sh
	@touch $@

keyring: $(STATE)/keyring.json
$(STATE)/keyring.json: | venv
	@mkdir -p $(STATE)
	$(PY) -m bridge keyring generate $@ --owner engine --owner worker-a --owner worker-b --owner guest

# The bridge alone, in the foreground, against the local stack, as its own least-privileged broker
# user (guest is the administrator; a bridge trusts its own user to name any owner in an add, and
# only there).
bridge: venv stack-up keyring
	BRIDGE_AMQP_URL=amqp://queue-bridge:queue-bridge@127.0.0.1:5672/ BRIDGE_KEYRING=$(STATE)/keyring.json \
		BRIDGE_TRUSTED_USERS=engine $(PY) -m bridge run

# Everything a newcomer needs to see tasks flow.
run: venv stack-up keyring
	$(PY) examples/run_demo.py

# The suite runs in TEST_WORKERS processes (pytest-xdist): most tests wait on the servers (a lease
# running out, a long-poll), so more processes than cores fill the waits: the parallel pass took
# 729 s in 2 processes (a clean clone's CI), 524 s in 3, 429 s in 4 and 390 s in 6 (the machine 80%
# busy in 4, 95% in 6: docs/performance.md, "The suite in four processes"). Three, not four: in 4
# processes two clean-clone runs failed a test each, one of them a timing bound (a reconnection
# ready in 2.08 s against 2.0): the suite's margins are set for less load. Each process has its own
# keyspace and every test its own exchange and queues. Tests marked `exclusive` restart a server or
# raise a broker alarm under every client: they run after, alone. Each pass lists its slowest tests.
# The 3-node clusters (three Cassandra JVMs, three RabbitMQ nodes) start while the behaviour suite
# runs its Cassandra half on the store's other CQL driver (cassandra-driver), and their drills run
# last, in two processes: one per file, so the Cassandra drills (kill a node of the Cassandra
# cluster) run beside the RabbitMQ ones (kill a node of the broker cluster), each on the other's
# single-node server. The clusters are stopped after, whatever the outcome.
TEST_WORKERS ?= 3
test: venv stack-up node-deps browser
	$(PYTEST) -m "not cluster and not exclusive" -n $(TEST_WORKERS) --dist worksteal --durations=12
	$(PYTEST) -m "exclusive and not cluster" --durations=5
	{ bash deploy/local/rabbitmq-cluster.sh up & rabbit=$$!; bash deploy/local/cassandra-cluster.sh up & cass=$$!; \
		BRIDGE_CASSANDRA_DRIVER=datastax $(PYTEST) -m integration tests/behaviour; behaviour=$$?; \
		wait $$rabbit; up=$$?; wait $$cass; up=$$((up + $$?)); \
		[ $$behaviour -eq 0 ] && [ $$up -eq 0 ] && $(PYTEST) -m cluster -n 2 --dist loadfile --durations=5; rc=$$?; \
		bash deploy/local/cassandra-cluster.sh down; bash deploy/local/rabbitmq-cluster.sh down; exit $$rc; }

# The 30-minute soak (`make test` runs a 20 s one). The one test longer than the suite's 60 s
# per-test timeout, so it raises the timeout here: 30 minutes of load plus 5 for set-up and drain.
soak: venv stack-up
	QB_SOAK_SECONDS=1800 $(PYTEST) -m soak -s -o timeout=2100

# Node.js and the locked dependencies of examples/node (tests/integration/test_node_client.py).
node-deps:
	bash deploy/local/node.sh

# Headless Chromium + chromedriver from Debian (tests/integration/test_console.py, the operator console).
browser:
	bash deploy/local/browser.sh

test-unit: venv
	$(PYTEST) tests/unit

lint: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# Security lint of bridge/ (configuration in pyproject.toml [tool.bandit]).
bandit: venv
	.venv/bin/bandit -c pyproject.toml -r bridge -q

typecheck: venv
	.venv/bin/mypy bridge

check: lint typecheck bandit

bench: venv stack-up keyring
	$(PY) -m benchmarks.run

bench-quick: venv stack-up keyring
	$(PY) -m benchmarks.run --quick

# CPU per request of the JSON pass-through, both ways in one run (no servers).
bench-json: venv
	$(PY) -m benchmarks.json_passthrough

# CPU per request of decoding its frames, pamqp's way and the bridge's, in one run (no servers).
bench-decode: venv
	$(PY) -m benchmarks.frame_decode

bench-counts: venv
	$(PY) -m benchmarks.counts_flush

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache

# ---- local stack (deploy/local: RabbitMQ + Cassandra), see deploy/local/README.md ----
stack-up:
	bash deploy/local/stack.sh up

stack-down:
	bash deploy/local/stack.sh down

stack-status:
	bash deploy/local/stack.sh status

# The contract's core files again with the bridge's durable queues as quorum queues
# (BRIDGE_QUEUE_TYPE=quorum; not part of `make test`: tests/integration/test_quorum_queues.py is).
test-quorum: venv stack-up
	BRIDGE_QUEUE_TYPE=quorum $(PYTEST) -n $(TEST_WORKERS) tests/integration/test_quorum_queues.py \
		tests/integration/test_queue_semantics.py tests/integration/test_lifecycle.py \
		tests/integration/test_bad_input.py tests/integration/test_long_poll.py tests/integration/test_smoke.py \
		tests/integration/test_add_edges.py tests/integration/test_message_properties.py \
		tests/integration/test_multi_instance.py
