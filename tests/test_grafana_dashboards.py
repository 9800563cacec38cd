"""Grafana provisioning and dashboards, checked without a running Grafana: every dashboard
is type-checked by tsc against Grafana's own schema (@grafana/schema, see
grafana/schema-check/dashboard.ts), reads the provisioned datasource and holds PromQL
that promtool accepts."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.harness import REPO_ROOT
from tests.observability_support import (
    DASHBOARD_FILES,
    DASHBOARD_PROVIDER_FILE,
    DATASOURCE_FILE,
    GRAFANA_DIR,
    iter_panels,
    load_dashboard,
    load_yaml,
    provisioned_datasource_uid,
    substitute_variables,
)

SCHEMA_CHECK_DIR = GRAFANA_DIR / "schema-check"
TSC = SCHEMA_CHECK_DIR / "node_modules" / "typescript" / "bin" / "tsc"
# Where the compose file mounts grafana/dashboards; the provider and the home dashboard point here.
DASHBOARDS_MOUNT = "/var/lib/grafana/dashboards"
HOME_DASHBOARD = "smart-grid.json"
UNITS = {"kwatt", "kwatth", "percent", "percentunit", "s", "reqps", "mps", "short", "none"}
GRAFANA_INTERVALS = {"__rate_interval": "20s", "__interval": "5s", "__range": "15m"}
_TSC_ERROR = re.compile(r"^(?P<file>[^(\s]+)\(\d+,\d+\): error (?P<message>.*)$")


def _first_panel(dashboard: dict, panel_type: str) -> dict:
    return next(panel for panel in iter_panels(dashboard) if panel["type"] == panel_type)


def _misspell_dashboard_key(dashboard: dict) -> None:
    dashboard["refreshh"] = dashboard.pop("refresh")


def _misspell_legend_option(dashboard: dict) -> None:
    _first_panel(dashboard, "timeseries")["options"]["legend"]["showLegendd"] = True


def _option_of_the_wrong_type(dashboard: dict) -> None:
    _first_panel(dashboard, "bargauge")["options"]["showUnfilled"] = "yes"


def _misspell_unit(dashboard: dict) -> None:
    defaults = _first_panel(dashboard, "timeseries")["fieldConfig"]["defaults"]
    defaults["units"] = defaults.pop("unit")


def _unknown_draw_style(dashboard: dict) -> None:
    _first_panel(dashboard, "timeseries")["fieldConfig"]["defaults"]["custom"]["drawStyle"] = "curve"


def _misspell_query_field(dashboard: dict) -> None:
    target = _first_panel(dashboard, "timeseries")["targets"][0]
    target["legend"] = target.pop("legendFormat")


def _threshold_as_text(dashboard: dict) -> None:
    steps = _first_panel(dashboard, "bargauge")["fieldConfig"]["defaults"]["thresholds"]["steps"]
    steps[-1]["value"] = str(steps[-1]["value"])


def _retired_panel_type(dashboard: dict) -> None:
    _first_panel(dashboard, "timeseries")["type"] = "graph"


def _missing_required_option(dashboard: dict) -> None:
    del _first_panel(dashboard, "timeseries")["options"]["tooltip"]


# Each mistake, and a piece of the error tsc must give for it.
MISTAKES: dict[str, tuple[Callable[[dict], None], str]] = {
    "unknown dashboard key": (_misspell_dashboard_key, "'\"refreshh\"' does not exist"),
    "unknown legend option": (_misspell_legend_option, "'\"showLegendd\"' does not exist"),
    "option of the wrong type": (_option_of_the_wrong_type, "not assignable to type 'boolean'"),
    "unknown field config key": (_misspell_unit, "'\"units\"' does not exist"),
    "draw style not in the enum": (_unknown_draw_style, "'\"curve\"' is not assignable"),
    "unknown query field": (_misspell_query_field, "'\"legend\"' does not exist in type 'Target'"),
    "threshold as text": (_threshold_as_text, "not assignable to type 'number'"),
    "retired panel type": (_retired_panel_type, "'\"graph\"' is not assignable"),
    "required option missing": (_missing_required_option, "Property 'tooltip' is missing"),
}


def _write_check_module(path: Path, dashboard: dict) -> None:
    """A TypeScript module that assigns the dashboard, as a literal, to the schema type."""
    schema = (SCHEMA_CHECK_DIR / "dashboard").as_posix()
    path.write_text(
        f"import type {{ ProvisionedDashboard }} from '{schema}';\n"
        f"export const dashboard: ProvisionedDashboard = {json.dumps(dashboard, indent=1)};\n"
    )


@pytest.fixture(scope="module")
def tsc_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Type-check every dashboard and every mistake in one tsc run; errors by module name."""
    if not TSC.exists():
        pytest.fail(
            f"{TSC} is missing: `make test` installs it "
            "(or run `npm ci --prefix grafana/schema-check`)."
        )
    workdir = tmp_path_factory.mktemp("schema-check")
    modules = []
    for path in DASHBOARD_FILES:
        modules.append(f"{path.stem}.ts")
        _write_check_module(workdir / modules[-1], load_dashboard(path))
    for index, (mistake, _) in enumerate(MISTAKES.values()):
        dashboard = load_dashboard(GRAFANA_DIR / "dashboards" / HOME_DASHBOARD)
        mistake(dashboard)
        modules.append(f"mistake-{index}.ts")
        _write_check_module(workdir / modules[-1], dashboard)
    (workdir / "tsconfig.json").write_text(json.dumps({
        "compilerOptions": {
            "strict": True, "noEmit": True, "target": "ES2022", "module": "ESNext",
            "moduleResolution": "Bundler", "skipLibCheck": True, "types": [],
        },
        "files": modules,
    }))
    node = shutil.which("node") or "node"
    result = subprocess.run(
        [node, str(TSC), "-p", str(workdir / "tsconfig.json"), "--pretty", "false"],
        capture_output=True, text=True, timeout=120,
    )
    errors: dict[str, list[str]] = {module: [] for module in modules}
    for line in result.stdout.splitlines():
        match = _TSC_ERROR.match(line)
        if match:
            errors[Path(match["file"]).name].append(line)
    assert result.returncode == 0 or any(errors.values()), f"tsc failed:\n{result.stdout}{result.stderr}"
    return errors


def test_schema_is_the_one_of_the_grafana_image_compose_runs() -> None:
    pinned = json.loads((SCHEMA_CHECK_DIR / "package.json").read_text())["devDependencies"]["@grafana/schema"]
    image = load_yaml(REPO_ROOT / "docker-compose.yml")["services"]["grafana"]["image"]
    assert image == f"grafana/grafana:{pinned}"
    installed = SCHEMA_CHECK_DIR / "node_modules" / "@grafana" / "schema" / "package.json"
    assert json.loads(installed.read_text())["version"] == pinned, "run `make grafana-schema` again"


def test_there_are_dashboards_and_the_home_one_exists() -> None:
    assert HOME_DASHBOARD in [path.name for path in DASHBOARD_FILES]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.name)
def test_dashboard_matches_grafana_schema(path: Path, tsc_errors: dict[str, list[str]]) -> None:
    assert tsc_errors[f"{path.stem}.ts"] == []


@pytest.mark.parametrize("index", range(len(MISTAKES)), ids=list(MISTAKES))
def test_schema_check_rejects_mistake(index: int, tsc_errors: dict[str, list[str]]) -> None:
    _, expected_error = list(MISTAKES.values())[index]
    errors = tsc_errors[f"mistake-{index}.ts"]
    assert any(expected_error in error for error in errors), errors


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.name)
def test_every_panel_and_query_reads_the_provisioned_datasource(path: Path) -> None:
    dashboard = load_dashboard(path)
    expected = {"type": "prometheus", "uid": provisioned_datasource_uid()}
    for panel in iter_panels(dashboard):
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target.get("datasource", expected) == expected, panel["title"]
    for variable in dashboard.get("templating", {}).get("list", []):
        assert variable["datasource"] == expected, variable["name"]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.name)
def test_dashboard_refreshes_every_5_seconds_and_has_a_stable_uid(path: Path) -> None:
    dashboard = load_dashboard(path)
    assert dashboard["refresh"] == "5s"
    assert re.fullmatch(r"[a-z0-9-]+", dashboard["uid"])


def test_dashboard_uids_and_titles_are_unique() -> None:
    dashboards = [load_dashboard(path) for path in DASHBOARD_FILES]
    assert len({d["uid"] for d in dashboards}) == len({d["title"] for d in dashboards}) == len(dashboards)


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.name)
def test_every_value_panel_states_its_unit(path: Path) -> None:
    for panel in iter_panels(load_dashboard(path)):
        if panel["type"] in {"timeseries", "bargauge", "stat"}:
            assert panel["fieldConfig"]["defaults"].get("unit") in UNITS, panel["title"]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.name)
def test_panels_have_unique_ids_and_do_not_overlap(path: Path) -> None:
    panels = load_dashboard(path)["panels"]
    ids = [panel["id"] for panel in panels] + [
        nested["id"] for panel in panels for nested in panel.get("panels", [])
    ]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells.get((x, y))}"
                cells[(x, y)] = panel["title"]


def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule) with Grafana's variables filled in."""
    rules = []
    for path in DASHBOARD_FILES:
        dashboard = load_dashboard(path)
        for panel in iter_panels(dashboard):
            for target in panel["targets"]:
                expr = substitute_variables(target["expr"], dashboard, GRAFANA_INTERVALS)
                rules.append({"record": f"dashboard:panel_{len(rules)}:check", "expr": expr})
    rule_file = tmp_path / "panels.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_datasource_is_the_compose_prometheus_with_a_fixed_uid() -> None:
    (datasource,) = load_yaml(DATASOURCE_FILE)["datasources"]
    assert datasource["uid"] == "prometheus"
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["isDefault"] is True
    assert datasource["jsonData"]["timeInterval"] == "5s"


def test_dashboard_provider_reads_the_mounted_dashboards() -> None:
    (provider,) = load_yaml(DASHBOARD_PROVIDER_FILE)["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == DASHBOARDS_MOUNT
    assert provider["allowUiUpdates"] is False


def test_dashboard_variables_have_an_all_value() -> None:
    """The live test and Grafana's "All" both send allValue in place of the variable."""
    for path in DASHBOARD_FILES:
        for variable in load_dashboard(path).get("templating", {}).get("list", []):
            assert variable.get("includeAll") and variable.get("allValue"), variable["name"]

