"""Schemathesis against the three services as real gunicorn processes, with their own OpenAPI documents.

One small stack (two substations that balance as peers, the balancer, the charge API) serves
every test. Each service is fuzzed operation by operation (explicit examples, coverage cases,
then generated ones, positive and negative) and statefully along the documents' links
(``POST /charge`` -> ``GET``/``DELETE`` of the session it names), with the operator token, so the
operator endpoints are reached too. Every answer must be documented (status, body, headers,
content type), none may be a 5xx, and every one is JSON except ``/metrics``.

The charge API is fuzzed with ``RATE_LIMIT_PER_VEHICLE`` off (the limit would answer most
requests with 429), and once more, briefly, with the default limit. Peer messages are signed
with the group's key, as a peer would, so they get past the signature check to the protocol.
The grid is reset between tests (limits lifted, sessions stopped, substations registered again).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hypothesis
import pytest
import requests
import schemathesis
from requests.auth import AuthBase

from charge_request_service.openapi_spec import SPEC as CHARGE_SPEC
from gridcommon.openapi import OPENAPI_PATH
from load_balancer.openapi_spec import SPEC as BALANCER_SPEC
from substation_service.openapi_spec import SPEC as SUBSTATION_SPEC
from substation_service.peering.auth import PeerKey
from substation_service.peering.transport import MESSAGES_PATH
from tests import harness
from tests.harness import OPERATOR, OPERATOR_TOKEN, Service, Stack

pytestmark = pytest.mark.integration

# Until every create_app serves its document (see tests/openapi_apps.py), the processes run the wrapper.
WRAPPED = importlib.util.find_spec("tests.openapi_apps") is not None
APP_TARGETS = {
    "charge_request_service:create_app()": "tests.openapi_apps:charge()",
    "load_balancer:create_app()": "tests.openapi_apps:balancer()",
    "substation_service:create_app()": "tests.openapi_apps:substation()",
}

# Generated cases per operation in the fuzzing phase; examples and coverage cases come on top.
FUZZ_EXAMPLES = {"charge": 100, "charge_rate_limited": 15, "balancer": 70, "substation": 50}
# Stateful scenarios (each a few linked calls) per service.
STATEFUL_SCENARIOS = {"charge": 40, "balancer": 30, "substation": 30}
STATEFUL_STEPS = 6
LEAST_CASES_PER_SERVICE = 1000

ENABLED_CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "ignored_auth",
    "unsupported_method",
    "allow_header_conformance",
    "ensure_resource_availability",
)
# use_after_free: a stopped session stays readable on purpose (state "ended"), at the charge API and
# the substation alike. positive/negative_data_acceptance: a valid request is refused by design when
# the grid is full (503/409) or the session unknown (404); an unacceptable X-Request-ID is replaced,
# not refused. object_level_authorization: one operator, no users. missing_required_header: the only
# required headers are the peer signature's, which ignored_auth covers.
DISABLED_CHECKS = (
    "use_after_free",
    "positive_data_acceptance",
    "negative_data_rejection",
    "object_level_authorization",
    "missing_required_header",
)

# SCHEMATHESIS_KEEP_GOING=1: record every distinct failure and go on generating, then report them all at
# the end (test_every_service_got_enough_cases), instead of stopping an operation at its first failure.
KEEP_GOING = os.environ.get("SCHEMATHESIS_KEEP_GOING") == "1"

CASES: Counter[str] = Counter()
# Services with a failing case: their generation ended early, so their count says nothing.
FAILED: set[str] = set()
FINDINGS: dict[tuple[str, str, str], str] = {}
# The statuses each operation answered, shown with -v: which documented answers fuzzing reached.
STATUSES: dict[tuple[str, str], set[int]] = {}


@schemathesis.check
def json_answers(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every answer is JSON (a parseable document, as application/json), except /metrics' text."""
    content_type = response.headers.get("content-type", [""])[0]
    if case.operation.path == "/metrics" and response.status_code == 200:
        assert content_type.startswith("text/plain"), f"/metrics answered {content_type!r}"
        return
    if case.operation.path == "/sessions/export" and response.status_code == 200:  # a substation's records as files
        assert content_type.split(";")[0] in {"text/csv", "application/x-ndjson"}, content_type
        return
    assert content_type.split(";")[0].strip() == "application/json", (
        f"{case.operation.label} answered {response.status_code} as {content_type!r}, not JSON"
    )
    try:
        json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{case.operation.label} answered {response.status_code} with a body that is not JSON")


# The only 5xx this stack's state explains, by operationId: the grid is full (503), or a URL given to
# POST /substations has nothing listening (502). Any other 5xx is a server error: in this stack every
# service's dependencies are up, so a 502 elsewhere means a service misread a healthy one's answer.
EXPECTED_SERVER_ERRORS = {
    "charge": {"startCharging": ["503"]},
    "charge_rate_limited": {"startCharging": ["503"]},
    "balancer": {"routeCharge": ["503"], "registerSubstation": ["502"]},
    "substation": {},
}


def fuzz_config(service: str) -> schemathesis.Config:
    checks: dict[str, Any] = {name: {"enabled": True} for name in ENABLED_CHECKS}
    checks.update({name: {"enabled": False} for name in DISABLED_CHECKS})
    operations = [
        {
            "include-operation-id": operation_id,
            "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", *statuses]}},
        }
        for operation_id, statuses in EXPECTED_SERVER_ERRORS[service].items()
    ]
    return schemathesis.Config.from_dict(
        {
            "operations": operations,
            "request-timeout": 20,
            "suppress-health-check": ["all"],
            "generation": {
                "mode": "all",
                "max-examples": FUZZ_EXAMPLES[service],
                # Same cases on every run: a failure in CI reproduces on a laptop.
                "deterministic": True,
                "database": "none",
            },
            "checks": checks,
            "phases": {"stateful": {"max-steps": STATEFUL_STEPS}},
            "auth": {"openapi": {"operatorToken": {"bearer": OPERATOR_TOKEN}}},
        }
    )


def served_schema(service: Service, name: str) -> schemathesis.BaseSchema:
    """The document the running service serves, as schemathesis reads it."""
    return schemathesis.openapi.from_url(f"{service.url}{OPENAPI_PATH}", config=fuzz_config(name))


# The stack ----------------------------------------------------------------------------


class _OpenApiService(Service):
    """A harness service that runs the wrapper app serving /openapi.json (until create_app does)."""

    def start(self, wait: bool = True) -> Service:
        self.app = APP_TARGETS.get(self.app, self.app)
        return super().start(wait)


def start_fuzz_stack(log_dir: Path) -> Stack:
    kwargs: dict[str, Any] = dict(
        # Small, so fuzzing fills them: the queue, 503s and capacity_exceeded are reached too.
        capacities=(5.0, 5.0),
        peers=True,
        substation_env={"ADMIN_TOKEN": OPERATOR_TOKEN},
        balancer_env={"ADMIN_TOKEN": OPERATOR_TOKEN},
        # Queued requests expire soon and the queue is short, so fuzzing sees every state of it.
        # Client keys required, as deployed: the fuzzer asks as the operator, and without it (ignored_auth).
        charge_env={"RATE_LIMIT_PER_VEHICLE": "", "QUEUE_TIMEOUT_SECONDS": "5", "MAX_QUEUED": "20",
                    "PUBLIC_API_AUTH": "keys"},
    )
    if not WRAPPED:
        return harness.start_stack(log_dir, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "Service", _OpenApiService)
        return harness.start_stack(log_dir, **kwargs)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_fuzz_stack(tmp_path_factory.mktemp("schemathesis"))
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def rate_limited_charge(stack: Stack) -> Iterator[Service]:
    """A second charge API on the same balancer, with the default per-vehicle rate limit."""
    service_class = _OpenApiService if WRAPPED else Service
    service = service_class(
        name="charge-rate-limited",
        app="charge_request_service:create_app()",
        env={"LOAD_BALANCER_URL": stack.balancer.url, "ADMIN_TOKEN": OPERATOR_TOKEN, "PUBLIC_API_AUTH": "keys"},
        log_dir=stack.charge.log_path.parent,
    ).start()
    yield service
    service.stop()


def reset_grid(stack: Stack) -> None:
    """Undo what fuzzing with the operator token did: limits, policies, sessions, deregistrations."""
    for substation in stack.substations:
        requests.delete(f"{substation.url}/limit", headers=OPERATOR, timeout=5).raise_for_status()
        requests.put(f"{substation.url}/allocation-policy", json={"policy": "fair_share"}, headers=OPERATOR,
                     timeout=5).raise_for_status()
        for session in harness.sessions_at(substation):
            requests.delete(f"{substation.url}/charge/{session['session_id']}", timeout=5)
        # POST /substations answers 200 for a URL it tracks already: registering again is harmless.
        requests.post(f"{stack.balancer.url}/substations", json={"url": substation.url}, headers=OPERATOR,
                      timeout=10).raise_for_status()


@pytest.fixture(autouse=True)
def fresh_grid(request: pytest.FixtureRequest) -> None:
    if "stack" in request.fixturenames:
        reset_grid(request.getfixturevalue("stack"))


# Peer messages, signed as a peer signs them ---------------------------------------------

_SENDER = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class PeerSigner(AuthBase):
    """Signs a request's exact bytes with the group's key (``substation_service.peering.auth``).

    The signer is the body's ``sender`` when it is a valid id, so a message gets past the signature
    to the protocol's own checks; otherwise another member of the group.
    """

    def __init__(self, key: str, member: str) -> None:
        self._key = PeerKey.from_text(key)
        self._member = member

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode("utf-8")
        sender = self._member
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if isinstance(document, dict) and isinstance(document.get("sender"), str) and _SENDER.match(document["sender"]):
            sender = document["sender"]
        path = urlsplit(request.url or "").path
        request.headers.update(self._key.sign_request(request.method or "POST", path, sender, body, time.time()))
        return request


@pytest.fixture(scope="module")
def peer_signer(stack: Stack) -> PeerSigner:
    return PeerSigner(stack.substations[0].env["PEER_KEY"], member=stack.substations[1].env["SUBSTATION_ID"])


def make_plausible(case: schemathesis.Case, substation: Service, member: str) -> None:
    """Every other message from the group's member gets the receiver's phase and link epoch.

    Generated phases and epochs are almost never near the receiver's clock (422, 409): these reach
    the protocol's handlers instead.
    """
    body = case.body
    if not (isinstance(body, dict) and body.get("sender") == member and CASES["substation"] % 2):
        return
    table = requests.get(f"{substation.url}/peer-balancing", timeout=5).json()
    link = next((peer for peer in table["peers"] if peer["substation"] == member), None)
    body["phase"] = table["phase"]
    body["round"] = min(table["round"], table["timings"]["rounds_per_phase"] - 1)
    if link is not None:
        body["epoch"] = link["link_epoch"]


def call_kwargs(case: schemathesis.Case, signer: PeerSigner | None) -> dict[str, Any]:
    if signer is not None and case.operation.path == MESSAGES_PATH:
        return {"auth": signer}
    return {}


# Fuzzing, operation by operation ----------------------------------------------------------

# The documents themselves, not fetched: ``schemathesis.pytest.from_fixture`` does not work with
# pytest 9.2 (it sets ``Node._nodeid``, which pytest no longer has), and these dicts are exactly what
# the services serve (test_served_documents_are_the_specs).
charge_api = schemathesis.openapi.from_dict(CHARGE_SPEC, config=fuzz_config("charge"))
rate_limited_charge_api = schemathesis.openapi.from_dict(CHARGE_SPEC, config=fuzz_config("charge_rate_limited"))
balancer_api = schemathesis.openapi.from_dict(BALANCER_SPEC, config=fuzz_config("balancer"))
substation_api = schemathesis.openapi.from_dict(SUBSTATION_SPEC, config=fuzz_config("substation"))


def test_served_documents_are_the_specs(stack: Stack, rate_limited_charge: Service) -> None:
    for service, spec in (
        (stack.charge, CHARGE_SPEC),
        (rate_limited_charge, CHARGE_SPEC),
        (stack.balancer, BALANCER_SPEC),
        *((substation, SUBSTATION_SPEC) for substation in stack.substations),
    ):
        response = requests.get(f"{service.url}{OPENAPI_PATH}", timeout=5)
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/json"
        assert response.json() == spec, service.name


def checked(service: str, case: schemathesis.Case, send: Any) -> None:
    """Count one case and run it; a failure is raised, or recorded under SCHEMATHESIS_KEEP_GOING."""
    CASES[service] += 1
    try:
        response = send()
    except BaseExceptionGroup as failures:  # schemathesis's FailureGroup: every check that failed
        FAILED.add(service)
        if not KEEP_GOING:
            raise
        for failure in failures.exceptions:
            title = str(getattr(failure, "title", type(failure).__name__))
            FINDINGS.setdefault((service, case.operation.label, title), str(failures))
        return
    if response is not None:
        STATUSES.setdefault((service, case.operation.label), set()).add(response.status_code)


@rate_limited_charge_api.parametrize()
def test_charge_api_with_its_rate_limit(case: schemathesis.Case, rate_limited_charge: Service) -> None:
    checked("charge", case, lambda: case.call_and_validate(base_url=rate_limited_charge.url))


@charge_api.parametrize()
def test_charge_api(case: schemathesis.Case, stack: Stack) -> None:
    checked("charge", case, lambda: case.call_and_validate(base_url=stack.charge.url))


@substation_api.parametrize()
def test_substation(case: schemathesis.Case, stack: Stack, peer_signer: PeerSigner) -> None:
    url = stack.substations[0].url
    if case.operation.path == MESSAGES_PATH:
        make_plausible(case, stack.substations[0], stack.substations[1].env["SUBSTATION_ID"])
    checked("substation", case, lambda: case.call_and_validate(base_url=url, **call_kwargs(case, peer_signer)))


@balancer_api.parametrize()
def test_balancer(case: schemathesis.Case, stack: Stack) -> None:
    checked("balancer", case, lambda: case.call_and_validate(base_url=stack.balancer.url))


# Stateful: along the documents' links ----------------------------------------------------


def run_stateful(service: str, schema: schemathesis.BaseSchema, signer: PeerSigner | None = None) -> None:
    """``STATEFUL_SCENARIOS[service]`` scenarios along the links; each step is one case.

    A scenario's next steps depend on the live answers (a link needs the session the last answer
    named), so Hypothesis may find a scenario generated differently the second time (``Flaky``).
    As schemathesis's own runner does, that ends the suite without a failure and a new suite takes
    the scenarios left; a check that failed on the way is raised all the same.
    """
    failures: list[BaseExceptionGroup] = []
    completed = 0

    class Scenarios(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return call_kwargs(case, signer)

        def validate_response(self, response: schemathesis.Response, case: schemathesis.Case,
                              additional_checks: Any = None, **kwargs: Any) -> None:
            validate = super().validate_response

            def send() -> schemathesis.Response:
                validate(response, case, additional_checks=additional_checks, **kwargs)
                return response

            try:
                checked(service, case, send)
            except BaseExceptionGroup as exc:
                failures.append(exc)
                raise

        def teardown(self) -> None:
            nonlocal completed
            completed += 1
            super().teardown()

    budget = STATEFUL_SCENARIOS[service]
    for suite in range(10):
        if completed >= budget:
            break
        try:
            hypothesis.seed(suite)(Scenarios).run(
                settings=hypothesis.settings(
                    max_examples=budget - completed,
                    stateful_step_count=STATEFUL_STEPS,
                    phases=[hypothesis.Phase.generate],
                    deadline=None,
                    database=None,
                    suppress_health_check=list(hypothesis.HealthCheck),
                )
            )
        except hypothesis.errors.Flaky:
            if failures:
                raise failures[0] from None
    if failures:
        raise failures[0]


def test_charge_api_statefully(stack: Stack) -> None:
    run_stateful("charge", served_schema(stack.charge, "charge"))


def test_substation_statefully(stack: Stack, peer_signer: PeerSigner) -> None:
    run_stateful("substation", served_schema(stack.substations[0], "substation"), peer_signer)


def test_balancer_statefully(stack: Stack) -> None:
    run_stateful("balancer", served_schema(stack.balancer, "balancer"))


# How much was tried ---------------------------------------------------------------------


def test_every_service_got_enough_cases(capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest) -> None:
    """Runs last: each service that was fuzzed in this session got its share of cases."""
    # A summary of the fuzz tests above: alone, it has nothing to count, and that is a failure, not a pass.
    assert CASES, "no schemathesis case ran: run this test with the rest of tests/test_schemathesis.py"
    with capsys.disabled():
        print("\nschemathesis cases per service: " + ", ".join(f"{name} {count}" for name, count in sorted(CASES.items())))
        if request.config.get_verbosity() > 0:
            for (service, operation), statuses in sorted(STATUSES.items()):
                print(f"  {service:10} {operation:45} {' '.join(map(str, sorted(statuses)))}")
        for (service, operation, title), detail in sorted(FINDINGS.items()):
            print(f"\n--- {service}: {operation}: {title}\n{detail}")
    assert not FINDINGS, f"{len(FINDINGS)} distinct failures (SCHEMATHESIS_KEEP_GOING): see above"
    # A failing case ends its operation's generation early: only complete runs say how much was tried.
    short = {name: count for name, count in CASES.items() if count < LEAST_CASES_PER_SERVICE and name not in FAILED}
    assert not short, f"fewer than {LEAST_CASES_PER_SERVICE} cases: {short}"
