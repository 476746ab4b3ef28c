# The stack's tasks. `make` lists them.
SHELL := /usr/bin/env bash
INFRA := scripts/infra.sh
# Exports pointing the services and tests at the servers started by scripts/infra.sh.
WITH_INFRA = eval "$$($(INFRA) env)" &&
# The temp directory of one test run (TMPDIR of the tests: process logs, SQLite files, certificates), emptied when
# the next run starts, so repeated runs do not fill the disk and the last run's logs stay for reading.
TEST_TMP := $(CURDIR)/target/test-tmp

.DEFAULT_GOAL := help
.PHONY: fleet-up fleet-down fleet-status chaos chaos-test deploy-files help build run test test-unit fuzz fuzz-decoders bench dashboards lint fmt infra-install infra-up infra-down infra-status up down status

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

build: ## build every crate
	cargo build --workspace

run: ## the main job on the embedded default: all KillrVideo services on 127.0.0.1:50101, SQLite, no servers
	cargo run -p killrvideo-server

test: infra-install infra-up ## every test, against the real Consul, Kafka, PostgreSQL and StatsD/Graphite; then no secret in any log
	cargo build --workspace --bins
	$(INFRA) clean-tests
	@rm -rf $(TEST_TMP) && mkdir -p $(TEST_TMP)
	$(WITH_INFRA) TMPDIR=$(TEST_TMP) cargo test --workspace
	scripts/secrets-in-logs.sh $(TEST_TMP)

fuzz: infra-install infra-up ## structure-aware fuzzing of every RPC in process (100,000 cases per service; KEEL_FUZZ_CASES, KEEL_FUZZ_SEED)
	cargo build --workspace --bins
	@rm -rf $(TEST_TMP) && mkdir -p $(TEST_TMP)
	$(WITH_INFRA) TMPDIR=$(TEST_TMP) KEEL_FUZZ_CASES=$${KEEL_FUZZ_CASES:-100000} cargo test -p killrvideo-server -p cache -p geo-search --test it fuzz -- --nocapture
	$(MAKE) fuzz-decoders

FUZZ_SECONDS ?= 60
fuzz-decoders: ## cargo-fuzz (libFuzzer) on the decoders of untrusted input: paging tokens, ids, events (FUZZ_SECONDS each; nightly)
	@cargo +nightly --version >/dev/null 2>&1 || { echo "fuzz-decoders: needs the nightly toolchain (rustup toolchain install nightly)" >&2; exit 1; }
	@cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked --version 0.13.2
	cd fuzz && for t in paging_token ids events; do \
	  mkdir -p corpus/$$t && cp -n regressions/$$t/* corpus/$$t/ 2>/dev/null; \
	  cargo +nightly fuzz run $$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

test-unit: ## tests that need no server (pure logic and generated code)
	cargo test --workspace --lib
	cargo test -p keel-protos

bench: infra-install infra-up ## release service processes under ghz beside bare tonic servers and pgbench; prints a table. BENCH_ARGS="--duration 10s"
	cargo build --release --bins
	$(WITH_INFRA) target/release/keel-bench $(BENCH_ARGS)

lint: ## rustfmt, clippy and cargo-deny (licences, duplicate versions, sources: deny.toml), as CI runs them
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	@cargo deny --version >/dev/null 2>&1 || cargo install cargo-deny --locked --version 0.20.2
	cargo deny check licenses bans sources

fmt: ## format the code
	cargo fmt --all

infra-install: ## install Consul, Kafka, PostgreSQL+PostGIS, StatsD, Graphite (cached; skips what is there)
	$(INFRA) install postgres consul kafka graphite statsd tools

infra-up: ## start the real servers on 127.0.0.1 (idempotent)
	$(INFRA) start

infra-down: ## stop the servers started by infra-up
	$(INFRA) stop

infra-status: ## which servers are up, where
	$(INFRA) status

up: infra-install infra-up ## local cluster: the servers plus every service as its own process (release builds), in Consul
	cargo build --release --bins
	$(WITH_INFRA) scripts/cluster.sh start
	$(WITH_INFRA) target/release/keel dashboards --load "$$KEEL_GRAPHITE_URL"

fleet-up: infra-install ## a fleet of machines as network namespaces (root): 3 Consul servers, 3 Kafka brokers, PostgreSQL, ops, every service of deploy/fleet.toml spread over 3 app machines
	cargo build --workspace --bins
	scripts/fleet.sh up

fleet-down: ## stop the fleet and remove its namespaces, bridge and files
	scripts/fleet.sh down

fleet-status: ## the fleet's machines and which instance runs where, with its Consul health
	scripts/fleet.sh status

chaos: ## faults under load on the fleet (make fleet-up first): the table of figures and targets. CHAOS_ARGS="--short kill"
	cargo build -p keel-chaos
	target/debug/keel-chaos run $(CHAOS_ARGS)

chaos-test: infra-install ## the chaos scenarios, shortened, as a test (also part of make test): brings a fleet up (root) and down, fails on a missed target
	cargo build --workspace --bins
	cargo test -p keel-chaos --test chaos -- --nocapture

deploy-files: ## render deploy/fleet.toml into deploy/{systemd,kubernetes,consul,kafka} (a test keeps them equal)
	cargo run -q -p keel -- deploy --dir deploy

dashboards: infra-install infra-up ## regenerate deploy/dashboards from the protos and load them into graphite-web
	$(WITH_INFRA) cargo run -q -p keel -- dashboards --out deploy/dashboards --load "$$KEEL_GRAPHITE_URL"

down: ## stop the local cluster and the servers
	scripts/cluster.sh stop
	$(INFRA) stop

status: ## the cluster's processes and servers
	scripts/cluster.sh status
	$(INFRA) status
