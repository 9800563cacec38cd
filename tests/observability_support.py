"""What the observability tests share: the repository's Prometheus configs, rule files and
Grafana dashboards, the PromQL in them, and a real Prometheus process to run it."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml

from tests.harness import REPO_ROOT, free_port, wait_until_healthy

PROMETHEUS_DIR = REPO_ROOT / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TEST_FILES = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
COMPOSE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
LOCAL_CONFIG = PROMETHEUS_DIR / "prometheus.local.yml"

GRAFANA_DIR = REPO_ROOT / "grafana"
DASHBOARD_FILES = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
DATASOURCE_FILE = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER_FILE = GRAFANA_DIR / "provisioning" / "dashboards" / "smart-grid.yml"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


def provisioned_datasource_uid() -> str:
    (datasource,) = load_yaml(DATASOURCE_FILE)["datasources"]
    return datasource["uid"]


def iter_panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, rows' nested panels included; rows themselves hold no query."""
    for panel in dashboard.get("panels", []):
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


@dataclass(frozen=True)
class Rule:
    file: str
    group: str
    body: dict

    @property
    def name(self) -> str:
        return self.body.get("alert") or self.body["record"]

    @property
    def is_alert(self) -> bool:
        return "alert" in self.body


def load_rules() -> list[Rule]:
    return [
        Rule(path.name, group["name"], rule)
        for path in RULE_FILES
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
    ]


# Grafana's own interval variables, and the value each stands for when a test runs a query.
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute_variables(expr: str, dashboard: dict, intervals: dict[str, str]) -> str:
    """Replace dashboard and interval variables the way Grafana does with "All" selected.

    ``intervals`` gives ``__rate_interval``, ``__interval`` and ``__range``; a dashboard
    variable becomes its ``allValue``. An unknown variable raises ``KeyError``: Grafana
    would send the text unchanged and the query would fail.
    """
    all_values = {
        variable["name"]: variable.get("allValue", ".*")
        for variable in dashboard.get("templating", {}).get("list", [])
    }
    values = {**all_values, **intervals}

    def replace(match: re.Match) -> str:
        return values[match.group(1) or match.group(2)]

    return _VARIABLE.sub(replace, expr)


_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
}
_KEYWORDS = {"bool", "and", "or", "unless", "offset", "inf", "nan"}
_PROMQL_TOKEN = re.compile(
    r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<grouping>\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\))
    | (?P<range>\[[^\]]*\])
    | (?P<selector>[a-zA-Z_:][\w:]*\s*\{[^}]*\}|[a-zA-Z_:][\w:]*)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)


def vector_selectors(expr: str) -> list[str]:
    """The series selectors an expression reads, e.g. ``up`` or ``x{outcome="routed"}``.

    A small scanner, enough for the expressions in this repository: it skips strings,
    label lists of by/on/group_left..., range brackets, functions and keywords.
    """
    selectors: list[str] = []
    for match in _PROMQL_TOKEN.finditer(expr):
        token = match.group("selector")
        if token is None:
            continue
        name = re.match(r"[\w:]*", token).group(0)
        is_function = expr[match.end():].lstrip().startswith("(")
        if name in _AGGREGATIONS or name in _KEYWORDS or is_function:
            continue
        selectors.append(re.sub(r"\s+", " ", token))
    return selectors


class Prometheus:
    """A real Prometheus on a free 127.0.0.1 port with its data in a temporary directory."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, config: dict) -> "Prometheus":
        """Run with ``config``, written to the temporary directory."""
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        return self.run([f"--config.file={config_path}", "--log.level=warn"])

    def run(self, args: list[str], timeout: float = 20.0) -> "Prometheus":
        """Run ``prometheus args`` from the repository root, on this port and directory."""
        log = open(self.workdir / "prometheus.log", "ab")
        self.process = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                *args,
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        try:
            wait_until_healthy(f"{self.url}/-/ready", self.process, timeout)
        except RuntimeError as error:
            raise RuntimeError(f"prometheus did not start: {error}\n{self.log_text()}") from error

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def log_text(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def api(self, path: str, **params: str) -> dict:
        """One call of the HTTP API; a failed query raises with Prometheus's own error text."""
        response = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]
