"""The grid's picture for the operator console, read from the services' own public APIs.

No web framework here: :class:`GridReader` asks every balancer (``GET /status`` and a few
``/metrics`` families), every substation the balancers know (``GET /sessions``, ``/status``,
``/limit``, ``/peer-balancing``), the OCPP gateway (``GET /stations``) and Prometheus
(``/api/v1/alerts``) when their URLs are set, all at once and each with a timeout, and
folds the answers into one JSON-ready snapshot. A source that does not answer shows as
such in the snapshot; it never stops the others from showing.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from gridcommon.httpclient import HttpClient
from gridcommon.promtext import families_query, parse_metrics

log = logging.getLogger("charge.console")

# A substation whose last good poll is older than this is shown greyed out (Tinkerforge WARP's 10 s).
STALE_SECONDS = 10.0
# The window "recent" routing figures are counted over.
RECENT_SECONDS = 60.0
# A substation's session list (its largest answer) is read again when its state_version moves, which
# every change of anyone's allocation does, and otherwise this often, for the energy figures.
SESSIONS_EVERY_SECONDS = 5.0
# Prometheus's alerts change on its own evaluation interval (15 s by default): asked this often at most.
ALERTS_EVERY_SECONDS = 5.0
# Most alerts shown, newest first; most stations and sessions a snapshot carries.
MAX_ALERTS = 50
MAX_ROWS = 5000
# Below this difference two kW figures are the same (the ledger rounds to the watt).
KW_EPSILON = 1e-3
# By sample name: prometheus-client's name[] filter matches a counter's samples, which end in _total.
BALANCER_FAMILIES = frozenset({"load_balancer_requests_total", "routing_decisions_total", "forward_failures_total",
                               "load_balancer_hedges_total"})


@dataclass(frozen=True)
class Sources:
    """Where the console reads from; ``admin_token`` goes to the operator endpoints only."""

    balancer_urls: tuple[str, ...]
    gateway_url: str | None = None
    prometheus_url: str | None = None
    admin_token: str = ""


@dataclass(frozen=True)
class Answer:
    """One source's JSON (or None) and, when it failed, why, in words for the operator."""

    body: Any = None
    error: str | None = None


def limit_source_of(limit: dict[str, Any] | None, status: dict[str, Any]) -> str:
    """Which of operator, capacity, generation, storage or peers sets the substation's limit now."""
    source = (limit or {}).get("source") or status.get("limit_source")
    if source == "operator":
        return "operator"
    parts = (limit or {}).get("parts") or {}
    capacity = float(parts.get("capacity_kw") or 0.0)
    generation = float(parts.get("generation_kw") or 0.0)
    storage = float(parts.get("storage_kw") or 0.0)
    peers = float(parts.get("peer_kw") or 0.0)
    if abs(peers) > KW_EPSILON:
        return "peers"
    if generation > KW_EPSILON or storage > KW_EPSILON:
        return "generation" if generation >= storage else "storage"
    if parts or capacity:
        return "capacity"
    return source or "unknown"


def what_limits(session: dict[str, Any], substation: dict[str, Any], rejected_profile: bool) -> tuple[str, str]:
    """A code and a sentence saying what holds this session's power where it is (openWB's hint)."""
    state = session.get("state")
    allocated = float(session.get("allocated_kw") or 0.0)
    amount = float(session.get("amount") or 0.0)
    minimum = float(session.get("minimum_kw") or 0.0)
    if rejected_profile:
        return "profile_rejected", "its station rejected the charging profile"
    if state == "suspended":
        return "suspended", "suspended: the limit leaves no room for its minimum"
    if allocated >= amount - KW_EPSILON:
        return "own_maximum", "its own maximum: it gets all it asks"
    if minimum > 0 and allocated <= minimum + KW_EPSILON:
        return "minimum_only", "only its minimum: the limit is shared out"
    limit_kw = substation.get("limit_kw")
    where = f"{substation.get('id')}'s limit" + ("" if limit_kw is None else f" of {limit_kw:g} kW")
    if substation.get("limit_source") == "operator":
        return "operator_limit", f"an operator limit: {where}"
    return "substation_limit", f"the substation: {where} ({substation.get('limit_source')})"


class GridReader:
    """Takes snapshots of the whole grid; one at a time (the caller shares them out)."""

    def __init__(self, sources: Sources, http: HttpClient, queue_length: Callable[[], int],
                 clock: Callable[[], float] = time.time,
                 client_keys: Callable[[], list[dict[str, Any]]] = list) -> None:
        self.sources = sources
        self._http = http
        self._queue_length = queue_length
        # What each active client key holds and was refused (charge_request_service.key_access), read in-process.
        self._client_keys = client_keys
        self._clock = clock
        # One thread per source at most; the snapshot takes as long as the slowest answer.
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="console-read")
        # Balancer counters of the last RECENT_SECONDS, to tell what they did lately: (time, url, counters).
        self._counter_history: deque[tuple[float, dict[str, dict[str, float]]]] = deque(maxlen=512)
        self._last_good: dict[str, float] = {}
        # Per substation: the state_version and time of the session list kept, and the list.
        self._sessions: dict[str, tuple[int | None, float, Answer]] = {}
        self._alerts: Answer = Answer()
        self._alerts_at = 0.0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _get(self, url: str, operator: bool = False) -> Answer:
        headers = {"Authorization": f"Bearer {self.sources.admin_token}"} if operator else None
        try:
            response = self._http.get(url, headers=headers)
        except Exception as exc:  # noqa: BLE001 - any failure of one source is shown, never raised
            return Answer(error=f"no answer ({type(exc).__name__})")
        if response.status_code != 200:
            return Answer(error=f"answered HTTP {response.status_code}")
        try:
            if "/metrics" in url:
                return Answer(body=response.text)
            return Answer(body=response.json())
        except ValueError:
            return Answer(error="answered something that is not JSON")

    def snapshot(self) -> dict[str, Any]:
        """The grid now: one dict, ready for JSON."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        started = self._clock()
        balancer_urls = self.sources.balancer_urls
        status_calls = {url: self._pool.submit(self._get, f"{url}/status") for url in balancer_urls}
        metric_calls = {
            url: self._pool.submit(self._get, f"{url}/metrics?{families_query(BALANCER_FAMILIES)}")
            for url in balancer_urls
        }
        stations_call = (self._pool.submit(self._get, f"{self.sources.gateway_url}/stations")
                         if self.sources.gateway_url else None)
        alerts_call = None
        if self.sources.prometheus_url and started - self._alerts_at >= ALERTS_EVERY_SECONDS:
            alerts_call = self._pool.submit(self._get, f"{self.sources.prometheus_url}/api/v1/alerts")
        statuses = {url: call.result() for url, call in status_calls.items()}
        # Every substation any balancer knows, with the freshest poll any balancer made of it.
        known: dict[str, dict[str, Any]] = {}
        for answer in statuses.values():
            for entry in (answer.body or {}).get("substations", []) if isinstance(answer.body, dict) else []:
                sid, age = entry.get("id"), entry.get("last_poll_age_seconds")
                seen = known.setdefault(sid, {"url": entry.get("url"), "up": False, "poll_age": None})
                seen["up"] = seen["up"] or bool(entry.get("up"))
                if age is not None and (seen["poll_age"] is None or age < seen["poll_age"]):
                    seen["poll_age"] = age
        calls = {
            sid: {part: self._pool.submit(self._get, f"{seen['url']}{path}")
                  for part, path in (("status", "/status"), ("limit", "/limit"), ("peers", "/peer-balancing"))}
            for sid, seen in known.items() if seen["url"]
        }
        for table in (self._sessions, self._last_good):  # forget substations no balancer knows any more
            for gone in set(table) - set(calls):
                del table[gone]
        for sid in calls:
            calls[sid]["sessions"] = self._pool.submit(self._session_list, sid, known[sid]["url"],
                                                       calls[sid]["status"], started)
        stations = stations_call.result() if stations_call else None
        if alerts_call is not None:
            self._alerts, self._alerts_at = alerts_call.result(), started
        rejected = self._rejected_sessions(stations)
        station_of = self._station_of_session(stations)
        substations, sessions = [], []
        for sid in sorted(calls):
            answers = {part: call.result() for part, call in calls[sid].items()}
            card = self._substation_card(sid, known[sid], answers, started)
            substations.append(card)
            for session in (answers["sessions"].body or {}).get("sessions", [])[:MAX_ROWS]:
                code, reason = what_limits(session, card, session.get("session_id") in rejected)
                sessions.append({
                    "session_id": session.get("session_id"),
                    "vehicle_id": session.get("vehicle_id"),
                    "station_id": station_of.get(session.get("session_id")),
                    "substation": sid,
                    "allocated_kw": session.get("allocated_kw"),
                    "amount_kw": session.get("amount"),
                    "minimum_kw": session.get("minimum_kw"),
                    "energy_kwh": session.get("energy_kwh"),
                    "state": session.get("state"),
                    "limited_by": code,
                    "limited_reason": reason,
                })
        metrics = {url: call.result() for url, call in metric_calls.items()}
        return {
            "taken_at": started,
            "took_seconds": round(self._clock() - started, 3),
            "grid": self._grid(substations),
            "substations": substations,
            "sessions": sessions[:MAX_ROWS],
            "stations": self._stations(stations),
            "alerts": self._alerts_json(),
            "client_keys": self._client_keys()[:MAX_ROWS],
            "balancers": self._balancers(statuses, metrics, started),
        }

    def _session_list(self, sid: str, url: str, status_call: Any, now: float) -> Answer:
        """The substation's sessions: the list kept, unless its state_version moved or it is old."""
        status = status_call.result()
        version = status.body.get("state_version") if isinstance(status.body, dict) else None
        kept = self._sessions.get(sid)
        if (kept is not None and version is not None and kept[0] == version
                and now - kept[1] < SESSIONS_EVERY_SECONDS and kept[2].error is None):
            return kept[2]
        answer = self._get(f"{url}/sessions")
        self._sessions[sid] = (version, now, answer)
        return answer

    def _substation_card(self, sid: str, seen: dict[str, Any], answers: dict[str, Answer],
                         now: float) -> dict[str, Any]:
        status = answers["status"].body if isinstance(answers["status"].body, dict) else {}
        limit = answers["limit"].body if isinstance(answers["limit"].body, dict) else None
        peers = answers["peers"].body if isinstance(answers["peers"].body, dict) else None
        errors = {part: answer.error for part, answer in answers.items() if answer.error and part != "peers"}
        if not errors:
            self._last_good[sid] = now
        last_good = self._last_good.get(sid)
        read_age = None if last_good is None else round(now - last_good, 3)
        poll_age = seen["poll_age"]
        stale = bool(errors) or read_age is None or (poll_age is not None and poll_age > STALE_SECONDS)
        flows_out = flows_in = 0.0
        flows = []
        for peer in (peers or {}).get("peers", []) if peers and peers.get("enabled") else []:
            flow = float(peer.get("flow_kw") or 0.0)
            flows.append({"substation": peer.get("substation"), "flow_kw": flow, "state": peer.get("state")})
            flows_out += max(flow, 0.0)
            flows_in += max(-flow, 0.0)
        session_states: dict[str, int] = {}
        for session in (answers["sessions"].body or {}).get("sessions", []) if answers["sessions"].body else []:
            state = str(session.get("state"))
            session_states[state] = session_states.get(state, 0) + 1
        return {
            "id": sid,
            "url": seen["url"],
            "up": seen["up"] and not errors,
            "errors": errors,
            "stale": stale,
            "poll_age_seconds": poll_age,
            "read_age_seconds": read_age,
            "limit_kw": status.get("capacity"),
            "limit_source": limit_source_of(limit, status),
            "operator_limit_kw": (limit or {}).get("operator_limit_kw"),
            "parts": (limit or {}).get("parts"),
            "allocated_kw": status.get("load"),
            "requested_kw": status.get("requested_load"),
            "fair_share_kw": status.get("fair_share_kw"),
            "policy": status.get("allocation_policy"),
            "sessions_by_state": session_states,
            "curtailed": status.get("curtailed_sessions"),
            "peering": None if not peers or not peers.get("enabled") else {
                "state": peers.get("state"), "leader": peers.get("leader"),
                "flows": flows, "out_kw": round(flows_out, 3), "in_kw": round(flows_in, 3),
            },
        }

    def _grid(self, substations: list[dict[str, Any]]) -> dict[str, Any]:
        def total(key: str) -> float:
            return round(sum(float(card.get(key) or 0.0) for card in substations), 3)

        limit, allocated = total("limit_kw"), total("allocated_kw")
        return {
            "limit_kw": limit,
            "allocated_kw": allocated,
            "requested_kw": total("requested_kw"),
            "headroom_kw": round(max(limit - allocated, 0.0), 3),
            "substations_up": sum(1 for card in substations if card["up"]),
            "substations": len(substations),
            "queued_requests": self._queue_length(),
        }

    @staticmethod
    def _station_of_session(stations: Answer | None) -> dict[str, str]:
        found = {}
        for station in (stations.body or {}).get("stations", []) if stations and stations.body else []:
            for transaction in station.get("transactions", []):
                if transaction.get("session_id"):
                    found[transaction["session_id"]] = station.get("station_id")
        return found

    @staticmethod
    def _rejected_sessions(stations: Answer | None) -> set[str]:
        return {
            transaction.get("session_id")
            for station in ((stations.body or {}).get("stations", []) if stations and stations.body else [])
            for transaction in station.get("transactions", [])
            if transaction.get("profile_rejected")
        }

    def _stations(self, stations: Answer | None) -> dict[str, Any]:
        if stations is None:
            return {"configured": False, "error": None, "stations": []}
        rows = []
        for station in (stations.body or {}).get("stations", [])[:MAX_ROWS] if stations.body else []:
            transactions = station.get("transactions", [])
            measured = [t.get("measured_kw") for t in transactions if t.get("measured_kw") is not None]
            allocated = [t.get("allocated_kw") for t in transactions if t.get("allocated_kw") is not None]
            rows.append({
                "station_id": station.get("station_id"),
                "online": bool(station.get("connected")),
                "charging": any(t.get("admitted") for t in transactions),
                "last_seen": station.get("last_seen"),
                "last_state": station.get("last_state"),
                "measured_kw": round(sum(measured), 3) if measured else None,
                "allocated_kw": round(sum(allocated), 3) if allocated else None,
            })
        return {"configured": True, "error": stations.error, "stations": rows}

    def _alerts_json(self) -> dict[str, Any]:
        if not self.sources.prometheus_url:
            return {"configured": False, "error": None, "alerts": []}
        body = self._alerts.body if isinstance(self._alerts.body, dict) else {}
        alerts = (body.get("data") or {}).get("alerts", [])
        alerts = sorted(alerts, key=lambda alert: str(alert.get("activeAt")), reverse=True)[:MAX_ALERTS]
        return {
            "configured": True,
            "error": self._alerts.error,
            "alerts": [{
                "name": (alert.get("labels") or {}).get("alertname"),
                "state": alert.get("state"),
                "severity": (alert.get("labels") or {}).get("severity"),
                "summary": (alert.get("annotations") or {}).get("summary"),
                "active_at": alert.get("activeAt"),
            } for alert in alerts],
        }

    def _balancers(self, statuses: dict[str, Answer], metrics: dict[str, Answer],
                   now: float) -> list[dict[str, Any]]:
        counters: dict[str, dict[str, float]] = {}
        for url, answer in metrics.items():
            if answer.body is None:
                continue
            try:
                scrape = parse_metrics(answer.body, BALANCER_FAMILIES)
            except ValueError:
                continue
            figures: dict[str, float] = {}
            for name, samples in scrape.samples.items():
                if not name.endswith("_total"):
                    continue
                for labels, value in samples:
                    label = labels.get("outcome") or labels.get("substation") or ""
                    figures[f"{name.removesuffix('_total')}:{label}"] = value
            counters[url] = figures
        self._counter_history.append((now, counters))
        while self._counter_history and now - self._counter_history[0][0] > RECENT_SECONDS:
            self._counter_history.popleft()
        earliest = self._counter_history[0][1]
        entries = []
        for url, answer in statuses.items():
            now_figures, then = counters.get(url, {}), earliest.get(url, {})
            # A balancer restarted since counts from zero again: what it counted since is all there is.
            recent = {key: round(value - then.get(key, 0.0) if value >= then.get(key, 0.0) else value)
                      for key, value in now_figures.items()}
            status = answer.body if isinstance(answer.body, dict) else {}
            entries.append({
                "url": url,
                "up": answer.error is None,
                "error": answer.error,
                "policy": status.get("policy"),
                "routed": _sum(now_figures, "load_balancer_requests:routed"),
                "recent_routed": _sum(recent, "load_balancer_requests:routed"),
                "recent_by_substation": {key.split(":", 1)[1]: value for key, value in recent.items()
                                         if key.startswith("routing_decisions:")},
                "recent_hedges": _sum(recent, "load_balancer_hedges:sent"),
                "recent_hedges_won": _sum(recent, "load_balancer_hedges:hedge_won"),
                "recent_forward_failures": sum(value for key, value in recent.items()
                                               if key.startswith("forward_failures:")),
            })
        return entries


def _sum(figures: dict[str, float], key: str) -> int:
    return round(figures.get(key, 0.0))
