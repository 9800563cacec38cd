"""The gateway's HTTP port: /health, /metrics, GET /stations and the operator's station registry.

aiohttp serves it in the gateway's own event loop: the registry and the live state it
shows are the ones the WebSocket side uses, with no copy or lock between two processes.
(websockets' ``process_request`` only sees GET handshakes, so it cannot take the
operator's PUT and DELETE.) Errors are JSON of the project's shape
``{"error": code, "message": what to do}``.
"""
from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from charge_point_gateway.gateway import Gateway
from charge_point_gateway.registry import StationSpecError, parse_station, station_id_problem

MAX_BODY_BYTES = 16 * 1024
# Registrations hashing a password at once, off the event loop: scrypt takes ~50 ms of a core each, and the
# loop serving the stations needs the other core of a small machine.
CONCURRENT_REGISTRATIONS = 1


def _error(status: int, error: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": error, "message": message, **extra}, status=status)


def create_http_app(gateway: Gateway) -> web.Application:
    admin_token = gateway.settings.admin_token
    hashing = asyncio.Semaphore(CONCURRENT_REGISTRATIONS)

    def operator_refusal(request: web.Request) -> web.Response | None:
        if not admin_token:
            return _error(403, "admin_disabled", "The gateway's operator API is disabled. Start it with "
                                                 "ADMIN_TOKEN set to enable it.")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), admin_token.encode()):
            response = _error(401, "unauthorized", "Missing or wrong operator token. Send the header "
                                                   "'Authorization: Bearer <ADMIN_TOKEN>'.")
            response.headers["WWW-Authenticate"] = 'Bearer realm="gateway operator"'
            return response
        return None

    def checked_id(request: web.Request) -> str | web.Response:
        station_id = request.match_info["station_id"]
        problem = station_id_problem(station_id)
        return _error(400, "invalid_station_id", problem, field="station_id") if problem else station_id

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": "charge-point-gateway"})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(gateway.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_stations(_: web.Request) -> web.Response:
        return web.json_response({"stations": gateway.stations_view()})

    async def show_station(request: web.Request) -> web.Response:
        station_id = checked_id(request)
        if isinstance(station_id, web.Response):
            return station_id
        for entry in gateway.stations_view():
            if entry["station_id"] == station_id:
                return web.json_response(entry)
        return _error(404, "station_not_found", f"No station {station_id!r} is registered. GET /stations lists them.")

    async def put_station(request: web.Request) -> web.Response:
        refusal = operator_refusal(request)
        if refusal:
            return refusal
        station_id = checked_id(request)
        if isinstance(station_id, web.Response):
            return station_id
        raw = await request.content.read(MAX_BODY_BYTES + 1)
        if len(raw) > MAX_BODY_BYTES:
            return _error(413, "body_too_large", f"A station's description is at most {MAX_BODY_BYTES} bytes.")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return _error(400, "invalid_json", "The body must be a JSON object describing the station.")
        try:
            async with hashing:
                station = await asyncio.to_thread(parse_station, station_id, body)
        except StationSpecError as exc:
            return _error(400, "invalid_station", str(exc), field=exc.field)
        created = gateway.put_station(station)
        return web.json_response(station.public(), status=201 if created else 200)

    async def delete_station(request: web.Request) -> web.Response:
        refusal = operator_refusal(request)
        if refusal:
            return refusal
        station_id = checked_id(request)
        if isinstance(station_id, web.Response):
            return station_id
        if not gateway.delete_station(station_id):
            return _error(404, "station_not_found", f"No station {station_id!r} is registered.")
        return web.json_response({"deleted": station_id})

    @web.middleware
    async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            return _error(exc.status, exc.reason.lower().replace(" ", "_"),
                          f"{exc.reason}: {request.method} {request.path} is not part of the gateway's API "
                          "(GET /health, /metrics, /stations; PUT, GET, DELETE /stations/<id>).")

    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stations", list_stations)
    app.router.add_get("/stations/{station_id}", show_station)
    app.router.add_put("/stations/{station_id}", put_station)
    app.router.add_delete("/stations/{station_id}", delete_station)
    return app
