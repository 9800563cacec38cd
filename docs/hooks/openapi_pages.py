"""MkDocs hook: the API reference pages, written from the services' own OpenAPI documents.

Each service's document is plain Python data (``<service>/openapi_spec.py``, ``SPEC``), the
same dict the service serves at ``GET /openapi.json`` and the tests validate and fuzz it
with. Writing the reference from it at build time keeps the pages from drifting from what
the services do: a hand-written copy would not.

Each page lists every operation in the document's order, under a heading whose anchor is
the operation's ``operationId`` (``reference/charge-request-service.md#startCharging``):
method and path, summary, description, who may call it, its parameters, the fields of its
request body, each answer with its status, description, error codes and headers, and the
fields of its successful answers.
"""
from __future__ import annotations

import importlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

# Page (under docs/) -> the module whose SPEC it renders.
PAGES = {
    "reference/charge-request-service.md": "charge_request_service.openapi_spec",
    "reference/load-balancer.md": "load_balancer.openapi_spec",
    "reference/substation-service.md": "substation_service.openapi_spec",
}
HTTP_METHODS = ("get", "put", "post", "delete", "patch")
# Nested request fields are listed down to this depth (``a.b.c``); deeper ones are rare and
# the service's /openapi.json has them all.
MAX_FIELD_DEPTH = 3

Schema = Mapping[str, Any]


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the generated reference pages to the site's files (they exist only in the build)."""
    for src_uri, module in PAGES.items():
        spec = importlib.import_module(module).SPEC
        files.append(File.generated(config, src_uri, content=render_spec(spec, module)))
    return files


# Rendering -----------------------------------------------------------------------------


def render_spec(spec: Schema, module: str) -> str:
    """The Markdown page of one OpenAPI document."""
    info = spec["info"]
    lines = [
        f"# {info['title']}",
        "",
        f"*Generated at build time from `{module.replace('.', '/')}.py` (served as `GET /openapi.json`), "
        f"OpenAPI {spec['openapi']}, version {info['version']}.*",
        "",
        info.get("description", ""),
        "",
    ]
    schemes = spec.get("components", {}).get("securitySchemes", {})
    if schemes:
        lines += ["## Credentials", "", "| Name | Kind | Meaning |", "|---|---|---|"]
        for name, scheme in schemes.items():
            kind = f"{scheme.get('type', '')} {scheme.get('scheme', '')}".strip()
            lines.append(f"| `{name}` | {kind} | {cell(scheme.get('description', ''))} |")
        lines.append("")
    operations = list(iter_operations(spec))
    lines += ["## Operations", "", "| Operation | Summary |", "|---|---|"]
    for path, method, operation in operations:
        lines.append(f"| [`{method.upper()} {path}`](#{operation['operationId']}) | {cell(operation.get('summary', ''))} |")
    lines.append("")
    for path, method, operation in operations:
        lines += render_operation(spec, path, method, operation)
    return "\n".join(lines) + "\n"


def iter_operations(spec: Schema) -> Iterator[tuple[str, str, Schema]]:
    for path, item in spec["paths"].items():
        shared = item.get("parameters", [])
        for method in HTTP_METHODS:
            if method in item:
                operation = dict(item[method])
                operation["parameters"] = [*shared, *operation.get("parameters", [])]
                yield path, method, operation


def render_operation(spec: Schema, path: str, method: str, operation: Schema) -> list[str]:
    lines = [f"## `{method.upper()} {path}` {{#{operation['operationId']}}}", ""]
    if operation.get("summary"):
        lines += [f"**{operation['summary']}**", ""]
    if operation.get("description"):
        lines += [operation["description"], ""]
    lines += [f"Credential: {credential(spec, operation)}.", ""]
    parameters = [resolve(spec, parameter) for parameter in operation.get("parameters", [])]
    if parameters:
        lines += ["| Parameter | In | Required | Type | Meaning |", "|---|---|---|---|---|"]
        for parameter in parameters:
            lines.append(
                f"| `{parameter['name']}` | {parameter['in']} | {'yes' if parameter.get('required') else 'no'} "
                f"| {type_of(spec, parameter.get('schema', {}))} | {cell(parameter.get('description', ''))} |"
            )
        lines.append("")
    body = operation.get("requestBody")
    if body:
        body = resolve(spec, body)
        for media, content in body.get("content", {}).items():
            lines += [f"Request body (`{media}`{', required' if body.get('required') else ''}): "
                      f"{body.get('description', '')}", ""]
            rows = list(field_rows(spec, content.get("schema", {})))
            if rows:
                lines += ["| Field | Type | Required | Meaning |", "|---|---|---|---|"]
                lines += [f"| `{name}` | {kind} | {required} | {cell(text)} |" for name, kind, required, text in rows]
                lines.append("")
    lines += ["| Status | Meaning | Error codes | Headers |", "|---|---|---|---|"]
    for status, response in operation["responses"].items():
        response = resolve(spec, response)
        codes = sorted({code for content in response.get("content", {}).values()
                        for code in error_codes(spec, content.get("schema", {}))})
        headers = ", ".join(f"`{name}`" for name in response.get("headers", {}))
        lines.append(f"| {status} | {cell(response.get('description', ''))} "
                     f"| {', '.join(f'`{code}`' for code in codes)} | {headers} |")
    lines.append("")
    for status, response in operation["responses"].items():
        if not status.startswith("2"):
            continue
        for media, content in resolve(spec, response).get("content", {}).items():
            rows = list(field_rows(spec, content.get("schema", {})))
            if rows:
                lines += [f"Fields of the {status} answer (`{media}`):", "",
                          "| Field | Type | Always | Meaning |", "|---|---|---|---|"]
                lines += [f"| `{name}` | {kind} | {required} | {cell(text)} |" for name, kind, required, text in rows]
                lines.append("")
    return lines


def credential(spec: Schema, operation: Schema) -> str:
    requirements = operation.get("security", spec.get("security", []))
    names = [name for requirement in requirements for name in requirement]
    return " or ".join(f"`{name}`" for name in names) if names else "none"


# Schemas -------------------------------------------------------------------------------


def resolve(spec: Schema, node: Schema) -> Schema:
    """``node`` with its ``$ref`` (``#/components/...``) followed, as often as it takes."""
    while isinstance(node, Mapping) and "$ref" in node:
        target: Any = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def merged(spec: Schema, schema: Schema) -> tuple[dict[str, Schema], set[str], list[Schema]]:
    """The properties and required names of ``schema`` with its ``allOf`` merged in, and its alternatives."""
    schema = resolve(spec, schema)
    properties: dict[str, Schema] = {}
    required: set[str] = set(schema.get("required", []))
    alternatives: list[Schema] = list(schema.get("anyOf", [])) + list(schema.get("oneOf", []))
    for part in schema.get("allOf", []):
        part_properties, part_required, part_alternatives = merged(spec, part)
        for name, value in part_properties.items():
            properties[name] = {**properties.get(name, {}), **resolve(spec, value)}
        required |= part_required
        alternatives += part_alternatives
    for name, value in schema.get("properties", {}).items():
        properties[name] = {**properties.get(name, {}), **resolve(spec, value)}
    return properties, required, alternatives


def field_rows(spec: Schema, schema: Schema, prefix: str = "", depth: int = 1) -> Iterator[tuple[str, str, str, str]]:
    properties, required, alternatives = merged(spec, schema)
    for name, value in properties.items():
        yield f"{prefix}{name}", type_of(spec, value), "yes" if name in required else "no", value.get("description", "")
        if depth < MAX_FIELD_DEPTH and (resolve(spec, value).get("properties") or resolve(spec, value).get("allOf")):
            yield from field_rows(spec, value, f"{prefix}{name}.", depth + 1)
    for alternative in alternatives:
        yield from field_rows(spec, alternative, prefix, depth)


def error_codes(spec: Schema, schema: Schema) -> Iterator[str]:
    """Every ``error`` code a response schema allows (its ``enum`` or ``const``), alternatives included."""
    properties, _, alternatives = merged(spec, schema)
    error = properties.get("error", {})
    yield from error.get("enum", [])
    if "const" in error:
        yield error["const"]
    for alternative in alternatives:
        yield from error_codes(spec, alternative)


def type_of(spec: Schema, schema: Schema) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"{name} ({type_of(spec, resolve(spec, schema))})"
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return "one of " + ", ".join(f"`{value}`" for value in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "array":
        return f"array of {type_of(spec, schema.get('items', {}))}"
    if kind:
        return kind
    if "allOf" in schema or "properties" in schema:
        return "object"
    if "anyOf" in schema or "oneOf" in schema:
        return " or ".join(type_of(spec, part) for part in [*schema.get("anyOf", []), *schema.get("oneOf", [])])
    return "any"


def cell(text: str) -> str:
    """``text`` fit for one cell of a Markdown table."""
    return " ".join(str(text).split()).replace("|", "\\|")
