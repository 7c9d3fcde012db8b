# The few commands people type. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build test test-only lint fmt servers servers-stop servers-status clean-servers demo bench powercut soak fleet help

all: build

help:
	@echo "make build          build the workspace"
	@echo "make test           start the test servers, fmt check, clippy, cargo test, stop the servers"
	@echo "make lint           cargo fmt --check and clippy -D warnings"
	@echo "make fmt            cargo fmt"
	@echo "make servers        start nginx, pyftpdlib, vsftpd, mosquitto on 127.0.0.1 (installs them if missing)"
	@echo "                    then: . target/test-servers/env && cargo test"
	@echo "make test-only      cargo test with the running servers' env (after make servers)"
	@echo "make servers-stop   stop them; make clean-servers also deletes target/test-servers"
	@echo "make demo           run the demo"
	@echo "make bench          run the benchmarks"
	@echo "make soak           the store over years: 10,000 upgrades and 100,000 refused requests, its size as it goes"
	@echo "make powercut       real power cuts: the agent in a QEMU VM, qemu SIGKILLed (CUTS=100, SEED=S to replay)"
	@echo "make fleet          N agents (N=200) on one Mosquitto and one nginx, the broker restarted halfway"

build:
	$(CARGO) build --workspace

test:
	@scripts/run-tests.sh

test-only:
	@set -a && . target/test-servers/env && set +a && $(CARGO) test --workspace $(CARGO_TEST_ARGS)

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

servers:
	@scripts/test-servers.sh start
	@echo "servers up; for cargo test run: . target/test-servers/env"

servers-stop:
	@scripts/test-servers.sh stop

servers-status:
	@scripts/test-servers.sh status

clean-servers:
	@scripts/test-servers.sh clean

demo:
	@scripts/demo.sh

bench:
	@scripts/bench.sh

soak:
	$(CARGO) build --release -p fwagent-state --example store_soak
	@dir=$$(mktemp -d /dev/shm/fwagent-soak.XXXXXX) && trap 'rm -rf "$$dir"' EXIT && \
		target/release/examples/store_soak "$$dir/state" $(or $(UPGRADES),10000) $(or $(REFUSED),100000)

powercut:
	@CUTS="$(or $(CUTS),10)" scripts/powercut.sh

fleet:
	@N="$(or $(N),200)" scripts/fleet.sh
