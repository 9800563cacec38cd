"""The documentation site (mkdocs.yml, docs/): it builds under --strict without one warning, its API
reference lists every operation of the services' OpenAPI documents, and no page fetches anything
from the internet.

mkdocs.yml's ``validation`` makes a broken link, an unknown anchor, a page left out of the nav and
a nav entry without a page warnings, which --strict turns into a failed build.
"""
from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from charge_request_service.openapi_spec import SPEC as CHARGE_SPEC
from load_balancer.openapi_spec import SPEC as BALANCER_SPEC
from substation_service.openapi_spec import SPEC as SUBSTATION_SPEC
from tests.harness import REPO_ROOT

# The generated reference page of each document (docs/hooks/openapi_pages.py), as built.
REFERENCE_PAGES = {
    "reference/charge-request-service.html": CHARGE_SPEC,
    "reference/load-balancer.html": BALANCER_SPEC,
    "reference/substation-service.html": SUBSTATION_SPEC,
}
HTTP_METHODS = ("get", "put", "post", "delete", "patch")
# Tags whose attribute the browser fetches by itself when it shows a page.
FETCHED = re.compile(
    r"<(?:script|img|iframe|source|video|audio)\b[^>]*\bsrc=[\"']?(https?:)?//"
    r"|<link\b[^>]*\bhref=[\"']?(https?:)?//",
    re.I,
)
CSS_FETCHED = re.compile(r"@import\s+(?:url\()?[\"']?(https?:)?//|url\([\"']?(https?:)?//", re.I)


def build(site_dir: Path, config: Path = REPO_ROOT / "mkdocs.yml") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site_dir)],
        cwd=REPO_ROOT,
        # Material's banner about its own end of life says nothing about these pages.
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    result = build(site_dir)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{output}"
    warnings = [line for line in output.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert not warnings, "mkdocs build warned:\n" + "\n".join(warnings)
    return site_dir


def test_the_site_builds_strictly_without_a_warning(site: Path) -> None:
    assert (site / "index.html").is_file()
    assert (site / "search" / "search_index.js").is_file(), "the offline plugin's search index is missing"


def operations(spec: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (method.upper(), path, operation["operationId"])
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]


@pytest.mark.parametrize("page", sorted(REFERENCE_PAGES))
def test_the_api_reference_has_every_operation_with_its_answers(site: Path, page: str) -> None:
    spec = REFERENCE_PAGES[page]
    text = (site / page).read_text()
    for method, path, operation_id in operations(spec):
        heading = re.search(rf'<h2 id="{re.escape(operation_id)}">(.*?)</h2>', text, re.S)
        assert heading, f"{page} has no anchor #{operation_id} ({method} {path})"
        assert f"{method} {path}" in html.unescape(heading.group(1)), heading.group(1)
        section = text[heading.end():].split("<h2 ", 1)[0]
        for status in spec["paths"][path][method.lower()]["responses"]:
            assert re.search(rf"<td>{status}</td>", section), f"{page}: {method} {path} does not list its {status}"


def test_the_reference_names_the_error_codes(site: Path) -> None:
    text = html.unescape((site / "reference/charge-request-service.html").read_text())
    for code in ("no_capacity", "queue_full", "idempotency_key_reused", "vehicle_already_charging", "too_many_requests"):
        assert f"<code>{code}</code>" in text, code


def test_no_page_fetches_anything_from_the_internet(site: Path) -> None:
    offenders = []
    for path in site.rglob("*"):
        if path.suffix == ".html" and FETCHED.search(path.read_text(errors="replace")):
            offenders.append(str(path.relative_to(site)))
        if path.suffix == ".css" and CSS_FETCHED.search(path.read_text(errors="replace")):
            offenders.append(str(path.relative_to(site)))
    assert not offenders, f"pages that load assets from the internet: {offenders}"


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    """The strict build is what catches bad links: one page pointing nowhere must fail it."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n[nowhere](missing.md) and [no anchor](#nothing-here)\n")
    config = tmp_path / "mkdocs.yml"
    settings = (REPO_ROOT / "mkdocs.yml").read_text()
    settings = re.sub(r"(?ms)^nav:.*?(?=^\S|\Z)", "nav:\n  - Home: index.md\n", settings)
    settings = re.sub(r"(?ms)^hooks:.*?(?=^\S|\Z)", "", settings)
    config.write_text(settings.replace("docs_dir: docs", f"docs_dir: {docs}"))
    result = build(tmp_path / "site", config)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "missing.md" in output and "nothing-here" in output, output
