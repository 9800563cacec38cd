"""The yardstick for the end-to-end benchmark: three hops that do nothing but pass a charge request on.

Each hop is a Flask app under the services' own gunicorn settings (``gridcommon.gunicorn_conf``:
one worker, 16 threads, the same keep-alive), forwarding with what a straightforward
Flask service would use: a pooled keep-alive ``requests.Session`` with the services'
pool size and timeouts. The last hop answers 201. What the real stack costs beyond
this chain is what its own work (validation, allocation, durable state, logs, metrics,
authentication) costs, less what its leaner HTTP client saves.
"""
from __future__ import annotations

import os

import requests
from flask import Flask, Response, jsonify, request
from requests.adapters import HTTPAdapter

POOL_SIZE = 32
TIMEOUT_SECONDS = (1.0, 5.0)


def create_app() -> Flask:
    app = Flask(__name__)
    next_url = os.environ.get("NEXT_URL", "")
    session = requests.Session()
    session.mount("http://", HTTPAdapter(pool_connections=POOL_SIZE, pool_maxsize=POOL_SIZE, max_retries=0))

    @app.post("/charge")
    def charge() -> Response | tuple[Response, int]:
        body = request.get_json()
        if next_url:
            answer = session.post(f"{next_url}/charge", json=body, timeout=TIMEOUT_SECONDS)
            return Response(answer.content, status=answer.status_code, mimetype="application/json")
        return jsonify(vehicle_id=body["vehicle_id"], status="charging"), 201

    @app.get("/health")
    def health() -> Response:
        return jsonify(status="ok")

    return app
