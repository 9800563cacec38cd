"""Peer-balancing settings of a substation, part of its ``Settings``.

| Variable                        | Default | Meaning                                                                  |
|---------------------------------|---------|--------------------------------------------------------------------------|
| `PEERS`                         | (empty) | Comma-separated base URLs of the peer substations; this substation's own `PUBLIC_URL` may be listed and is skipped. Empty: no peer balancing |
| `PEER_KEY`                      | (empty) | The group's secret, the same on every substation of the group: every peer message and membership poll is signed with it (HMAC-SHA256, see `auth.py`). At least 32 characters with at least 8 different ones, e.g. `python3 -c 'import secrets; print(secrets.token_hex(32))'`. Empty: peer balancing stays off even when `PEERS` is set |
| `PEER_CLOCK_TOLERANCE_SECONDS`  | `5`     | How far a peer's clock may be from this one's: older or newer signed timestamps are refused as replays, link epochs further ahead as implausible |
| `PEER_BALANCING_ENABLED`        | `true`  | FREEDM's `dgiEnable`: `false` computes and reports but migrates nothing  |
| `GENERATION_KW`                 | `0`     | Local generation, kW                                                     |
| `GENERATION_PROFILE`            | (empty) | `hour:kW,...` step profile over a day; replaces `GENERATION_KW` when set |
| `PROFILE_DAY_SECONDS`           | `86400` | Length of the profile's day (600 plays a day in ten minutes)             |
| `STORAGE_KW`                    | `0`     | Power the local storage supplies, kW                                     |
| `MIGRATION_STEP_KW`             | `2`     | Power moved per migration, and the hysteresis band of the states         |
| `PHASE_SECONDS`                 | `4`     | Length of a phase: one collected state, then rounds                      |
| `ROUND_SECONDS`                 | `0.4`   | Time between rounds inside a phase                                       |
| `DRAFT_REQUEST_TIMEOUT_SECONDS` | `0.15`  | How long a supplier collects Draft Age answers                           |
| `MEMBERSHIP_POLL_SECONDS`       | `1`     | How often each peer's `/metrics` is polled                               |
| `PEER_TIMEOUT_SECONDS`          | `0.5`   | Connect and read timeout of every call to a peer                         |
| `PEER_MISSED_POLLS`             | `2`     | Unanswered polls in a row after which a peer leaves the group            |
| `INVARIANT_CHECK`               | `false` | Stop migrations while the power imbalance (with unanswered offers) would pass `INVARIANT_LIMIT_KW` |
| `INVARIANT_LIMIT_KW`            | `5`     | Bound of the invariant check, kW (at least one step)                     |
| `MALICIOUS`                     | `false` | Drop every Draft Select silently (FREEDM's experiment flag)              |

The migration step follows FREEDM's documentation (2 kW); its code defaults to 1.
Every substation of a group must have the same `MIGRATION_STEP_KW`: a Draft
Select of more than the receiver's step is refused.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gridcommon.settings import SettingsError, env_bool, env_float, env_int, env_list, env_str
from substation_service.peering.machine import BalancingParams
from substation_service.peering.power import SECONDS_PER_DAY, LocalPower, parse_profile
from substation_service.peering.schedule import PhaseSchedule

# 32 hex digits are 16 random bytes; fewer characters are too few for an HMAC key anyone can reach.
MIN_PEER_KEY_CHARACTERS = 32
# A random 32-character key has far more; a repeated word ("changeme...") has fewer.
MIN_PEER_KEY_DISTINCT = 8
GENERATE_KEY_HINT = "python3 -c 'import secrets; print(secrets.token_hex(32))'"


@dataclass(frozen=True)
class PeeringSettings:
    peers: tuple[str, ...] = ()
    # repr=False: settings may be logged or shown in a traceback, the key never.
    peer_key: str = field(default="", repr=False)
    balancing: BalancingParams = field(default_factory=BalancingParams)
    power: LocalPower = field(default_factory=LocalPower)
    schedule: PhaseSchedule = field(default_factory=lambda: PhaseSchedule(phase_seconds=4.0, round_seconds=0.4))
    draft_request_timeout_seconds: float = 0.15
    membership_poll_seconds: float = 1.0
    peer_timeout_seconds: float = 0.5
    peer_missed_polls: int = 2

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "PeeringSettings":
        defaults = cls()
        return cls(
            peers=tuple(_peer_url(url) for url in env_list(env, "PEERS")),
            peer_key=_peer_key(env),
            balancing=_balancing(env, defaults.balancing),
            power=_power(env),
            schedule=_schedule(env, defaults.schedule),
            draft_request_timeout_seconds=_draft_request_timeout(env, defaults),
            membership_poll_seconds=env_float(
                env, "MEMBERSHIP_POLL_SECONDS", defaults.membership_poll_seconds, minimum=0.05
            ),
            peer_timeout_seconds=env_float(env, "PEER_TIMEOUT_SECONDS", defaults.peer_timeout_seconds, minimum=0.01),
            peer_missed_polls=env_int(env, "PEER_MISSED_POLLS", defaults.peer_missed_polls, minimum=1),
        )


def _peer_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise SettingsError(f"PEERS must list base URLs such as http://substation_2:5012; {url!r} is not one")
    return url.rstrip("/")


def _peer_key(env: Mapping[str, str]) -> str:
    key = env_str(env, "PEER_KEY", "")
    if not key:
        return ""
    if len(key) < MIN_PEER_KEY_CHARACTERS:
        raise SettingsError(
            f"PEER_KEY must be at least {MIN_PEER_KEY_CHARACTERS} characters, it has {len(key)}. Generate one with "
            f"{GENERATE_KEY_HINT} and give the same key to every substation of the group"
        )
    if len(set(key)) < MIN_PEER_KEY_DISTINCT:
        raise SettingsError(
            f"PEER_KEY has only {len(set(key))} different characters: that is a word or a pattern, not a random "
            f"key. Generate one with {GENERATE_KEY_HINT} and give the same key to every substation of the group"
        )
    return key


def _balancing(env: Mapping[str, str], defaults: BalancingParams) -> BalancingParams:
    step = env_float(env, "MIGRATION_STEP_KW", defaults.migration_step_kw, minimum=0.001)
    limit = env_float(env, "INVARIANT_LIMIT_KW", defaults.invariant_limit_kw, minimum=0)
    if limit < step:
        raise SettingsError(
            f"INVARIANT_LIMIT_KW ({limit:g}) must be at least MIGRATION_STEP_KW ({step:g}), or no migration could start"
        )
    return BalancingParams(
        migration_step_kw=step,
        enabled=env_bool(env, "PEER_BALANCING_ENABLED", defaults.enabled),
        malicious=env_bool(env, "MALICIOUS", defaults.malicious),
        invariant_check=env_bool(env, "INVARIANT_CHECK", defaults.invariant_check),
        invariant_limit_kw=limit,
        clock_tolerance_seconds=env_float(
            env, "PEER_CLOCK_TOLERANCE_SECONDS", defaults.clock_tolerance_seconds, minimum=0.1, maximum=300
        ),
    )


def _power(env: Mapping[str, str]) -> LocalPower:
    day_seconds = env_float(env, "PROFILE_DAY_SECONDS", SECONDS_PER_DAY, minimum=1)
    profile_text = env_str(env, "GENERATION_PROFILE", "")
    return LocalPower(
        generation_kw=env_float(env, "GENERATION_KW", 0.0, minimum=0),
        storage_kw=env_float(env, "STORAGE_KW", 0.0, minimum=0),
        profile=parse_profile(profile_text, day_seconds) if profile_text else None,
    )


def _schedule(env: Mapping[str, str], defaults: PhaseSchedule) -> PhaseSchedule:
    phase = env_float(env, "PHASE_SECONDS", defaults.phase_seconds, minimum=0.05)
    round_seconds = env_float(env, "ROUND_SECONDS", defaults.round_seconds, minimum=0.01)
    if round_seconds > phase:
        raise SettingsError(f"ROUND_SECONDS ({round_seconds:g}) must not be longer than PHASE_SECONDS ({phase:g})")
    return PhaseSchedule(phase_seconds=phase, round_seconds=round_seconds)


def _draft_request_timeout(env: Mapping[str, str], defaults: PeeringSettings) -> float:
    round_seconds = env_float(env, "ROUND_SECONDS", defaults.schedule.round_seconds, minimum=0.01)
    timeout = env_float(
        env, "DRAFT_REQUEST_TIMEOUT_SECONDS", defaults.draft_request_timeout_seconds, minimum=0.001
    )
    if timeout >= round_seconds:
        raise SettingsError(
            f"DRAFT_REQUEST_TIMEOUT_SECONDS ({timeout:g}) must be shorter than ROUND_SECONDS "
            f"({round_seconds:g}): a supplier decides on the Draft Age answers within its round"
        )
    return timeout
