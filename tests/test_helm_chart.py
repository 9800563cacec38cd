"""The Helm chart (deploy/helm/smart-grid-load-balancer), checked offline: no cluster runs here.

helm itself lints and renders the chart (`make helm` puts the pinned binary at .tools/helm). What it
renders for each ci/*-values.yaml must be valid for Kubernetes 1.29 and 1.37 in strict mode
(kubernetes-validate), its custom resources valid against the published CRD schemas kept in
tests/helm_crd_schemas/, and equal to the committed golden output in deploy/helm/rendered/ (where the
dashboards and the rules stand as one line each: tests of their own compare them with their sources).
Regenerate that output after a deliberate change to the chart, then review its diff:

    .venv/bin/python -m tests.test_helm_chart --write-golden

The rest checks what the manifests promise, each independently of the template that keeps it: nobody
runs as root, no secret is a plain env value, nothing is a LoadBalancer by default, every workload has
probes and resources, the peers' names resolve to their own pods, the network policies let through the
design's paths and nothing else, and the rules and dashboards are the repository's own.
"""
from __future__ import annotations

import base64
import copy
import filecmp
import ipaddress
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.harness import REPO_ROOT

CHART = REPO_ROOT / "deploy" / "helm" / "smart-grid-load-balancer"
GOLDEN_DIR = REPO_ROOT / "deploy" / "helm" / "rendered"
CRD_SCHEMAS = Path(__file__).with_name("helm_crd_schemas")
HELM = REPO_ROOT / ".tools" / "helm"
RELEASE = "sglb"
NAMESPACE = "smart-grid"
KUBERNETES_VERSIONS = ("1.29", "1.37")
CI_VALUES = sorted(CHART.glob("ci/*-values.yaml"))
# Kind -> the published schema of its CRD (see tests/helm_crd_schemas/README.md).
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule_v1.json",
    ("postgresql.cnpg.io/v1", "Cluster"): "cluster_v1.json",
}
GENERATED = "<generated at install>"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# Values that are secrets wherever they appear: they must come from a Secret.
SECRET_ENV_NAMES = {"ADMIN_TOKEN", "PEER_KEY", "DATABASE_URL"}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if not HELM.is_file():
        pytest.fail(f"helm is missing at {HELM}: run `make helm` (make test installs it)")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120, check=check)


def render_text(*value_args: str) -> str:
    """`helm template` of the chart with these -f/--set arguments, the generated secrets masked."""
    done = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *value_args, check=False)
    if done.returncode != 0:
        raise RenderError(done.stderr)
    return mask_generated(done.stdout)


class RenderError(Exception):
    pass


def mask_generated(text: str) -> str:
    """Each value the chart generated at install (random: it differs at every render) as GENERATED."""
    documents = text.split("\n---\n")
    for index, document in enumerate(documents):
        found = re.search(r'smart-grid-load-balancer/generated-keys: "([^"]*)"', document)
        if not found or "\nkind: Secret\n" not in document:
            continue
        for key in filter(None, found.group(1).split(",")):
            document = re.sub(rf'(?m)^(  {key}: ).*$', rf'\g<1>"{GENERATED}"', document)
        documents[index] = document
    return "\n---\n".join(documents)


def golden_view(text: str) -> str:
    """The rendered text as the golden output keeps it: the dashboards' JSON and the rules' groups stand
    as one line each. Their contents are the repository's own files, compared with them by
    test_the_dashboards_are_configmaps_for_grafanas_sidecar and test_the_prometheus_rule_holds_exactly_the_repositorys_rules,
    so editing a rule or a panel needs no new golden output."""
    documents = text.split("\n---\n")
    for index, document in enumerate(documents):
        if "\nkind: ConfigMap\n" in document and '    grafana_dashboard: "1"\n' in document:
            head, _, body = document.partition("\ndata:\n")
            name = body.split(":", 1)[0].strip()
            documents[index] = f'{head}\ndata:\n  {name}: "<grafana/dashboards/{name}>"'
        elif "\nkind: PrometheusRule\n" in document:
            head, _, _ = document.partition("\n  groups:\n")
            documents[index] = f'{head}\n  groups: "<the groups of prometheus/rules/*.yml>"'
    return "\n---\n".join(documents)


def parse(text: str) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(text) if document]


def golden_path(values_file: Path) -> Path:
    return GOLDEN_DIR / values_file.name.replace("-values.yaml", ".yaml")


_RENDERED: dict[str, str] = {}


def rendered(values_file: Path) -> str:
    if values_file.name not in _RENDERED:
        _RENDERED[values_file.name] = render_text("-f", str(values_file))
    return _RENDERED[values_file.name]


def manifests(name: str) -> list[dict[str, Any]]:
    return parse(rendered(CHART / "ci" / f"{name}-values.yaml"))


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [document for document in documents if document["kind"] == kind]


def named(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in of_kind(documents, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_specs(documents: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod the manifests would run: workloads' templates and bare pods (the helm test)."""
    for document in documents:
        if document["kind"] in WORKLOAD_KINDS:
            yield f"{document['kind']}/{document['metadata']['name']}", document["spec"]["template"]["spec"]
        elif document["kind"] == "Pod":
            yield f"Pod/{document['metadata']['name']}", document["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


ALL_CI = pytest.mark.parametrize("values_file", CI_VALUES, ids=[p.name for p in CI_VALUES])


# --- helm itself -------------------------------------------------------------------------------------

def test_the_ci_values_cover_defaults_both_databases_and_monitoring() -> None:
    assert {p.name for p in CI_VALUES} == {
        "defaults-values.yaml", "cloudnativepg-values.yaml", "external-database-values.yaml", "monitoring-values.yaml",
    }


def test_helm_is_the_version_the_makefile_pins() -> None:
    pinned = re.search(r"^HELM_VERSION := (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M)
    assert pinned, "the Makefile pins no HELM_VERSION"
    assert helm("version", "--short").stdout.startswith(f"v{pinned.group(1)}+"), "run `make helm`"


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=["chart-defaults", *[p.name for p in CI_VALUES]])
def test_helm_lint_strict(values_file: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values_file)] if values_file else [])
    done = helm(*args, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@ALL_CI
def test_rendered_output_matches_the_committed_golden(values_file: Path) -> None:
    golden = golden_path(values_file)
    assert golden.is_file(), f"{golden} is missing: python -m tests.test_helm_chart --write-golden"
    assert golden_view(rendered(values_file)) == golden.read_text(), (
        f"helm template with {values_file.name} no longer renders {golden.relative_to(REPO_ROOT)}. If the change "
        "is deliberate: .venv/bin/python -m tests.test_helm_chart --write-golden, then review the diff."
    )


def test_the_golden_output_leaves_out_only_the_rules_and_dashboards() -> None:
    text = rendered(CHART / "ci" / "monitoring-values.yaml")
    full, kept = parse(text), parse(golden_view(text))
    assert len(full) == len(kept)
    for before, after in zip(full, kept):
        if before["kind"] == "PrometheusRule":
            before["spec"]["groups"] = after["spec"]["groups"]
        elif before["kind"] == "ConfigMap" and before["metadata"]["labels"].get("grafana_dashboard") == "1":
            assert list(before["data"]) == list(after["data"])
            before["data"] = after["data"]
        assert before == after


def test_generated_secrets_are_masked_and_given_ones_are_not() -> None:
    default_secret = named(manifests("defaults"), "Secret", f"{RELEASE}-smart-grid-load-balancer-secrets")
    assert default_secret["data"] == {"ADMIN_TOKEN": GENERATED, "PEER_KEY": GENERATED}
    given = named(manifests("monitoring"), "Secret", f"{RELEASE}-smart-grid-load-balancer-secrets")
    values = yaml.safe_load((CHART / "ci" / "monitoring-values.yaml").read_text())
    assert base64.b64decode(given["data"]["PEER_KEY"]).decode() == values["peerKey"]["value"]
    assert base64.b64decode(given["data"]["ADMIN_TOKEN"]).decode() == values["adminToken"]["value"]
    # Unmasked, two renders of the defaults differ only by generated values, and each is long enough.
    raw = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE).stdout
    secret = [d for d in parse(raw) if d["kind"] == "Secret"][0]
    assert len(base64.b64decode(secret["data"]["PEER_KEY"])) == 64


# --- Kubernetes' schemas and the CRDs' ---------------------------------------------------------------

@ALL_CI
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_kubernetes_in_strict_mode(values_file: Path, version: str) -> None:
    problems = []
    for document in parse(rendered(values_file)):
        key = (document["apiVersion"], document["kind"])
        if key in CRD_KINDS:
            continue  # checked against the CRD's own schema below
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{document['kind']}/{document['metadata']['name']}: {exc.message} at {list(exc.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{document['kind']} ({document['apiVersion']}) is neither built in nor a known CRD")
    assert not problems, "\n".join(problems)


def strict_crd_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's OpenAPI schema that refuses unknown fields, as the API server prunes and warns of them.

    Every object that lists its properties gets additionalProperties false, unless it keeps unknown
    fields on purpose (x-kubernetes-preserve-unknown-fields) or says what else it holds.
    """
    schema = copy.deepcopy(schema)

    def tighten(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                tighten(value)
        elif isinstance(node, list):
            for value in node:
                tighten(value)

    tighten(schema)
    # The API server owns metadata's schema; the CRD's says only "object".
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def crd_validator(file_name: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict_crd_schema(json.loads((CRD_SCHEMAS / file_name).read_text())))


def crd_problems(document: dict[str, Any]) -> list[str]:
    validator = crd_validator(CRD_KINDS[(document["apiVersion"], document["kind"])])
    return [f"{document['kind']}/{document['metadata']['name']}: {error.message} at {list(error.absolute_path)}"
            for error in validator.iter_errors(document)]


def test_custom_resources_match_their_published_crd_schemas() -> None:
    seen = set()
    problems = []
    for values_file in CI_VALUES:
        for document in parse(rendered(values_file)):
            key = (document["apiVersion"], document["kind"])
            if key in CRD_KINDS:
                seen.add(key)
                problems += crd_problems(document)
    assert not problems, "\n".join(problems)
    assert seen == set(CRD_KINDS), f"no ci values file renders {set(CRD_KINDS) - seen}"


def test_the_checks_refuse_a_misspelt_field() -> None:
    """Both kinds of schema check, on manifests broken on purpose: a field misspelt is found."""
    deployment = copy.deepcopy(of_kind(manifests("defaults"), "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    monitor = copy.deepcopy(of_kind(manifests("monitoring"), "ServiceMonitor")[0])
    assert not crd_problems(monitor)
    monitor["spec"]["endpoints"][0]["honourLabels"] = True
    assert any("honourLabels" in problem for problem in crd_problems(monitor))
    cluster = copy.deepcopy(of_kind(manifests("cloudnativepg"), "Cluster")[0])
    cluster["spec"]["instances"] = "three"
    assert crd_problems(cluster)


# --- what the manifests promise ----------------------------------------------------------------------

def root_problems(documents: list[dict[str, Any]]) -> list[str]:
    """Containers that could run as root, or with more than they need, going by the pod's and their own context."""
    problems = []
    for where, spec in pod_specs(documents):
        pod = spec.get("securityContext", {})
        if spec.get("hostPID") or spec.get("hostNetwork") or spec.get("hostIPC"):
            problems.append(f"{where}: shares a host namespace")
        for container in containers(spec):
            own = container.get("securityContext", {})
            effective = {**pod, **own}
            name = f"{where}/{container['name']}"
            if effective.get("runAsNonRoot") is not True:
                problems.append(f"{name}: runAsNonRoot is not true")
            if effective.get("runAsUser", 0) == 0:
                problems.append(f"{name}: runs as user 0 (or the image's user, unchecked)")
            if own.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}: root filesystem is writable")
            if own.get("allowPrivilegeEscalation") is not False or own.get("privileged"):
                problems.append(f"{name}: may gain privileges")
            if "ALL" not in own.get("capabilities", {}).get("drop", []) or own.get("capabilities", {}).get("add"):
                problems.append(f"{name}: keeps capabilities")
            if effective.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{name}: no RuntimeDefault seccomp profile")
    return problems


@ALL_CI
def test_no_container_runs_as_root_or_with_privileges(values_file: Path) -> None:
    documents = parse(rendered(values_file))
    assert len(list(pod_specs(documents))) >= 7
    assert not root_problems(documents)


def test_the_root_check_finds_a_root_container() -> None:
    documents = copy.deepcopy(manifests("defaults"))
    spec = of_kind(documents, "StatefulSet")[0]["spec"]["template"]["spec"]
    spec["containers"][0]["securityContext"]["runAsUser"] = 0
    spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    del spec["securityContext"]["seccompProfile"]
    del spec["containers"][0]["securityContext"]["seccompProfile"]
    problems = root_problems(documents)
    assert len(problems) == 3, problems
    # The schema refuses values that would render one.
    for setting in ("containerSecurityContext.runAsUser=0", "podSecurityContext.runAsNonRoot=false",
                    "containerSecurityContext.readOnlyRootFilesystem=false"):
        with pytest.raises(RenderError):
            render_text("--set", setting)


def plain_secret_problems(documents: list[dict[str, Any]], secret_values: list[str]) -> list[str]:
    problems = []
    for where, spec in pod_specs(documents):
        for container in containers(spec):
            for name, entry in env_of(container).items():
                if name in SECRET_ENV_NAMES and "secretKeyRef" not in entry.get("valueFrom", {}):
                    problems.append(f"{where}/{container['name']}: {name} is not read from a Secret")
                if any(secret in str(entry.get("value", "")) for secret in secret_values):
                    problems.append(f"{where}/{container['name']}: {name} holds a secret's value")
    # Outside a Secret, no document holds a secret's value (a ConfigMap, an annotation, a command).
    for document in documents:
        if document["kind"] != "Secret":
            text = json.dumps(document)
            problems += [f"{document['kind']}/{document['metadata']['name']} holds a secret's value"
                         for secret in secret_values if secret in text]
    return problems


@ALL_CI
def test_no_secret_value_in_plain_env(values_file: Path) -> None:
    values = yaml.safe_load(values_file.read_text()) or {}
    given = [values.get(name, {}).get("value") for name in ("adminToken", "peerKey")]
    documents = parse(rendered(values_file))
    assert not plain_secret_problems(documents, [value for value in given if value])
    # Every secret the services read is wired, by reference.
    charge_api = named(documents, "Deployment", f"{RELEASE}-smart-grid-load-balancer-charge-api")
    assert "secretKeyRef" in env_of(charge_api["spec"]["template"]["spec"]["containers"][0])["ADMIN_TOKEN"]["valueFrom"]


def test_the_secret_check_finds_a_plain_value() -> None:
    documents = copy.deepcopy(manifests("monitoring"))
    container = of_kind(documents, "StatefulSet")[-1]["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [e if e["name"] != "PEER_KEY" else {"name": "PEER_KEY", "value": "x" * 40}
                        for e in container["env"]]
    of_kind(documents, "ConfigMap")[0]["data"]["leak"] = "ci-operator-token-0123456789"
    problems = plain_secret_problems(documents, ["ci-operator-token-0123456789"])
    assert len(problems) == 2, problems


def exposed_services(documents: list[dict[str, Any]]) -> list[str]:
    return [d["metadata"]["name"] for d in of_kind(documents, "Service")
            if d["spec"].get("type", "ClusterIP") in ("LoadBalancer", "NodePort")]


def test_no_service_is_exposed_outside_the_cluster_by_default() -> None:
    assert of_kind(manifests("defaults"), "Service")
    assert exposed_services(manifests("defaults")) == []
    # The check finds one where the values ask for it: the gateway's OCPP port, and only that port.
    exposed = exposed_services(manifests("external-database"))
    assert exposed == [f"{RELEASE}-smart-grid-load-balancer-gateway"]
    gateway = named(manifests("external-database"), "Service", exposed[0])
    assert [port["port"] for port in gateway["spec"]["ports"]] == [9000]
    assert gateway["spec"]["loadBalancerSourceRanges"] == ["192.0.2.0/24"]


@ALL_CI
def test_every_workload_has_probes_on_health_and_resources(values_file: Path) -> None:
    documents = parse(rendered(values_file))
    problems = []
    for where, spec in pod_specs(documents):
        for container in containers(spec):
            name = f"{where}/{container['name']}"
            resources = container.get("resources", {})
            if not resources.get("requests", {}).get("cpu") or not resources.get("limits", {}).get("memory"):
                problems.append(f"{name}: no cpu request or memory limit")
            if where.startswith("Pod/"):
                continue
            ports = {port["name"]: port["containerPort"] for port in container["ports"]}
            for probe in ("readinessProbe", "livenessProbe"):
                get = container.get(probe, {}).get("httpGet", {})
                if get.get("path") != "/health" or get.get("port") not in ports:
                    problems.append(f"{name}: {probe} is not an HTTP GET of /health on one of its ports")
    assert not problems, "\n".join(problems)
    assert {d["kind"] for d in documents} >= {"Deployment", "StatefulSet"}


def test_only_the_writable_places_are_volumes() -> None:
    """The root filesystem is read-only: /tmp (the edge's runtime files) and the state volumes are the writable places."""
    for where, spec in pod_specs(manifests("defaults")):
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        assert "emptyDir" in volumes["tmp"], where
        for container in containers(spec):
            mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
            assert "/tmp" in mounts, where
            assert mounts <= {"/tmp", "/state"}, where


# --- the stack's wiring ------------------------------------------------------------------------------

def test_substations_are_stable_single_pods_that_name_each_other() -> None:
    documents = manifests("defaults")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    expected = {item["id"]: item for item in values["substations"]["list"]}
    sets = [d for d in of_kind(documents, "StatefulSet") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "substation"]
    assert len(sets) == len(expected) == 3
    public_urls, peer_lists = {}, []
    for statefulset in sets:
        spec = statefulset["spec"]
        container = spec["template"]["spec"]["containers"][0]
        env = {name: entry.get("value") for name, entry in env_of(container).items()}
        item = expected[env["SUBSTATION_ID"]]
        assert spec["replicas"] == 1
        assert float(env["CAPACITY_KW"]) == item["capacityKw"]
        assert env["STATE_DIR"] == "/state"
        assert spec["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
        # PUBLIC_URL names this very pod through its headless Service: <set>-0.<service>.<namespace>.svc:<port>.
        service = named(documents, "Service", spec["serviceName"])
        assert service["spec"]["clusterIP"] == "None"
        selector = service["spec"]["selector"]
        assert all(spec["template"]["metadata"]["labels"][k] == v for k, v in selector.items())
        for other in sets:
            if other is not statefulset:
                assert not all(other["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())
        port = container["ports"][0]["containerPort"]
        assert env["PUBLIC_URL"] == f"http://{statefulset['metadata']['name']}-0.{service['metadata']['name']}.{NAMESPACE}.svc:{port}"
        assert service["spec"]["ports"][0]["port"] == port
        for name in SECRET_ENV_NAMES - {"DATABASE_URL"}:
            assert env_of(container)[name]["valueFrom"]["secretKeyRef"]
        public_urls[env["SUBSTATION_ID"]] = env["PUBLIC_URL"]
        peer_lists.append(env["PEERS"].split(","))
        extra = item.get("env", {})
        assert all(env[k] == v for k, v in extra.items())
    assert all(sorted(peers) == sorted(public_urls.values()) for peers in peer_lists)
    balancers = named(documents, "Deployment", f"{RELEASE}-smart-grid-load-balancer-load-balancer")
    assert balancers["spec"]["replicas"] == 2
    balancer_env = env_of(balancers["spec"]["template"]["spec"]["containers"][0])
    assert sorted(balancer_env["SUBSTATIONS"]["value"].split(",")) == sorted(public_urls.values())


def service_url_targets(documents: list[dict[str, Any]], url: str) -> str:
    """The component of the pods a cluster URL http://<service>.<namespace>.svc:<port> reaches."""
    found = re.fullmatch(r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc:(\d+)", url)
    assert found and found.group(2) == NAMESPACE, url
    service = named(documents, "Service", found.group(1))
    assert int(found.group(3)) in [port["port"] for port in service["spec"]["ports"]], url
    return service["spec"]["selector"]["app.kubernetes.io/component"]


def charge_api(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return named(documents, "Deployment", f"{RELEASE}-smart-grid-load-balancer-charge-api")


def settings_classes() -> dict[str, Any]:
    from charge_point_gateway.config import Settings as GatewaySettings
    from charge_request_service.config import Settings as ChargeSettings
    from load_balancer.config import Settings as BalancerSettings
    from substation_service.config import Settings as SubstationSettings
    return {"charge-api": ChargeSettings, "load-balancer": BalancerSettings, "substation": SubstationSettings,
            "gateway": GatewaySettings}


@ALL_CI
def test_each_service_accepts_the_settings_the_chart_gives_it(values_file: Path) -> None:
    """The rendered environment, read by the services' own settings code (secrets stand in by valid values)."""
    from gridcommon.edge import EdgeSettings

    stand_ins = {"ADMIN_TOKEN": "operator-token-for-the-check", "PEER_KEY": "0123456789abcdef" * 4,
                 "DATABASE_URL": "postgresql://charge:secret@db:5432/charge"}
    classes = settings_classes()
    checked = set()
    for document in parse(rendered(values_file)):
        if document["kind"] not in WORKLOAD_KINDS:
            continue
        component = document["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        container = document["spec"]["template"]["spec"]["containers"][0]
        env = {name: entry["value"] if "value" in entry else stand_ins[name] for name, entry in env_of(container).items()}
        settings = classes[component].from_env(env)
        checked.add(component)
        if component != "gateway":  # every other service is served behind its nginx edge
            edge = EdgeSettings.from_env(env)
            assert edge.port == container["ports"][0]["containerPort"] and edge.host == "0.0.0.0"
        if component == "gateway":
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert (settings.ocpp_port, settings.http_port) == (ports["ocpp"], ports["http"])
        if component == "substation":
            assert settings.peering.peers and settings.peering.peer_key
    assert checked == set(classes)


def test_the_charge_api_reaches_the_balancers_and_the_gateway() -> None:
    documents = manifests("defaults")
    env = env_of(charge_api(documents)["spec"]["template"]["spec"]["containers"][0])
    assert service_url_targets(documents, env["LOAD_BALANCER_URL"]["value"]) == "load-balancer"
    assert service_url_targets(documents, env["GATEWAY_URL"]["value"]) == "gateway"


def test_sqlite_keeps_one_charge_api_on_its_own_volume() -> None:
    documents = manifests("defaults")
    deployment = charge_api(documents)
    spec = deployment["spec"]
    env = env_of(spec["template"]["spec"]["containers"][0])
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    assert env["STATE_DIR"]["value"] == "/state" and "DATABASE_URL" not in env
    claim = next(v for v in spec["template"]["spec"]["volumes"] if v["name"] == "state")["persistentVolumeClaim"]["claimName"]
    pvc = named(documents, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pdb = named(documents, "PodDisruptionBudget", deployment["metadata"]["name"])
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}


def test_cloudnativepg_wires_its_application_secret_as_database_url() -> None:
    documents = manifests("cloudnativepg")
    cluster = of_kind(documents, "Cluster")[0]
    assert cluster["spec"]["instances"] == 3
    deployment = charge_api(documents)
    env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
    # CloudNativePG names the owner's Secret <cluster>-app; its "uri" key is the connection URL.
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": f"{cluster['metadata']['name']}-app", "key": "uri"}
    assert "STATE_DIR" not in env and deployment["spec"]["replicas"] == 2
    assert not of_kind(documents, "PersistentVolumeClaim")
    assert named(documents, "PodDisruptionBudget", deployment["metadata"]["name"])["spec"]["minAvailable"] == 1


def test_an_external_database_and_secrets_come_from_the_operators_secrets() -> None:
    documents = manifests("external-database")
    env = env_of(charge_api(documents)["spec"]["template"]["spec"]["containers"][0])
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "charge-api-database", "key": "url"}
    assert env["ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "smart-grid-operators", "key": "token"}
    substation = of_kind(documents, "StatefulSet")[-1]["spec"]["template"]["spec"]["containers"][0]
    assert env_of(substation)["PEER_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "smart-grid-peers", "key": "key"}
    # The chart makes no Secret of its own when every one is given.
    assert not of_kind(documents, "Secret")


@pytest.mark.parametrize("settings, expected", [
    (["chargeApi.replicaCount=2"], "/chargeApi/replicaCount"),
    (["database.type=external"], "/database/external/existingSecret"),
    (["chargeApi.env.ADMIN_TOKEN=plain"], "ADMIN_TOKEN"),
    (["substations.env.PEER_KEY=plain"], "PEER_KEY"),
    (["loadBalancer.replicas=3"], "replicas"),
    (["peerKey.value=short"], "/peerKey/value"),
    (["gateway.service.type=External"], "/gateway/service/type"),
    (["loadBalancer.podDisruptionBudget.minAvailable=2"], "must be below replicaCount"),
    (["gateway.httpPort=9000"], "must differ"),
])
def test_values_that_would_break_the_stack_are_refused(settings: list[str], expected: str) -> None:
    args = [arg for setting in settings for arg in ("--set", setting)]
    with pytest.raises(RenderError) as refused:
        render_text(*args)
    assert expected in str(refused.value)


def test_two_substations_with_one_id_are_refused(tmp_path: Path) -> None:
    values = tmp_path / "twice.yaml"
    values.write_text(yaml.safe_dump({"substations": {"list": [
        {"id": "north", "port": 5011, "capacityKw": 50}, {"id": "north", "port": 5012, "capacityKw": 50}]}}))
    with pytest.raises(RenderError, match="north is listed twice"):
        render_text("-f", str(values))
    # More than one charge API with a database is accepted.
    render_text("--set", "database.type=cloudnativepg", "--set", "chargeApi.replicaCount=3")


# --- network policies --------------------------------------------------------------------------------

def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions with In, NotIn, Exists, DoesNotExist)."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[operator]
        if not ok:
            return False
    return True


class Endpoint:
    """A pod (labels, namespace and its namespace's labels) or an address outside the cluster."""

    def __init__(self, name: str, labels: dict[str, str] | None = None, namespace: str | None = NAMESPACE,
                 namespace_labels: dict[str, str] | None = None, ip: str = "10.9.9.9") -> None:
        self.name, self.labels, self.namespace, self.ip = name, labels or {}, namespace, ip
        self.namespace_labels = namespace_labels if namespace_labels is not None else (
            {"kubernetes.io/metadata.name": namespace} if namespace else {})


def peer_admits(peer: dict[str, Any], policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        address = ipaddress.ip_address(other.ip)
        return (address in ipaddress.ip_network(block["cidr"])
                and not any(address in ipaddress.ip_network(e) for e in block.get("except", [])))
    if other.namespace is None:
        return False
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], other.namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return matches(peer.get("podSelector", {}), other.labels)


def rules_admit(rules: list[dict[str, Any]], key: str, namespace: str, other: Endpoint, port: int) -> bool:
    for rule in rules:
        ports = rule.get("ports")
        if ports and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
            continue
        peers = rule.get(key)
        if not peers or any(peer_admits(peer, namespace, other) for peer in peers):
            return True
    return False


def direction_allowed(policies: list[dict[str, Any]], pod: Endpoint, direction: str, other: Endpoint, port: int) -> bool:
    """Whether the policies selecting ``pod`` allow this direction of a connection: isolated pods need a rule."""
    selecting = [p for p in policies if p["metadata"].get("namespace", NAMESPACE) == pod.namespace
                 and matches(p["spec"]["podSelector"], pod.labels)
                 and direction in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    key, rules = ("from", "ingress") if direction == "Ingress" else ("to", "egress")
    return any(rules_admit(p["spec"].get(rules, []), key, pod.namespace, other, port) for p in selecting)


def connection_allowed(policies: list[dict[str, Any]], source: Endpoint, target: Endpoint, port: int) -> bool:
    egress = source.namespace is None or direction_allowed(policies, source, "Egress", target, port)
    ingress = target.namespace is None or direction_allowed(policies, target, "Ingress", source, port)
    return egress and ingress


def release_pods(documents: list[dict[str, Any]]) -> dict[str, tuple[Endpoint, list[int]]]:
    """Each component's pod (labels as its template gives them) and the ports it listens on."""
    pods = {}
    for document in documents:
        if document["kind"] in WORKLOAD_KINDS:
            template = document["spec"]["template"]
        elif document["kind"] == "Pod":
            template = document
        else:
            continue
        labels = template["metadata"]["labels"]
        name = labels.get("smart-grid-load-balancer/substation") or labels["app.kubernetes.io/component"]
        ports = [p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])]
        pods[name] = (Endpoint(name, labels), ports)
    return pods


def reachable(documents: list[dict[str, Any]], extra: list[Endpoint]) -> set[tuple[str, str, int]]:
    """Every (source, target, port) the policies allow between the release's pods and the given others."""
    policies = of_kind(documents, "NetworkPolicy")
    pods = release_pods(documents)
    sources = [pod for pod, _ in pods.values()] + extra
    allowed = set()
    for source in sources:
        for target, ports in pods.values():
            for port in ports:
                if source is not target and connection_allowed(policies, source, target, port):
                    allowed.add((source.name, target.name, port))
    return allowed


def test_network_policies_allow_exactly_the_designs_paths() -> None:
    documents = manifests("cloudnativepg")
    internet = Endpoint("internet", namespace=None, ip="203.0.113.7")
    prometheus = Endpoint("prometheus", {"app.kubernetes.io/name": "prometheus"}, namespace="monitoring")
    stranger = Endpoint("stranger", {"app": "other"}, namespace="other")
    allowed = reachable(documents, [internet, prometheus, stranger])
    substations = [f"substation-{n}" for n in (1, 2, 3)]
    ports = {"substation-1": 5011, "substation-2": 5012, "substation-3": 5013}
    expected = set()
    for outsider in ("internet", "prometheus", "stranger"):
        expected |= {(outsider, "charge-api", 5000), (outsider, "gateway", 9000)}
    expected |= {("prometheus", "load-balancer", 5002), ("prometheus", "gateway", 9001)}
    expected |= {("prometheus", s, ports[s]) for s in substations}
    expected |= {("charge-api", "load-balancer", 5002), ("charge-api", "gateway", 9001), ("helm-test", "charge-api", 5000)}
    expected |= {(source, s, ports[s]) for source in ("load-balancer", "gateway") for s in substations}
    expected |= {(a, b, ports[b]) for a in substations for b in substations if a != b}
    assert allowed == expected, (f"allowed but not in the design: {sorted(allowed - expected)}; "
                                 f"in the design but refused: {sorted(expected - allowed)}")


def test_pods_reach_dns_and_the_charge_api_its_database_only() -> None:
    policies = of_kind(manifests("cloudnativepg"), "NetworkPolicy")
    pods = release_pods(manifests("cloudnativepg"))
    dns = Endpoint("dns", {"k8s-app": "kube-dns"}, namespace="kube-system")
    database = Endpoint("db", {"cnpg.io/cluster": f"{RELEASE}-smart-grid-load-balancer-db"})
    other_db = Endpoint("other-db", {"cnpg.io/cluster": "someone-elses"})
    for pod, _ in pods.values():
        assert direction_allowed(policies, pod, "Egress", dns, 53), pod.name
        assert direction_allowed(policies, pod, "Egress", database, 5432) == (pod.name == "charge-api"), pod.name
        assert not direction_allowed(policies, pod, "Egress", other_db, 5432), pod.name
        assert not direction_allowed(policies, pod, "Egress", Endpoint("x", namespace=None, ip="8.8.8.8"), 443)
    # An external database: only the address range the values give.
    external = of_kind(manifests("external-database"), "NetworkPolicy")
    api = release_pods(manifests("external-database"))["charge-api"][0]
    assert direction_allowed(external, api, "Egress", Endpoint("pg", namespace=None, ip="10.20.3.4"), 5432)
    assert not direction_allowed(external, api, "Egress", Endpoint("pg", namespace=None, ip="10.30.3.4"), 5432)
    # The extra egress the values add (the charge API's Redis), and only for the charge API.
    redis = Endpoint("redis", {"app.kubernetes.io/name": "redis"}, namespace="shared")
    for pod, _ in pods.values():
        assert direction_allowed(policies, pod, "Egress", redis, 6379) == (pod.name == "charge-api"), pod.name


def test_the_policy_model_sees_a_missing_deny() -> None:
    """The evaluator itself: without the policies every path is open, and the design check would fail."""
    documents = [d for d in manifests("defaults") if d["kind"] != "NetworkPolicy"]
    allowed = reachable(documents, [Endpoint("internet", namespace=None)])
    assert ("charge-api", "substation-1", 5011) in allowed
    assert ("internet", "load-balancer", 5002) in allowed


# --- the rules and dashboards are the repository's ---------------------------------------------------

@pytest.mark.parametrize("chart_dir, source_dir, pattern", [
    ("files/rules", "prometheus/rules", "*.yml"),
    ("files/dashboards", "grafana/dashboards", "*.json"),
])
def test_the_chart_reads_the_repositorys_own_files(chart_dir: str, source_dir: str, pattern: str) -> None:
    """Helm reads only files inside the chart: these folders are symbolic links to the sources (a packaged
    chart holds their contents), so there is no copy to drift. Whatever they are, their files are the sources'."""
    source, in_chart = REPO_ROOT / source_dir, CHART / chart_dir
    assert in_chart.is_symlink() and in_chart.resolve() == source.resolve(), (
        f"{in_chart.relative_to(REPO_ROOT)} should be a symbolic link to {source_dir}")
    names = sorted(p.name for p in source.glob(pattern))
    assert names and names == sorted(p.name for p in in_chart.glob(pattern))
    _, mismatch, errors = filecmp.cmpfiles(source, in_chart, names, shallow=False)
    assert not mismatch and not errors, f"{mismatch + errors} differ from {source_dir}"


def test_the_prometheus_rule_holds_exactly_the_repositorys_rules() -> None:
    rule = of_kind(manifests("monitoring"), "PrometheusRule")
    assert len(rule) == 1
    expected = []
    for path in sorted((REPO_ROOT / "prometheus" / "rules").glob("*.yml")):
        expected += yaml.safe_load(path.read_text())["groups"]
    assert rule[0]["spec"]["groups"] == expected
    assert rule[0]["metadata"]["labels"]["release"] == "monitoring"
    # Templates of the alerts' annotations reach Prometheus untouched by Helm.
    assert "{{ $labels.job }}" in json.dumps(rule[0])


def test_the_dashboards_are_configmaps_for_grafanas_sidecar() -> None:
    maps = [m for m in of_kind(manifests("defaults"), "ConfigMap") if m["metadata"]["labels"].get("grafana_dashboard") == "1"]
    found = {}
    for config_map in maps:
        (name, text), = config_map["data"].items()
        found[name] = json.loads(text)
        assert len(text) < 1024 * 1024
    expected = {p.name: json.loads(p.read_text()) for p in (REPO_ROOT / "grafana" / "dashboards").glob("*.json")}
    assert found == expected


def test_service_monitors_scrape_every_job_the_rules_name() -> None:
    documents = manifests("monitoring")
    monitors = of_kind(documents, "ServiceMonitor")
    jobs = {}
    for monitor in monitors:
        spec = monitor["spec"]
        services = [s for s in of_kind(documents, "Service") if matches(spec["selector"], s["metadata"]["labels"])]
        assert services, monitor["metadata"]["name"]
        for service in services:
            assert spec["endpoints"][0]["port"] in [p["name"] for p in service["spec"]["ports"]]
            jobs.setdefault(service["metadata"]["labels"][spec["jobLabel"]], []).append(service["metadata"]["name"])
        assert monitor["metadata"]["labels"]["release"] == "monitoring"
    scrape = yaml.safe_load((REPO_ROOT / "prometheus" / "prometheus.yml").read_text())
    expected_jobs = {job["job_name"] for job in scrape["scrape_configs"]} - {"prometheus"}
    assert set(jobs) == expected_jobs
    assert len(jobs["substation"]) == 3
    substation_monitor = [m for m in monitors if m["metadata"]["labels"]["app.kubernetes.io/component"] == "substation"][0]
    assert substation_monitor["spec"]["endpoints"][0]["honorLabels"] is True


def test_helm_test_pod_charges_through_the_charge_api_service() -> None:
    documents = manifests("defaults")
    pod = of_kind(documents, "Pod")[0]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    assert service_url_targets(documents, env_of(container)["CHARGE_API_URL"]["value"]) == "charge-api"
    script = container["command"][-1]
    assert '/charge"' in script and "!= 201" in script and "requests.delete" in script
    compile(script, "helm-test", "exec")


def write_golden() -> None:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for old in GOLDEN_DIR.glob("*.yaml"):
        old.unlink()
    for values_file in CI_VALUES:
        golden_path(values_file).write_text(golden_view(render_text("-f", str(values_file))))
        print(f"wrote {golden_path(values_file).relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-golden"]:
        sys.exit("usage: python -m tests.test_helm_chart --write-golden")
    write_golden()
