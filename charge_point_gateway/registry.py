"""The station registry: which stations may connect, and what each one can draw.

A station is known by its OCPP identity (the last part of its URL and its HTTP Basic
username). Each is wired to one substation and has connectors (1.6) or EVSEs (2.0.1),
a number of phases and a maximum current per phase. The password is taken once and
only its hash (``passwords``) is kept. Plain module: no web framework, no OCPP library.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gridcommon.settings import normalise_base_url
from charge_point_gateway.passwords import hash_password, password_problem

# OCPP's identity is a CiString48 without ':' (it is the Basic username). Kept to characters
# that need no escaping in a URL path, a log line or a metric label.
STATION_ID_MAX_LENGTH = 48
STATION_ID_PATTERN = re.compile(r"\A[A-Za-z0-9._-]{1,48}\Z")
MAX_CONNECTORS = 32
MAX_CURRENT_A = 500.0


class StationSpecError(ValueError):
    """A station's description is wrong; ``field`` names the part."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def station_id_problem(station_id: str) -> str | None:
    """Why ``station_id`` cannot be a station's identity, or None when it can."""
    if len(station_id) > STATION_ID_MAX_LENGTH:
        return f"a station id has at most {STATION_ID_MAX_LENGTH} characters, this one has {len(station_id)}"
    if ":" in station_id:
        return "a station id cannot contain ':' (it is the HTTP Basic username)"
    if not STATION_ID_PATTERN.match(station_id):
        return "a station id is 1 to 48 characters from A-Z, a-z, 0-9, '.', '_' and '-'"
    return None


@dataclass(frozen=True)
class Station:
    station_id: str
    substation_url: str
    connectors: int
    phases: int
    max_current_a: float
    password_hash: str

    def public(self) -> dict[str, Any]:
        """What the operator API shows: everything but the password hash."""
        return {
            "station_id": self.station_id,
            "substation_url": self.substation_url,
            "connectors": self.connectors,
            "phases": self.phases,
            "max_current_a": self.max_current_a,
        }


def parse_station(station_id: str, body: object) -> Station:
    """A station from its JSON description (operator API or deployment file); ``StationSpecError`` naming the field."""
    problem = station_id_problem(station_id)
    if problem:
        raise StationSpecError("station_id", problem)
    if not isinstance(body, dict):
        raise StationSpecError("body", "a station is a JSON object")
    unknown = set(body) - {"station_id", "substation_url", "connectors", "phases", "max_current_a", "password"}
    if unknown:
        raise StationSpecError(sorted(unknown)[0], f"unknown field(s): {', '.join(sorted(unknown))}")
    if "station_id" in body and body["station_id"] != station_id:
        raise StationSpecError("station_id", "station_id in the body differs from the one in the path")
    try:
        url = normalise_base_url(body.get("substation_url"), example="http://127.0.0.1:5011")
    except ValueError as exc:
        raise StationSpecError("substation_url", f"substation_url: {exc}") from None
    connectors = body.get("connectors", 1)
    if isinstance(connectors, bool) or not isinstance(connectors, int) or not 1 <= connectors <= MAX_CONNECTORS:
        raise StationSpecError("connectors", f"connectors must be a whole number from 1 to {MAX_CONNECTORS}")
    phases = body.get("phases", 3)
    if isinstance(phases, bool) or phases not in (1, 3):
        raise StationSpecError("phases", "phases must be 1 or 3")
    current = body.get("max_current_a")
    if isinstance(current, bool) or not isinstance(current, (int, float)) or not 6 <= current <= MAX_CURRENT_A:
        raise StationSpecError("max_current_a", f"max_current_a must be a number of amperes from 6 to {MAX_CURRENT_A:g}")
    problem = password_problem(body.get("password"))
    if problem:
        raise StationSpecError("password", problem)
    return Station(
        station_id=station_id,
        substation_url=url,
        connectors=connectors,
        phases=int(phases),
        max_current_a=float(current),
        password_hash=hash_password(body["password"]),
    )


def parse_deployment(document: object) -> list[Station]:
    """The stations of a deployment file ``{"stations": [{"station_id": ..., ...}, ...]}``."""
    if not isinstance(document, dict) or not isinstance(document.get("stations"), list):
        raise StationSpecError("stations", 'a deployment file is {"stations": [ {...}, ... ]}')
    stations = []
    for index, entry in enumerate(document["stations"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("station_id"), str):
            raise StationSpecError("station_id", f"stations[{index}] needs a station_id string")
        try:
            stations.append(parse_station(entry["station_id"], entry))
        except StationSpecError as exc:
            raise StationSpecError(exc.field, f"stations[{index}] ({entry['station_id']!r}): {exc}") from None
    return stations
