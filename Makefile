# vmwebapp: the operator and the webapp runtime it deploys.
# `make help` lists the targets.

CARGO ?= cargo
HOST ?= 127.0.0.1
PORT ?= 8000
VENV ?= .venv-test

.DEFAULT_GOAL := help
.PHONY: help run test test-chart deps build bench fmt lint check-config migrate crd render rbac golden e2e run-operator clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

run: ## Run the app locally: embedded SQLite under ./var/vm, in-process worker, http://127.0.0.1:8000
	$(CARGO) run -p vm-webapp -- serve --host $(HOST) --port $(PORT)

test: deps ## Install what the tests need (if missing), then run every test
	$(CARGO) test --workspace
	$(CARGO) test --workspace --benches --no-run
	$(VENV)/bin/python -m pytest -q tests

test-chart: ## Chart, alert and docs tests only (pytest with real Helm; needs the built binaries)
	VENV=$(VENV) ./scripts/install-chart-test-deps.sh
	$(VENV)/bin/python -m pytest -q tests

deps: ## Install the test dependencies (PostgreSQL 15, Redis, Python venv with Helm's SDK, Lua) when missing
	./scripts/install-test-deps.sh
	VENV=$(VENV) ./scripts/install-chart-test-deps.sh

build: ## Build everything
	$(CARGO) build --workspace --all-targets

bench: deps ## Queue throughput and latency on SQLite and PostgreSQL (prints figures, asserts nothing)
	$(CARGO) bench -p vm-webapp --bench queue

fmt: ## Format the code
	$(CARGO) fmt --all

lint: ## Check formatting and run clippy
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets

check-config: ## Validate the current environment the way the app will
	$(CARGO) run -q -p vm-webapp -- check-config

migrate: ## Apply database migrations to VM_DB_URL (or the embedded SQLite)
	$(CARGO) run -q -p vm-webapp -- migrate

crd: ## Regenerate the checked-in CRD from the operator's types
	$(CARGO) run -q -p vm-operator -- crd > crds/vmwebapps.webapp.vm.dev.yaml
	cp crds/vmwebapps.webapp.vm.dev.yaml charts/vm-operator/files/crds/

render: ## Print what a reconcile of examples/production.yaml applies (no cluster needed)
	$(CARGO) run -q -p vm-operator -- render -f examples/production.yaml

rbac: ## Print the RBAC rules the operator needs
	$(CARGO) run -q -p vm-operator -- rbac

golden: ## Regenerate the operator's golden render files and the CRD
	UPDATE_GOLDEN=1 $(CARGO) test -p vm-operator

e2e: ## Operator end-to-end suite against the cluster in VM_E2E_KUBECONFIG
	$(CARGO) test -p vm-operator --test e2e -- --nocapture

run-operator: ## Run the operator against the current kubeconfig (one replica, no leader election)
	$(CARGO) run -p vm-operator -- run --log-format pretty --no-leader-election

clean: ## Remove build output and local data
	$(CARGO) clean
	rm -rf var $(VENV)
