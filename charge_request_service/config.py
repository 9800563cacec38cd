"""Settings of the charge request service, read once from the environment.

| Variable                  | Default                 | Meaning                                                       |
|---------------------------|-------------------------|---------------------------------------------------------------|
| `LOAD_BALANCER_URL`       | `http://127.0.0.1:5002` | Base URLs of the load balancers, comma-separated: calls fail over from one to the next |
| `MAX_AMOUNT_KW`           | `350`                   | Largest `amount` (kW) a request may ask for                   |
| `MAX_SESSION_SECONDS`     | `3600`                  | Longest `duration_seconds` a request may ask for              |
| `CONNECT_TIMEOUT_SECONDS` | `1`                     | Time allowed to open a connection to the balancer             |
| `REQUEST_TIMEOUT_SECONDS` | `10`                    | Time allowed for the balancer to answer a forwarded call      |
| `HEALTH_TIMEOUT_SECONDS`  | `2`                     | Time allowed for the balancer's `/health` when `/status` asks |
| `MAX_QUEUED`              | `1000`                  | Most requests that may wait for power at once (`"wait": true`); past it, 503 `queue_full` |
| `QUEUE_TIMEOUT_SECONDS`   | `300`                   | Longest a request waits for power before it expires           |
| `QUEUE_RETRY_SECONDS`     | `1`                     | How often the request at the head of the queue is offered to the balancer while the grid is full |
| `ADMIN_TOKEN`             | (empty)                 | Operator token: lists every session (`GET /sessions`) and reads or stops any one, manages client keys (`/client-keys`); empty turns that off (403) |
| `PUBLIC_API_AUTH`         | `keys`; `open` on a loopback `HOST` | `keys`: `POST /charge` and `GET /status` need a client key (`Authorization: Bearer <key>` or `X-API-Key`) or the operator token, and each key's quotas hold; `open`: anyone may ask (a laptop demo), a request with a key is still held to it |
| `MAX_CLIENT_KEYS`         | `1000`                  | Most client keys active at once (each is a label of the per-key metrics); past it, creating one is refused (409) |
| `RATE_LIMIT_PER_VEHICLE`  | `2/second;30/minute`    | Charge requests one vehicle may send (the syntax of `limits` and Flask-Limiter, `;` between limits); set but empty turns it off |
| `RATE_LIMIT_PER_CLIENT`   | (empty)                 | Charge requests one client address may send; empty (off) because one charge-point backend may speak for thousands of vehicles |
| `RATE_LIMIT_STORAGE_URI`  | `bounded-memory://`     | Where the limits count: `bounded-memory://` (this process, at most 100,000 keys, nothing done between requests) or `redis://host:6379` (shared by several); limits' own `memory://` works too |
| `STATE_DIR`               | (empty)                 | Folder of the durable records (`charge_request_service.sqlite3`): sessions, queue, idempotency answers; empty keeps them in memory |
| `STATE_SYNC`              | `normal`                | `normal` survives a killed process; `full` also a power cut   |
| `DATABASE_URL`            | (empty)                 | A PostgreSQL database (`postgresql://user:password@host:5432/name`) for the records instead of `STATE_DIR`'s SQLite file, which several replicas may share; empty (unset) keeps the SQLite file |
| `FINISHED_RETENTION_DAYS` | `90`                    | How long a finished session's record is kept on disk (a client may still read how it ended) |
| `FINISHED_KEPT`           | `1000000`               | Most finished sessions kept on disk; past it, the oldest are forgotten first |
| `RECONCILE_SECONDS`       | `30`                    | How often sessions are checked against the substations (and at start) |
| `GATEWAY_URL`             | (empty)                 | Base URL of the OCPP gateway's HTTP port; the console's stations panel reads its `GET /stations` (empty: no panel data); one URL, a comma list is refused |
| `PROMETHEUS_URL`          | (empty)                 | Base URL of a Prometheus; the console shows its recent alerts (empty: none shown); one URL, a comma list is refused |
| `CONSOLE_MAX_STREAMS`     | `4`                     | Consoles that may follow the live stream at once: each holds a server thread; past it, 503 |
| `LOG_LEVEL`               | `info`                  | Python log level, shared with granian                         |
| `ACCESS_LOG_BURST`        | `20`                    | Requests a second whose log lines are all written             |
| `ACCESS_LOG_SAMPLE`       | `100`                   | Past the burst, one request in this many is logged (1: every one, 0: none); named, failed and slow requests always are |

`HOST` and `PORT` are where the service listens, behind its edge (nginx): the edge's timeouts and caps
(`EDGE_*`) are in gridcommon/edge.py, `THREADS` is granian's (gridcommon/serve.py).
"""
from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from limits import parse_many

from charge_request_service.database import is_postgres_url

from gridcommon.settings import (
    SettingsError,
    env_base_urls,
    env_choice,
    env_float,
    env_int,
    env_log_level,
    env_log_sampling,
    env_str,
)
from gridcommon.log_sampling import LogSampling
from gridcommon.validation import DEFAULT_MAX_AMOUNT_KW, DEFAULT_MAX_DURATION_SECONDS


@dataclass(frozen=True)
class Settings:
    load_balancer_url: str = "http://127.0.0.1:5002"
    max_amount_kw: float = DEFAULT_MAX_AMOUNT_KW
    max_session_seconds: float = DEFAULT_MAX_DURATION_SECONDS
    connect_timeout_seconds: float = 1.0
    request_timeout_seconds: float = 10.0
    health_timeout_seconds: float = 2.0
    max_queued: int = 1000
    queue_timeout_seconds: float = 300.0
    queue_retry_seconds: float = 1.0
    admin_token: str = ""
    public_api_auth: str = "keys"
    max_client_keys: int = 1000
    rate_limit_per_vehicle: str = "2/second;30/minute"
    rate_limit_per_client: str = ""
    rate_limit_storage_uri: str = "bounded-memory://"
    state_dir: str = ""
    state_full_sync: bool = False
    database_url: str = ""
    finished_retention_days: float = 90.0
    finished_kept: int = 1_000_000
    reconcile_seconds: float = 30.0
    gateway_url: str = ""
    prometheus_url: str = ""
    console_max_streams: int = 4
    log_level: str = "info"
    log_sampling: LogSampling = field(default_factory=LogSampling)

    @property
    def load_balancer_urls(self) -> tuple[str, ...]:
        return tuple(url.strip().rstrip("/") for url in self.load_balancer_url.split(",") if url.strip())

    @property
    def state_file(self) -> Path | None:
        return Path(self.state_dir) / "charge_request_service.sqlite3" if self.state_dir else None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Settings":
        """Read every setting; raises ``SettingsError`` naming the variable that is wrong."""
        return cls(
            load_balancer_url=",".join(env_base_urls(env, "LOAD_BALANCER_URL", cls.load_balancer_url))
            or cls.load_balancer_url,
            max_amount_kw=env_float(env, "MAX_AMOUNT_KW", cls.max_amount_kw, minimum=0.001),
            max_session_seconds=env_float(env, "MAX_SESSION_SECONDS", cls.max_session_seconds, minimum=1),
            connect_timeout_seconds=_timeout(env, "CONNECT_TIMEOUT_SECONDS", cls.connect_timeout_seconds),
            request_timeout_seconds=_timeout(env, "REQUEST_TIMEOUT_SECONDS", cls.request_timeout_seconds),
            health_timeout_seconds=_timeout(env, "HEALTH_TIMEOUT_SECONDS", cls.health_timeout_seconds),
            max_queued=env_int(env, "MAX_QUEUED", cls.max_queued, minimum=0, maximum=1_000_000),
            queue_timeout_seconds=env_float(env, "QUEUE_TIMEOUT_SECONDS", cls.queue_timeout_seconds, minimum=0.1),
            queue_retry_seconds=env_float(env, "QUEUE_RETRY_SECONDS", cls.queue_retry_seconds, minimum=0.05,
                                          maximum=60),
            admin_token=env_str(env, "ADMIN_TOKEN", ""),
            public_api_auth=env_choice(env, "PUBLIC_API_AUTH", _default_auth(env), ("keys", "open")),
            max_client_keys=env_int(env, "MAX_CLIENT_KEYS", cls.max_client_keys, minimum=1, maximum=100_000),
            rate_limit_per_vehicle=_rate_limit(env, "RATE_LIMIT_PER_VEHICLE", cls.rate_limit_per_vehicle),
            rate_limit_per_client=_rate_limit(env, "RATE_LIMIT_PER_CLIENT", cls.rate_limit_per_client),
            rate_limit_storage_uri=env_str(env, "RATE_LIMIT_STORAGE_URI", cls.rate_limit_storage_uri),
            state_dir=env_str(env, "STATE_DIR", ""),
            state_full_sync=env_choice(env, "STATE_SYNC", "normal", ("normal", "full")) == "full",
            database_url=_database_url(env),
            finished_retention_days=env_float(env, "FINISHED_RETENTION_DAYS", cls.finished_retention_days,
                                              minimum=0.001, maximum=36_500),
            finished_kept=env_int(env, "FINISHED_KEPT", cls.finished_kept, minimum=1, maximum=1_000_000_000),
            reconcile_seconds=env_float(env, "RECONCILE_SECONDS", cls.reconcile_seconds, minimum=0.1),
            gateway_url=_one_base_url(env, "GATEWAY_URL", "http://127.0.0.1:9001"),
            prometheus_url=_one_base_url(env, "PROMETHEUS_URL", "http://127.0.0.1:9090"),
            # Below granian's 16 threads (gridcommon/serve.py): streams must leave most of them to the charge API.
            console_max_streams=env_int(env, "CONSOLE_MAX_STREAMS", cls.console_max_streams, minimum=0, maximum=8),
            log_level=env_log_level(env),
            log_sampling=env_log_sampling(env),
        )


def _default_auth(env: Mapping[str, str]) -> str:
    """``open`` only where nobody but this machine can reach the API: a loopback ``HOST``."""
    host = env.get("HOST", "0.0.0.0").strip().strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return "open" if loopback else "keys"


def _database_url(env: Mapping[str, str]) -> str:
    url = env_str(env, "DATABASE_URL", "").strip()
    if url and not is_postgres_url(url):
        scheme = url.split("://", 1)[0] + "://" if "://" in url else "no scheme"
        raise SettingsError(
            f"DATABASE_URL must be a PostgreSQL URL such as postgresql://user:password@host:5432/name (got "
            f"{scheme}); leave it unset to keep the records in STATE_DIR's SQLite file"
        )
    return url


def _timeout(env: Mapping[str, str], name: str, default: float) -> float:
    return env_float(env, name, default, minimum=0.01, maximum=300)


def _one_base_url(env: Mapping[str, str], name: str, example: str) -> str:
    """One base URL, or empty when unset or empty; a list is refused rather than cut to its first."""
    urls = env_base_urls(env, name, example)
    if len(urls) > 1:
        raise SettingsError(f"{name} takes one base URL such as {example}; got {len(urls)} ({env[name]!r})")
    return urls[0] if urls else ""


def _rate_limit(env: Mapping[str, str], name: str, default: str) -> str:
    # Set but empty means "no limit", which is how a limit on by default is turned off.
    value = env[name].strip() if name in env else default
    if value:
        try:
            parse_many(value)
        except ValueError:
            raise SettingsError(
                f"{name} must be rate limits such as '2/second;30/minute' (or empty for none); got {value!r}"
            ) from None
    return value
