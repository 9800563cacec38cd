"""The README's commands, as a reader pastes them.

Every shell block parses; every ``make`` target it names is one the Makefile has; every
relative link points at a file of the repository; and its tour runs for real, block by
block, against the stack `make run` starts (the Procfile's processes and settings, on free
ports), each command answering the status, error codes, fields and headers its
``# -> ...`` comment says.
"""
from __future__ import annotations

import json
import re
import secrets
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.harness import OPERATOR_TOKEN, REPO_ROOT, Service, start_all, stop_all, wait_for

README = REPO_ROOT / "README.md"
SHELL_BLOCK = re.compile(r"^```(bash|sh|console)\n(.*?)^```", re.S | re.M)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
MAKE_TARGET = re.compile(r"(?:^|[\s;&|(])make ([a-z][\w-]*)")
RELATIVE_LINK = re.compile(r"\]\((?!https?://|#)([^)\s#]+)(?:#[^)\s]*)?\)")
# The README's local-mode addresses, and the Procfile process behind each.
LOCAL_PORTS = {
    5000: "charge-request-service",
    5002: "load-balancer",
    5003: "load-balancer-2",
    5011: "substation-1",
    5012: "substation-2",
    5013: "substation-3",
}
APPS = {
    "charge-request-service": "charge_request_service:create_app()",
    "load-balancer": "load_balancer:create_app()",
    "load-balancer-2": "load_balancer:create_app()",
    "substation-1": "substation_service:create_app()",
    "substation-2": "substation_service:create_app()",
    "substation-3": "substation_service:create_app()",
}
SETTING = re.compile(r"^[A-Z][A-Z0-9_]*=")
TIMEOUT = 10


def readme_text() -> str:
    return README.read_text()


def shell_blocks(text: str) -> list[str]:
    """The body of every ```bash, ```sh and ```console block; a console block's commands without the prompt."""
    blocks = []
    for language, body in SHELL_BLOCK.findall(text):
        if language == "console":
            body = "\n".join(line[2:] for line in body.splitlines() if line.startswith("$ "))
        blocks.append(body)
    return blocks


def section(text: str, heading: str) -> str:
    marker = f"\n## {heading}\n"
    assert marker in text, f"the README has no section {heading!r}"
    return text.split(marker, 1)[1].split("\n## ", 1)[0]


# --- what can be checked without running anything ------------------------------------------------


def test_the_readme_fits_on_a_screen_or_two() -> None:
    assert len(readme_text().splitlines()) <= 300


def test_every_shell_block_parses() -> None:
    blocks = shell_blocks(readme_text())
    assert blocks, "the README has no shell block"
    for block in blocks:
        result = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True, timeout=TIMEOUT)
        assert result.returncode == 0, f"bash cannot parse this README block:\n{block}\n{result.stderr}"


def make_targets(text: str) -> set[str]:
    """Every target of a ``make`` command in the README's code: blocks and `spans`."""
    code = [*shell_blocks(text), *CODE_SPAN.findall(text)]
    return {target for snippet in code for target in MAKE_TARGET.findall(snippet)}


def test_every_make_target_the_readme_names_exists() -> None:
    targets = make_targets(readme_text())
    assert {"run", "docs"} <= targets, targets
    for target in sorted(targets):
        result = subprocess.run(["make", "-n", target], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"`make {target}`, named in the README, fails: {result.stderr.strip()}"


def test_every_relative_link_of_the_readme_leads_to_a_file() -> None:
    links = RELATIVE_LINK.findall(readme_text())
    assert any(link.startswith("docs/") for link in links), links
    missing = [link for link in links if not (REPO_ROOT / link).exists()]
    assert not missing, f"the README links to files that do not exist: {missing}"


# --- the tour, run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expectation:
    """What one ``# -> ...`` comment of the tour says its command answers."""

    statuses: list[int]
    fields: list[tuple[str, str]]  # "key": literal JSON value
    headers: list[tuple[str, str]]
    message_parts: list[str]  # the words of a "message" on either side of its "…"


def expectations(block: str) -> list[Expectation]:
    found = []
    # A comment may go on over the next lines, each indented after its "#".
    for comment in re.findall(r"# -> (.*(?:\n# {2,}.*)*)", block):
        head = re.split(r"[{:]", comment, maxsplit=1)[0]
        statuses = [int(status) for status, times in re.findall(r"\b(\d{3})\b(?:\s*×(\d+))?", head)
                    for _ in range(int(times or 1))]
        # Values with "…" in them are the reader's own (ids, times): only exact ones are checked.
        fields = re.findall(r'"(\w+)": ("[^"…]*"|-?\d+(?:\.\d+)?|true|false|null)(?=[,}\s])', comment)
        headers = re.findall(r"\b([A-Z][a-z]+(?:-[A-Z][a-z]+)+): (\w+)", comment)
        parts = [part.strip() for message in re.findall(r'"message": "([^"]*)"', comment)
                 for part in message.split("…") if part.strip()]
        assert statuses, f"a tour comment names no status: {comment!r}"
        found.append(Expectation(statuses, fields, headers, parts))
    return found


def test_the_tour_comments_are_understood() -> None:
    """Guards the parser the tour test relies on: each block says what its commands answer."""
    blocks = shell_blocks(section(readme_text(), "A tour"))
    assert len(blocks) >= 5
    for block in blocks:
        assert expectations(block), f"a tour block says nothing about its answers:\n{block}"
    every = [e for block in blocks for e in expectations(block)]
    statuses = {status for e in every for status in e.statuses}
    assert {200, 201, 202, 400, 401, 409, 422, 503} <= statuses, statuses
    assert ("state", '"queued"') in [field for e in every for field in e.fields]


def procfile_services(log_dir: Path, state_dir: Path) -> dict[str, Service]:
    """The Procfile's services with its settings, on free ports: what `make run` starts, but for this test."""
    lines = [line for line in (REPO_ROOT / "Procfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    services = {}
    for line in lines:
        name, command = line.split(":", 1)
        if name not in APPS:
            continue  # prometheus: not part of the tour
        services[name] = Service(name=name, app=APPS[name], env={}, log_dir=log_dir)
    assert set(services) == set(APPS), f"the Procfile's services changed: {sorted(services)}"
    ports = {local: services[name].port for local, name in LOCAL_PORTS.items()}
    peer_key = secrets.token_hex(32)
    for line in lines:
        name, command = line.split(":", 1)
        if name not in services:
            continue
        # The settings are the line's leading NAME=value words; the command follows them.
        for word in shlex.split(command):
            if not SETTING.match(word):
                break
            key, value = word.split("=", 1)
            if key in {"HOST", "PORT"}:
                continue
            value = {"PEER_KEY": peer_key, "ADMIN_TOKEN": OPERATOR_TOKEN, "STATE_DIR": str(state_dir)}.get(key, value)
            value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
            value = re.sub(r"127\.0\.0\.1:(50\d\d)", lambda m: f"127.0.0.1:{ports[int(m.group(1))]}", value)
            services[name].env[key] = value
    return services


@pytest.fixture(params=["open", "keys"])
def local_stack(tmp_path: Path, request: pytest.FixtureRequest):
    """The Procfile's stack; its charge API as `make run` has it (``open`` on 127.0.0.1), and with client keys
    required, as compose has it: the tour works in both."""
    services = procfile_services(tmp_path / "logs", tmp_path / "state")
    assert services["charge-request-service"].env["PUBLIC_API_AUTH"] == "open"
    services["charge-request-service"].env["PUBLIC_API_AUTH"] = request.param
    (tmp_path / "logs").mkdir()
    order = ["substation-1", "substation-2", "substation-3", "load-balancer", "load-balancer-2",
             "charge-request-service"]
    started = start_all([services[name] for name in order])
    for name in ("load-balancer", "load-balancer-2"):
        url = services[name].url
        wait_for(lambda: all(entry["up"] for entry in requests.get(f"{url}/status", timeout=TIMEOUT).json()
                             ["substations"]), 20, f"{name} to see every substation")
    yield services
    stop_all(list(reversed(started)))


# Runs before the tour's commands: counts each curl's HTTP status (000 when none came) into a log,
# without changing what the command prints.
STATUS_RECORDER = r"""
curl() {
  local headers status rc
  headers=$(mktemp)
  command curl -D "$headers" "$@"; rc=$?
  status=$(grep -o '^HTTP/[0-9.]* [0-9]*' "$headers" | tail -n 1 | cut -d' ' -f2)
  echo "${status:-000}" >> "$STATUS_LOG"
  rm -f "$headers"
  return $rc
}
"""


def aimed_at(block: str, services: dict[str, Service]) -> str:
    for local, name in LOCAL_PORTS.items():
        block = re.sub(rf"\blocalhost:{local}\b", f"127.0.0.1:{services[name].port}", block)
    return block


def test_the_tour_answers_as_the_readme_says(local_stack: dict[str, Service], tmp_path: Path) -> None:
    blocks = shell_blocks(section(readme_text(), "A tour"))
    reader = tmp_path / "reader"
    reader.mkdir()
    # What `make run` read the operator token from, as the tour's first line reads it.
    (reader / ".env").write_text(f"ADMIN_TOKEN={OPERATOR_TOKEN}\n")
    status_log = tmp_path / "statuses"
    script = [STATUS_RECORDER]
    for number, block in enumerate(blocks):
        marker = f"@@block {number}@@"
        script += [f"echo '{marker}'; echo '{marker}' >> \"$STATUS_LOG\"", aimed_at(block, local_stack)]
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=reader,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "STATUS_LOG": str(status_log), "HOME": str(reader)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"the tour failed:\n{result.stdout}\n{result.stderr}"
    outputs = re.split(r"^@@block \d+@@\n", result.stdout, flags=re.M)[1:]
    statuses = [
        [int(line) for line in part.split()]
        for part in re.split(r"^@@block \d+@@\n", status_log.read_text(), flags=re.M)[1:]
    ]
    assert len(outputs) == len(statuses) == len(blocks), result.stdout
    for block, output, answered in zip(blocks, outputs, statuses):
        expected = expectations(block)
        said = [status for e in expected for status in e.statuses]
        assert answered == said, f"this README block answered {answered}, it says {said}:\n{block}\n{output}"
        for e in expected:
            for key, literal in e.fields:
                value = json.dumps(json.loads(literal))
                assert re.search(rf'"{key}":\s*{re.escape(value)}', output), (
                    f'this README block does not answer "{key}": {literal} as it says:\n{block}\n{output}')
            for part in e.message_parts:
                assert part in output, f"this README block's message does not say {part!r}:\n{block}\n{output}"
            for name, value in e.headers:
                assert re.search(rf"^{name}:\s*{value}\s*$", output, re.M | re.I), (
                    f"this README block does not answer the header {name}: {value}:\n{block}\n{output}")
    assert not result.stderr.strip(), result.stderr
