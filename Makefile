# vmwebapp: the operator and the webapp runtime it deploys.
# `make help` lists the targets.

CARGO ?= cargo
HOST ?= 127.0.0.1
PORT ?= 8000
VENV ?= .venv-test

# Where Cargo puts its output (honours CARGO_TARGET_DIR like Cargo does).
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
BIN := $(TARGET_DIR)/debug

.DEFAULT_GOAL := help
.PHONY: help run test test-chart deps build bins bench fmt lint check-config migrate crd render rbac golden e2e run-operator clean

help: ## List the targets
	@grep -E '^[a-zA-Z0-9_.-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

run: ## Run the app locally: embedded SQLite under ./var/vm, in-process worker, http://127.0.0.1:8000 (another port: make run PORT=8001)
	$(CARGO) run -p vm-webapp -- serve --host $(HOST) --port $(PORT)

test: deps ## Install what the tests need (if missing), then run every test
	$(CARGO) test --workspace
	$(CARGO) test --workspace --benches --no-run
	$(VENV)/bin/python -m pytest -q tests

test-chart: ## Chart, alert and docs tests only (pytest with real Helm, Prometheus and Alertmanager; the incident drills take about 3 minutes; needs the built binaries)
	VENV=$(VENV) ./scripts/install-chart-test-deps.sh
	$(VENV)/bin/python -m pytest -q tests

deps: ## Install the test dependencies (PostgreSQL 15, Redis, libfaketime, Prometheus and Alertmanager, Python venv with Helm's SDK, Lua, Chromium with node and playwright-core) when missing
	./scripts/install-test-deps.sh
	VENV=$(VENV) ./scripts/install-chart-test-deps.sh

build: ## Build everything
	$(CARGO) build --workspace --all-targets

bench: deps ## Queue, API and slow-step figures beside pgqueuer and a FastAPI anchor on one stock PostgreSQL (prints the ratios; fails only if a run did not succeed)
	./app/benches/peers/setup.sh
	VM_TEST_PG_STOCK=1 $(CARGO) bench -p vm-webapp --bench queue

fmt: ## Format the code
	$(CARGO) fmt --all

lint: ## Check formatting and run clippy
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets

# The binaries of the targets below come from the very build `make test`
# runs (`cargo test --workspace`: same profile, same features), so after a
# `make test` they start at once, and before one they build visibly (Cargo's
# progress on stderr) what `make test` then reuses. A plain `cargo run` would
# resolve features without the test dependencies and rebuild most crates.
bins: ## Build the vm-webapp and vm-operator binaries exactly as `make test` does
	$(CARGO) test --workspace --no-run

check-config: bins ## Validate the current environment the way the app will
	$(BIN)/vm-webapp check-config

migrate: bins ## Apply database migrations to VM_DB_URL (or the embedded SQLite)
	$(BIN)/vm-webapp migrate

crd: bins ## Regenerate the checked-in CRD from the operator's types
	$(BIN)/vm-operator crd > crds/vmwebapps.webapp.vm.dev.yaml
	cp crds/vmwebapps.webapp.vm.dev.yaml charts/vm-operator/files/crds/

render: bins ## Print what a reconcile of examples/production.yaml applies (no cluster needed)
	$(BIN)/vm-operator render -f examples/production.yaml

rbac: bins ## Print the RBAC rules the operator needs
	$(BIN)/vm-operator rbac

golden: ## Regenerate the operator's golden render files and the CRD
	UPDATE_GOLDEN=1 $(CARGO) test -p vm-operator

e2e: ## Operator end-to-end suite against the cluster in VM_E2E_KUBECONFIG
	$(CARGO) test -p vm-operator --test e2e -- --nocapture

run-operator: ## Run the operator against the current kubeconfig (one replica, no leader election)
	$(CARGO) run -p vm-operator -- run --log-format pretty --no-leader-election

clean: ## Remove build output and local data
	$(CARGO) clean
	rm -rf var $(VENV) .venv-bench

.PHONY: bench-operator
bench-operator: ## Operator at scale on VM_E2E_KUBECONFIG's cluster: converge time of N VmWebapps vs the API server floor, steady-state writes, memory (VM_BENCH_APPS, VM_BENCH_CONCURRENCY)
	$(CARGO) test -p vm-operator --release --test bench -- --nocapture
