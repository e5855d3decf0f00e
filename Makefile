# ADIT on Prefect. `make demo` runs the main job on embedded defaults; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := orthanc orthanc-dicomweb dcmtk dcm2niix chromium

.PHONY: install system-packages cluster-packages demo demo-servers test test-cluster lint bench server-status server-stop clean

install: system-packages $(VENV)/.installed

# Debian packages for the local PACS servers (demo, tests, benchmarks); installed when missing.
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# PostgreSQL for the cluster test (`make test-cluster`) and for a shared Prefect server.
cluster-packages:
	@$(MAKE) --no-print-directory system-packages APT_PACKAGES=postgresql

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/python -m deployments.demo

# Only the two demo PACS and .demo/nodes.yaml (for trying a cluster, README "scale-out").
demo-servers: install
	$(BIN)/python -m deployments.demo --servers-only

test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "not cluster"

# The cluster test: PostgreSQL, a Prefect server, two worker machines, one killed (~6 min).
test-cluster: install cluster-packages
	$(BIN)/python -m pytest -m cluster -s tests/test_cluster.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# Every benchmark, one table: ADIT vs DCMTK/Orthanc, memory, CLI latency, batch overhead (~8 min).
bench: install
	$(BIN)/python benchmarks/run_all.py

# The CLI's local Prefect server (started by the first `adit` command that runs a flow).
server-status: install
	$(BIN)/python -m deployments.cli server status

server-stop: install
	$(BIN)/python -m deployments.cli server stop

clean:
	rm -rf $(VENV) .demo .pytest_cache
