"""Every setting of the load balancer, read once from the environment.

| Variable                       | Default        | Meaning                                                        |
| ------------------------------ | -------------- | -------------------------------------------------------------- |
| SUBSTATIONS                    | (none)         | Comma-separated base URLs of the substations to balance over.  |
| POLL_INTERVAL_SECONDS          | 5              | Pause between two polls of every substation's /metrics.        |
| POLL_TIMEOUT_SECONDS           | 2              | Read timeout of one poll.                                      |
| CONNECT_TIMEOUT_SECONDS        | 1              | Connect timeout of every outgoing call.                        |
| FORWARD_TIMEOUT_SECONDS        | 5              | Read timeout of a forwarded charge request.                    |
| ROUTE_DEADLINE_SECONDS         | 8              | Most time spent routing one charge request, retries included;  |
|                                |                | keep it below the charge API's REQUEST_TIMEOUT_SECONDS (10).   |
| ROUTING_POLICY                 | least_loaded   | least_loaded, least_connections, round_robin, random, power_of_two. |
| REFRESH_MIN_INTERVAL_SECONDS   | 0.5            | Least time between two on-demand refreshes of the view.        |
| FAILURE_THRESHOLD              | 1              | Failed polls or forwards in a row that mark a substation down. |
| ADMIN_TOKEN                    | (empty)        | Bearer token of the admin API; empty disables the admin API.   |
| MAX_AMOUNT_KW                  | 350            | Largest charge request accepted, in kW.                        |
| MAX_SESSION_SECONDS            | 3600           | Longest duration_seconds accepted.                             |
| LOG_LEVEL                      | INFO           | DEBUG, INFO, WARNING, ERROR or CRITICAL (any case).            |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from gridcommon.settings import SettingsError, env_choice, env_float, env_int, env_list, env_str, env_log_level
from gridcommon.validation import DEFAULT_MAX_AMOUNT_KW, DEFAULT_MAX_DURATION_SECONDS
from load_balancer.policies import DEFAULT_POLICY, POLICY_NAMES
from load_balancer.registry import normalise_substation_url
from load_balancer.router import shortest_forward_seconds


@dataclass(frozen=True)
class Settings:
    substations: tuple[str, ...] = ()
    poll_interval_seconds: float = 5.0
    poll_timeout_seconds: float = 2.0
    connect_timeout_seconds: float = 1.0
    forward_timeout_seconds: float = 5.0
    route_deadline_seconds: float = 8.0
    routing_policy: str = DEFAULT_POLICY
    refresh_min_interval_seconds: float = 0.5
    failure_threshold: int = 1
    admin_token: str = ""
    max_amount_kw: float = DEFAULT_MAX_AMOUNT_KW
    max_session_seconds: float = DEFAULT_MAX_DURATION_SECONDS
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Settings":
        connect_timeout = env_float(env, "CONNECT_TIMEOUT_SECONDS", 1.0, minimum=0.05)
        forward_timeout = env_float(env, "FORWARD_TIMEOUT_SECONDS", 5.0, minimum=0.05)
        return cls(
            substations=_substation_urls(env),
            poll_interval_seconds=env_float(env, "POLL_INTERVAL_SECONDS", 5.0, minimum=0.05),
            poll_timeout_seconds=env_float(env, "POLL_TIMEOUT_SECONDS", 2.0, minimum=0.05),
            connect_timeout_seconds=connect_timeout,
            forward_timeout_seconds=forward_timeout,
            route_deadline_seconds=_route_deadline(env, connect_timeout, forward_timeout),
            routing_policy=env_choice(env, "ROUTING_POLICY", DEFAULT_POLICY, POLICY_NAMES),
            refresh_min_interval_seconds=env_float(env, "REFRESH_MIN_INTERVAL_SECONDS", 0.5, minimum=0.0),
            failure_threshold=env_int(env, "FAILURE_THRESHOLD", 1, minimum=1),
            admin_token=env_str(env, "ADMIN_TOKEN", ""),
            max_amount_kw=env_float(env, "MAX_AMOUNT_KW", DEFAULT_MAX_AMOUNT_KW, minimum=0.001),
            max_session_seconds=env_float(
                env, "MAX_SESSION_SECONDS", DEFAULT_MAX_DURATION_SECONDS, minimum=0.001
            ),
            log_level=env_log_level(env),
        )


def _route_deadline(env: Mapping[str, str], connect_timeout: float, forward_timeout: float) -> float:
    deadline = env_float(env, "ROUTE_DEADLINE_SECONDS", 8.0, minimum=0.05)
    shortest = shortest_forward_seconds(connect_timeout, forward_timeout)
    if deadline < shortest:
        raise SettingsError(
            f"ROUTE_DEADLINE_SECONDS ({deadline:g}) leaves no time for a single forward: give it at least "
            f"{shortest:g} s (CONNECT_TIMEOUT_SECONDS plus a moment for the answer)"
        )
    return deadline


def _substation_urls(env: Mapping[str, str]) -> tuple[str, ...]:
    urls: list[str] = []
    for raw in env_list(env, "SUBSTATIONS"):
        try:
            url = normalise_substation_url(raw)
        except ValueError as exc:
            raise SettingsError(f"SUBSTATIONS: {exc}") from None
        if url not in urls:
            urls.append(url)
    return tuple(urls)
