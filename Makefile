# Smart Grid Load Balancer — every command a user needs.
#   make run    start the whole stack as local processes (no Docker needed)
#   make test   install what the tests need, then run the whole suite
#   make loadtest  rush hour against the running stack, report in loadtest-results/
#   make bench  print benchmark figures
# Everything Python runs from a virtual environment of the project's own, so no system
# Python is changed (Debian's refuses pip installs anyway, PEP 668).
BOOTSTRAP_PYTHON ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
# gunicorn, honcho, docker-compose and hadolint are called by name: the venv's come first.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
STAMP := $(VENV)/installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

.PHONY: run test bench loadtest install install-test prometheus iproute2 grafana-schema clean help

help:
	@sed -n 's/^#   //p' Makefile

$(VENV)/bin/python:
	$(BOOTSTRAP_PYTHON) -m venv $(VENV) || { \
		echo "Installing python3-venv from Debian's packages..."; \
		apt-get update -qq && $(APT_INSTALL) python3-venv >/dev/null && $(BOOTSTRAP_PYTHON) -m venv $(VENV); }

# pip is slow even when nothing changes: install again only when pyproject.toml does.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

# Debian's package brings prometheus and promtool; the suite runs both for real. On a host
# with systemd the package also starts its own server on :9090, which `make run` needs: stop it.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
		echo "Installing Prometheus and promtool from Debian's packages..."; \
		apt-get update -qq && $(APT_INSTALL) prometheus >/dev/null; \
		{ systemctl disable --now prometheus 2>/dev/null || true; }; }

# The network-partition tests build their test hosts with ip (network namespaces, a bridge).
iproute2:
	@command -v ip >/dev/null || { \
		echo "Installing iproute2 from Debian's packages..."; \
		apt-get update -qq && $(APT_INSTALL) iproute2 >/dev/null; }

# Grafana's dashboard schema and TypeScript, to type-check grafana/dashboards/*.json
# (tests/test_grafana_dashboards.py); npm ci runs again only when the lock file changes.
SCHEMA_CHECK := grafana/schema-check
$(SCHEMA_CHECK)/node_modules/.package-lock.json: $(SCHEMA_CHECK)/package-lock.json
	@command -v npm >/dev/null || { \
		echo "Installing Node.js and npm from Debian's packages..."; \
		apt-get update -qq && $(APT_INSTALL) nodejs npm >/dev/null; }
	npm ci --prefix $(SCHEMA_CHECK) --no-audit --no-fund --loglevel=error

grafana-schema: $(SCHEMA_CHECK)/node_modules/.package-lock.json

install-test: install prometheus iproute2 grafana-schema

test: install-test
	$(PYTHON) -m pytest

LOCAL_SERVICES := substation-1 substation-2 substation-3 load-balancer charge-request-service

run: install
	@if command -v prometheus >/dev/null; then \
		echo "Charge API http://127.0.0.1:5000  balancer :5002  substations :5011-5013  Prometheus http://127.0.0.1:9090"; \
		exec honcho -f Procfile start $(LOCAL_SERVICES) prometheus; \
	else \
		echo "Charge API http://127.0.0.1:5000  balancer :5002  substations :5011-5013 (prometheus not installed: 'make prometheus' adds it)"; \
		exec honcho -f Procfile start $(LOCAL_SERVICES); \
	fi

# Rush hour against `make run`; extra options: make loadtest LOADTEST_ARGS="--scenario burst"
loadtest: install
	$(PYTHON) -m load_tester --scenario rush-hour --output loadtest-results --observe 10 $(LOADTEST_ARGS)

bench: install
	$(PYTHON) -m benchmarks

clean:
	rm -rf $(VENV) .run .pytest_cache .hypothesis loadtest-results
