"""The yardstick for the end-to-end benchmark: three hops that do nothing but pass a charge request on.

Each hop is a Flask app under the services' own gunicorn settings, forwarding with
the services' own HTTP client (``gridcommon.httpclient``); the last one answers 201.
What the real stack costs beyond this chain is what its own work costs.
"""
from __future__ import annotations

import os

from flask import Flask, Response, jsonify, request

from gridcommon.httpclient import HttpClient


def create_app() -> Flask:
    app = Flask(__name__)
    next_url = os.environ.get("NEXT_URL", "")
    client = HttpClient("chain-hop", timeout=(1.0, 5.0))

    @app.post("/charge")
    def charge() -> Response | tuple[Response, int]:
        body = request.get_json()
        if next_url:
            answer = client.post(f"{next_url}/charge", json=body)
            return Response(answer.content, status=answer.status_code, mimetype="application/json")
        return jsonify(vehicle_id=body["vehicle_id"], status="charging"), 201

    @app.get("/health")
    def health() -> Response:
        return jsonify(status="ok")

    return app
