"""Finished sessions as records: what an operator bills and reports from.

``GET /sessions?ended=1&since=<ISO>&limit=<n>&after=<cursor>`` pages through
them by end time, oldest first; ``GET /sessions/export?format=csv|jsonl&since=``
streams them all. Both take the operator token: a record names a vehicle and
what it was charged. With a state file the records are read from it (kept for
``SESSION_RECORDS_RETENTION_DAYS``), else from memory (the newest only).
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request

from gridcommon.auth import require_operator
from gridcommon.timefmt import format_time, parse_time
from gridcommon.validation import SESSION_ID_PATTERN
from gridcommon.web import ApiError
from substation_service.ledger import SessionReport, UnknownSession
from substation_service.routes import session_json, substation

record_blueprint = Blueprint("records", __name__)

PAGE_DEFAULT = 100
PAGE_MAX = 1_000
# Query parameters that make GET /sessions?ended=1 a page of records rather than the recent ones.
PAGING_PARAMETERS = ("since", "limit", "after")
EXPORT_FORMATS = ("csv", "jsonl")
# The columns of the CSV export, in order: what a bill or a report needs of each session.
CSV_COLUMNS = (
    "session_id", "substation", "vehicle_id", "started_at", "ended_at", "end_reason", "amount",
    "delivered_kwh", "energy_kwh", "departure", "need_met", "suspended_seconds",
)


@record_blueprint.before_app_request
def records_page() -> Response | None:
    """``GET /sessions?ended=1`` with ``since``, ``limit`` or ``after``: one page of finished records and the
    cursor of the next (None on the last page). Without them it is the list of the recent ones (routes.py)."""
    if (request.method != "GET" or request.path != "/sessions" or request.args.get("ended") not in ("1", "true")
            or not any(name in request.args for name in PAGING_PARAMETERS)):
        return None
    current = substation()
    require_operator(current.settings.admin_token, "substation")
    since = _since()
    after = _cursor(request.args.get("after"))
    limit = _limit()
    reports = current.ledger.records(since, after, limit)
    last = reports[-1] if len(reports) == limit else None
    return jsonify({
        "substation": current.settings.substation_id,
        "sessions": [record_json(report) for report in reports],
        "next_after": None if last is None else cursor_of(last),
    })


@record_blueprint.get("/sessions/export")
def export_records() -> Response:
    """Every finished record since ``since`` as CSV or JSON lines, streamed page by page."""
    current = substation()
    require_operator(current.settings.admin_token, "substation")
    kind = request.args.get("format", "jsonl")
    if kind not in EXPORT_FORMATS:
        raise ApiError(400, "invalid_query", f"format must be one of {', '.join(EXPORT_FORMATS)}, got {kind!r}.",
                       field="format")
    since = _since()
    ledger = current.ledger
    substation_id = current.settings.substation_id

    def pages() -> Iterator[list[SessionReport]]:
        after = None
        while True:
            reports = ledger.records(since, after, PAGE_MAX)
            if reports:
                yield reports
            if len(reports) < PAGE_MAX:
                return
            after = (reports[-1].ended_at, reports[-1].session.session_id)

    def as_csv() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for page in pages():
            for report in page:
                writer.writerow(record_json(report, substation_id))
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
        yield buffer.getvalue()

    def as_jsonl() -> Iterator[str]:
        for page in pages():
            yield "".join(json.dumps(record_json(report, substation_id)) + "\n" for report in page)

    if kind == "csv":
        response = Response(as_csv(), mimetype="text/csv")
    else:
        response = Response(as_jsonl(), mimetype="application/x-ndjson")
    response.headers["Content-Disposition"] = f'attachment; filename="{substation_id}-sessions.{kind}"'
    return response


@record_blueprint.get("/sessions/<session_id>")
def show_record(session_id: str) -> Response:
    """A session, active or finished: the same answer as ``GET /charge/<id>``."""
    current = substation()
    if not SESSION_ID_PATTERN.fullmatch(session_id):
        raise ApiError(400, "invalid_path", "A session id is 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'.",
                       field="session_id")
    try:
        report = current.ledger.session(session_id)
    except UnknownSession:
        raise ApiError(
            404, "session_not_found",
            f"No session {session_id!r} at {current.settings.substation_id}: it never started here, or its record "
            "is past SESSION_RECORDS_RETENTION_DAYS.",
            session_id=session_id,
        ) from None
    return jsonify(session_json(report))


def record_json(report: SessionReport, substation_id: str | None = None) -> dict[str, Any]:
    """A finished record: the session's answer without its power history (``GET /charge/<id>`` has it)."""
    body = session_json(report, substation_id)
    body.pop("history", None)
    return body


def cursor_of(report: SessionReport) -> str:
    # The end time at full precision and the id: the order of the pages, exactly.
    return f"{report.ended_at!r},{report.session.session_id}"


def _cursor(raw: str | None) -> tuple[float, str] | None:
    if raw is None:
        return None
    at, _, session_id = raw.partition(",")
    try:
        ended_at = float(at)
    except ValueError:
        ended_at = float("nan")
    if ended_at != ended_at or not SESSION_ID_PATTERN.fullmatch(session_id):
        raise ApiError(400, "invalid_query", f"after must be the next_after of a page read before, got {raw[:80]!r}.",
                       field="after")
    return ended_at, session_id


def _since() -> float | None:
    raw = request.args.get("since")
    if raw is None:
        return None
    try:
        return parse_time(raw[:64]).timestamp()
    except (ValueError, OverflowError):
        raise ApiError(400, "invalid_query", f"since must be an ISO 8601 time, e.g. {format_time(0.0)!r}; got "
                       f"{raw[:80]!r}.", field="since") from None


def _limit() -> int:
    raw = request.args.get("limit", str(PAGE_DEFAULT))
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw[:6]) <= PAGE_MAX or len(raw) > 6:
        raise ApiError(400, "invalid_query", f"limit must be a whole number from 1 to {PAGE_MAX}, got {raw[:80]!r}.",
                       field="limit")
    return int(raw)
