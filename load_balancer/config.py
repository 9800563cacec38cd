"""Every setting of the load balancer, read once from the environment.

| Variable                       | Default        | Meaning                                                        |
| ------------------------------ | -------------- | -------------------------------------------------------------- |
| SUBSTATIONS                    | (none)         | Comma-separated base URLs of the substations to balance over.  |
| SUBSTATION_URL_ALLOW           | the hosts of   | Hosts POST /substations may register, comma-separated: names   |
|                                | SUBSTATIONS,   | with `*` for any run of letters, digits, '-', '_' within one   |
|                                | 127.0.0.1,     | label (`substation_*`), IP addresses (`127.0.0.1`, `[::1]`) or |
|                                | localhost      | CIDRs (`10.0.0.0/8`); a name or address may end in `:port`.    |
|                                |                | Names match only names, addresses and CIDRs only URLs written  |
|                                |                | with an IP (nothing is resolved). A value replaces the default.|
| MAX_SUBSTATIONS                | 64             | Most substations tracked, configured and registered together.  |
| MAX_METRICS_BYTES              | 1048576        | Largest /metrics page a poll reads (1 MiB); a larger one fails.|
| POLL_INTERVAL_SECONDS          | 5              | Pause between two polls of every substation's /metrics.        |
| POLL_TIMEOUT_SECONDS           | 2              | Read timeout of one poll. A whole poll, connecting included,   |
|                                |                | ends within CONNECT_TIMEOUT_SECONDS + POLL_TIMEOUT_SECONDS,    |
|                                |                | however slowly the substation sends.                           |
| CONNECT_TIMEOUT_SECONDS        | 1              | Connect timeout of every outgoing call.                        |
| FORWARD_TIMEOUT_SECONDS        | 5              | Longest read timeout of a forwarded charge request; the one    |
|                                |                | used is 4x the recent forwards' p99, at least                  |
|                                |                | MIN_FORWARD_TIMEOUT_SECONDS.                                   |
| MIN_FORWARD_TIMEOUT_SECONDS    | 1              | Shortest read timeout of a forward.                            |
| HEDGE_FORWARDS                 | true           | Ask the next candidate too when a forward is unanswered after  |
|                                |                | 2x the recent p95 (at least HEDGE_MIN_DELAY_SECONDS); the first|
|                                |                | admission is used, the other one stopped.                      |
| HEDGE_MIN_DELAY_SECONDS        | 0.05           | Least time a forward waits before it is hedged.                |
| EJECTION_BASE_SECONDS          | 1              | How long a substation that timed out or answered 5xx is left   |
|                                |                | out; doubled for each ejection soon after the last one.        |
| EJECTION_MAX_SECONDS           | 30             | Longest ejection.                                              |
| ROUTE_DEADLINE_SECONDS         | 8              | Most time spent routing one charge request, retries included;  |
|                                |                | keep it below the charge API's REQUEST_TIMEOUT_SECONDS (10).   |
| ROUTING_POLICY                 | fair_share     | fair_share, least_loaded, least_connections, round_robin, random, power_of_two. |
| REFRESH_MIN_INTERVAL_SECONDS   | 0.5            | Least time between two on-demand refreshes of the view.        |
| FAILURE_THRESHOLD              | 1              | Failed polls or forwards in a row that mark a substation down. |
| ADMIN_TOKEN                    | (empty)        | Bearer token of the admin API and of POST and DELETE           |
|                                |                | /substations; empty disables all of them (403).                |
| MAX_AMOUNT_KW                  | 350            | Largest charge request accepted, in kW.                        |
| MAX_SESSION_SECONDS            | 3600           | Longest duration_seconds accepted.                             |
| LOG_LEVEL                      | INFO           | DEBUG, INFO, WARNING, ERROR or CRITICAL (any case).            |
| ACCESS_LOG_BURST               | 20             | Requests a second whose log lines are all written.             |
| ACCESS_LOG_SAMPLE              | 100            | Past the burst, one request in this many is logged.            |

`HOST` and `PORT` are where the balancer listens, behind its edge (nginx): the edge's timeouts and
caps (`EDGE_*`) are in gridcommon/edge.py, `THREADS` is granian's (gridcommon/serve.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from gridcommon.settings import SettingsError, env_bool, env_choice, env_float, env_int, env_list, env_str, env_log_level, env_log_sampling
from gridcommon.log_sampling import LogSampling
from gridcommon.validation import DEFAULT_MAX_AMOUNT_KW, DEFAULT_MAX_DURATION_SECONDS
from load_balancer.policies import DEFAULT_POLICY, POLICY_NAMES
from load_balancer.poller import DEFAULT_MAX_METRICS_BYTES
from load_balancer.registry import UrlAllowList, normalise_substation_url
from load_balancer.router import shortest_forward_seconds
from load_balancer.tail import TailSettings

DEFAULT_MAX_SUBSTATIONS = 64


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
    log_sampling: LogSampling = field(default_factory=LogSampling)
    # None: the default, worked out from ``substations`` (see url_allow_list()).
    substation_url_allow: tuple[str, ...] | None = None
    max_substations: int = DEFAULT_MAX_SUBSTATIONS
    max_metrics_bytes: int = DEFAULT_MAX_METRICS_BYTES
    min_forward_timeout_seconds: float = 1.0
    hedge_forwards: bool = True
    hedge_min_delay_seconds: float = 0.05
    ejection_base_seconds: float = 1.0
    ejection_max_seconds: float = 30.0

    def tail_settings(self) -> TailSettings:
        return TailSettings(
            max_timeout_seconds=self.forward_timeout_seconds,
            min_timeout_seconds=min(self.min_forward_timeout_seconds, self.forward_timeout_seconds),
            hedging=self.hedge_forwards,
            min_hedge_delay_seconds=self.hedge_min_delay_seconds,
        )

    def url_allow_list(self) -> UrlAllowList:
        """SUBSTATION_URL_ALLOW, or by default the configured substations' hosts, 127.0.0.1 and localhost."""
        if self.substation_url_allow is None:
            return UrlAllowList.default_for(self.substations)
        return UrlAllowList.parse(self.substation_url_allow)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Settings":
        connect_timeout = env_float(env, "CONNECT_TIMEOUT_SECONDS", 1.0, minimum=0.05)
        forward_timeout = env_float(env, "FORWARD_TIMEOUT_SECONDS", 5.0, minimum=0.05)
        substations = _substation_urls(env)
        max_substations = env_int(env, "MAX_SUBSTATIONS", DEFAULT_MAX_SUBSTATIONS, minimum=1, maximum=4096)
        if len(substations) > max_substations:
            raise SettingsError(
                f"SUBSTATIONS lists {len(substations)} substations but MAX_SUBSTATIONS is {max_substations}; "
                "raise MAX_SUBSTATIONS or list fewer"
            )
        return cls(
            substations=substations,
            substation_url_allow=_url_allow(env),
            max_substations=max_substations,
            max_metrics_bytes=env_int(
                env, "MAX_METRICS_BYTES", DEFAULT_MAX_METRICS_BYTES, minimum=1024, maximum=64 * 1024 * 1024
            ),
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
            log_sampling=env_log_sampling(env),
            min_forward_timeout_seconds=env_float(env, "MIN_FORWARD_TIMEOUT_SECONDS", 1.0, minimum=0.01),
            hedge_forwards=env_bool(env, "HEDGE_FORWARDS", True),
            hedge_min_delay_seconds=env_float(env, "HEDGE_MIN_DELAY_SECONDS", 0.05, minimum=0.001),
            ejection_base_seconds=env_float(env, "EJECTION_BASE_SECONDS", 1.0, minimum=0.0),
            ejection_max_seconds=env_float(env, "EJECTION_MAX_SECONDS", 30.0, minimum=0.0),
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


def _url_allow(env: Mapping[str, str]) -> tuple[str, ...] | None:
    entries = env_list(env, "SUBSTATION_URL_ALLOW")
    if not entries:
        return None
    try:
        UrlAllowList.parse(entries)
    except ValueError as exc:
        raise SettingsError(f"SUBSTATION_URL_ALLOW: {exc}") from None
    return entries
