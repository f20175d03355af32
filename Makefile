# leasesched — the commands a person needs. `make run` and `make test` set up
# everything they need on a fresh machine (venv, apt packages, code).

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
PROTOS := $(wildcard proto/leasesched/v1/*.proto)
GEN    := leasesched/v1/scheduler_pb2.py

.PHONY: run test typecheck proto setup deps infra-up infra-down clean bench bench-peers

## run: install everything, start the local system and show it working (Ctrl-C stops it)
run: setup
	$(BIN)/leasesched local up

## test: the type check, then the whole test suite; starts the Cassandra and ZooKeeper it needs itself
test: setup typecheck
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(BIN)/python -m pytest -ra

## typecheck: mypy over the product's packages (settings in pyproject.toml)
typecheck: setup
	$(BIN)/mypy

## proto: regenerate the gRPC code from proto/
proto: $(BIN)/python
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

setup: deps $(GEN)

$(GEN): $(PROTOS) $(BIN)/python
	$(MAKE) proto

$(BIN)/python: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/python

## deps: system packages — Java 17 (Cassandra 5.0 runs on 17, not newer), Maven (fetches Cassandra
## from Maven Central on first start), ZooKeeper, Chromium (the dashboard's browser tests drive
## Debian's chromium with Playwright; no browser is ever downloaded)
deps:
	@command -v mvn >/dev/null && test -x /usr/share/zookeeper/bin/zkServer.sh && ls /usr/lib/jvm/*17*/bin/java >/dev/null 2>&1 && command -v chromium >/dev/null || { \
	  echo "installing system packages (zookeeper, openjdk-17, maven, chromium)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zookeeper openjdk-17-jre-headless maven chromium >/dev/null; }

## bench: the benchmark of issue 4 (BENCHMARKS.md): a whole local cluster under open-loop load;
## writes results/<run>/report.json and chart.png, then stops everything it started.
## Its own home and ports, so a running `make run` or test session is not touched.
BENCH_HOME      ?= $(CURDIR)/.leasesched/bench
BENCH_COMMITLOG ?= batch
BENCH_ARGS      ?= --schedule-rate 1000 --poll-rate 3000 --duration 60 --profile task-service --profile task-updater --profile trigger-1 --profile client
BENCH_JIT       ?= c1
BENCH_ENV       := LEASESCHED_AUTH=off LEASESCHED_CASSANDRA_COMMITLOG_SYNC=$(BENCH_COMMITLOG) LEASESCHED_CASSANDRA_JIT=$(BENCH_JIT) LEASESCHED_CASSANDRA_PORT=29042 LEASESCHED_CASSANDRA_STORAGE_PORT=27000 LEASESCHED_ZK_HOSTS=127.0.0.1:22181
bench: setup
	@mkdir -p $(BENCH_HOME); if [ -d .leasesched/dist ] && [ ! -e $(BENCH_HOME)/dist ]; then ln -s $(CURDIR)/.leasesched/dist $(BENCH_HOME)/dist; fi
	$(BENCH_ENV) $(BIN)/leasesched --home $(BENCH_HOME) loadtest $(BENCH_ARGS) --results results --label bench --stop-infra

## bench-peers: issue 17 (BENCHMARKS.md): the same no-op load on leasesched and on Celery + Redis, one table
## of both. Installs what only it needs: Debian's redis-server, the pinned Celery (the extra `peers`).
## First `leasesched loadtest` (PEERS_LEASESCHED_ARGS; Cassandra and ZooKeeper stopped after it), then the
## peer (PEERS_ARGS, see `python -m leasesched.loadtest.peers --help`): its own redis-server and worker on
## ports of their own. leasesched's home and ports: LEASESCHED_HOME, LEASESCHED_CASSANDRA_PORT,
## LEASESCHED_CASSANDRA_STORAGE_PORT, LEASESCHED_ZK_HOSTS from the environment when set, else make bench's.
PEERS_LEASESCHED_ARGS ?= --schedule-rate 100 --poll-rate 0 --delayed 0 --duration 60 --drain 30 --probe-seconds 0
PEERS_ARGS            ?=
PEERS_HOME            ?= $(or $(LEASESCHED_HOME),$(BENCH_HOME))
PEERS_CASSANDRA_PORT  ?= $(or $(LEASESCHED_CASSANDRA_PORT),29042)
PEERS_STORAGE_PORT    ?= $(or $(LEASESCHED_CASSANDRA_STORAGE_PORT),27000)
PEERS_ZK_HOSTS        ?= $(or $(LEASESCHED_ZK_HOSTS),127.0.0.1:22181)
PEERS_ENV := LEASESCHED_AUTH=off LEASESCHED_CASSANDRA_COMMITLOG_SYNC=$(BENCH_COMMITLOG) LEASESCHED_CASSANDRA_PORT=$(PEERS_CASSANDRA_PORT) \
             LEASESCHED_CASSANDRA_STORAGE_PORT=$(PEERS_STORAGE_PORT) LEASESCHED_ZK_HOSTS=$(PEERS_ZK_HOSTS)
bench-peers: setup
	@test -x /usr/bin/redis-server || { echo "installing redis-server"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	$(BIN)/pip install -q -e '.[peers]'
	@mkdir -p $(PEERS_HOME) results; if [ -d .leasesched/dist ] && [ ! -e $(PEERS_HOME)/dist ]; then ln -s $(CURDIR)/.leasesched/dist $(PEERS_HOME)/dist; fi
	@report=$$(mktemp); trap 'rm -f $$report' EXIT; \
	$(PEERS_ENV) $(BIN)/leasesched --home $(PEERS_HOME) loadtest $(PEERS_LEASESCHED_ARGS) --results results \
	  --label peers-leasesched --stop-infra --json > $$report || [ $$? -eq 2 ] && \
	$(BIN)/python -m leasesched.loadtest.peers --leasesched-report $$report --results results $(PEERS_ARGS)

infra-up: setup
	$(BIN)/leasesched infra up

infra-down:
	$(BIN)/leasesched infra down

clean:
	rm -rf $(VENV) leasesched/v1/*_pb2*.py leasesched/v1/*_pb2*.pyi
