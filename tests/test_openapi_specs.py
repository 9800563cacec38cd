"""The three OpenAPI documents: valid OpenAPI 3.1, served at /openapi.json, and in step with the apps' routes.

Every route an app registers is documented (HEAD and OPTIONS aside: Flask answers them for every
route, see the documents' description), and every documented operation is a route of the app.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from openapi_spec_validator import validate

import charge_request_service
import load_balancer
import substation_service
from charge_request_service.config import Settings as ChargeSettings
from charge_request_service.openapi_spec import SPEC as CHARGE_SPEC
from gridcommon.openapi import OPENAPI_PATH, OPENAPI_VERSION, install_openapi
from load_balancer.config import Settings as BalancerSettings
from load_balancer.openapi_spec import SPEC as BALANCER_SPEC
from substation_service.config import Settings as SubstationSettings
from substation_service.openapi_spec import SPEC as SUBSTATION_SPEC

try:  # Until every create_app installs its document itself (see tests/openapi_apps.py).
    from tests import openapi_apps

    FACTORIES: dict[str, Callable[..., Flask]] = {
        "charge": openapi_apps.charge,
        "balancer": openapi_apps.balancer,
        "substation": openapi_apps.substation,
    }
except ImportError:
    FACTORIES = {
        "charge": charge_request_service.create_app,
        "balancer": load_balancer.create_app,
        "substation": substation_service.create_app,
    }

SPECS: dict[str, dict[str, Any]] = {"charge": CHARGE_SPEC, "balancer": BALANCER_SPEC, "substation": SUBSTATION_SPEC}
SETTINGS = {"charge": ChargeSettings, "balancer": BalancerSettings, "substation": SubstationSettings}
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
# Flask adds HEAD to every GET route and OPTIONS to every route; gridcommon.web answers OPTIONS with 405.
IMPLICIT_METHODS = {"HEAD", "OPTIONS"}
FLASK_PARAMETER = re.compile(r"<(?:[a-z_]+:)?([A-Za-z_][A-Za-z0-9_]*)>")


@pytest.fixture(params=sorted(SPECS))
def service(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def app(service: str) -> Iterator[Flask]:
    """The app as gunicorn builds it, its background threads left off."""
    yield FACTORIES[service](settings=SETTINGS[service](), start_background=False)


def routes(app: Flask) -> set[tuple[str, str]]:
    found = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = FLASK_PARAMETER.sub(r"{\1}", rule.rule)
        found.update((path, method) for method in (rule.methods or set()) - IMPLICIT_METHODS)
    return found


def documented(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method.upper())
        for path, item in spec["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method, operation


def resolve(spec: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        pointer = node["$ref"].removeprefix("#/").split("/")
        node = spec
        for part in pointer:
            node = node[part]
    return node


def test_is_valid_openapi_3_1(service: str) -> None:
    spec = SPECS[service]
    assert spec["openapi"] == OPENAPI_VERSION
    validate(spec)  # raises OpenAPIValidationError naming what is wrong
    # What the app serves is this dict as JSON: it must survive the round trip unchanged.
    assert json.loads(json.dumps(spec, allow_nan=False)) == spec


def test_every_route_is_documented_and_every_documented_path_is_a_route(service: str, app: Flask) -> None:
    registered = routes(app)
    described = documented(SPECS[service])
    assert registered - described == set(), "routes the document does not describe"
    assert described - registered == set(), "documented operations the app does not have"
    for path in SPECS[service]["paths"]:
        adapter = app.url_map.bind("localhost")
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        endpoint, _ = adapter.match(concrete, method=next(iter({m for p, m in described if p == path})))
        assert endpoint, path


def test_serves_its_document(service: str, app: Flask) -> None:
    response = app.test_client().get(OPENAPI_PATH)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.headers["X-Request-ID"]
    assert response.get_json() == SPECS[service]


def test_operations_are_complete(service: str) -> None:
    """Ids unique, links aimed at real operations and parameters, every answer JSON but /metrics, errors of one shape."""
    spec = SPECS[service]
    ids = [operation["operationId"] for _, _, operation in operations(spec)]
    assert len(ids) == len(set(ids)), "operationId given twice"
    by_id = {operation["operationId"]: (path, method, operation) for path, method, operation in operations(spec)}
    schemes = set(spec["components"]["securitySchemes"])
    for path, method, operation in operations(spec):
        label = f"{method.upper()} {path}"
        assert operation.get("summary"), label
        for requirement in operation.get("security", []):
            assert set(requirement) <= schemes, label
        for status, response in operation["responses"].items():
            response = resolve(spec, response)
            assert "X-Request-ID" in response.get("headers", {}), f"{label} {status}: no X-Request-ID"
            media_types = set(response.get("content", {}))
            if path == "/metrics" and status == "200":
                assert media_types == {"text/plain"}, label
                continue
            if path == "/sessions/export" and status == "200":  # a substation's records, as files
                assert media_types == {"text/csv", "application/x-ndjson"}, label
                continue
            assert media_types == {"application/json"}, f"{label} {status}"
            if status[0] in "45":
                schema = json.dumps(response["content"]["application/json"]["schema"])
                assert "#/components/schemas/Error" in schema, f"{label} {status}: not the error shape"
            for name, link in response.get("links", {}).items():
                target_path, _, target = by_id[link["operationId"]]
                names = {resolve(spec, p)["name"] for p in [*spec["paths"][target_path].get("parameters", []),
                                                          *target.get("parameters", [])]}
                assert set(link["parameters"]) <= names, f"{label} {status} link {name}"
        if "requestBody" in operation:
            for code in ("400", "413", "415"):
                assert code in operation["responses"], f"{label}: reads a body but documents no {code}"
        if any(requirement for requirement in operation.get("security", [])):
            assert "401" in operation["responses"], f"{label}: needs a token but documents no 401"


def test_install_openapi_serves_any_document() -> None:
    app = Flask(__name__)
    install_openapi(app, {"openapi": OPENAPI_VERSION, "info": {"title": "t", "version": "1"}, "paths": {}})
    response = app.test_client().get(OPENAPI_PATH)
    assert response.status_code == 200
    assert response.get_json()["info"]["title"] == "t"
    assert app.test_client().post(OPENAPI_PATH).status_code == 405
