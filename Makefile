# Smart Grid Load Balancer — every command a user needs.
#   make run    start the whole stack as local processes (no Docker needed)
#   make test   install what the tests need, then run the whole suite
#   make loadtest  rush hour against the running stack, report in loadtest-results/
#   make bench  print benchmark figures
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
RUN_DIR := .run
STAMP := $(RUN_DIR)/installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test bench loadtest install install-test prometheus grafana-schema clean help

help:
	@sed -n 's/^#   //p' Makefile

$(RUN_DIR):
	mkdir -p $(RUN_DIR)

# pip is slow even when nothing changes: install again only when pyproject.toml does.
$(STAMP): pyproject.toml | $(RUN_DIR)
	$(PIP) install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

# Debian's package brings prometheus and promtool; the suite runs both for real.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
		echo "Installing Prometheus and promtool from Debian's packages..."; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

# Grafana's dashboard schema and TypeScript, to type-check grafana/dashboards/*.json
# (tests/test_grafana_dashboards.py); npm ci runs again only when the lock file changes.
SCHEMA_CHECK := grafana/schema-check
$(SCHEMA_CHECK)/node_modules/.package-lock.json: $(SCHEMA_CHECK)/package-lock.json
	@command -v npm >/dev/null || { \
		echo "Installing Node.js and npm from Debian's packages..."; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	npm ci --prefix $(SCHEMA_CHECK) --no-audit --no-fund --loglevel=error

grafana-schema: $(SCHEMA_CHECK)/node_modules/.package-lock.json

install-test: install prometheus grafana-schema

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
	rm -rf $(RUN_DIR) .pytest_cache .hypothesis loadtest-results
