"""Settings of the charge point gateway, read once from the environment.

| Variable                   | Default     | Meaning                                                                 |
|----------------------------|-------------|-------------------------------------------------------------------------|
| `HOST`                     | `127.0.0.1` | Address both ports listen on                                            |
| `OCPP_PORT`                | `9000`      | Stations connect at `ws(s)://HOST:OCPP_PORT/<station-id>`               |
| `HTTP_PORT`                | `9001`      | `/health`, `/metrics`, `/stations` and the operator API                 |
| `ADMIN_TOKEN`              | (empty)     | Operator token (`Authorization: Bearer`); empty turns the operator API off (403) |
| `STATE_DIR`                | `state`     | Folder of the durable registry and transactions (`gateway.sqlite3`, WAL) |
| `STATE_SYNC`               | `normal`    | `normal` survives a killed process; `full` also a power cut             |
| `STATIONS_FILE`            | (empty)     | JSON file of stations loaded at start (`{"stations": [...]}`, see registry) |
| `TLS_CERT_FILE` / `TLS_KEY_FILE` | (empty) | Both set: stations connect over TLS (`wss://`, security profile 2)  |
| `OPEN_TIMEOUT_SECONDS`     | `10`        | A connection whose WebSocket handshake is not done by then (at random within its last quarter) is reset |
| `MAX_MESSAGE_BYTES`        | `65536`     | A larger frame closes the connection (1009)                             |
| `MAX_UNREAD_BYTES`         | `262144`    | Output a station has not read (sent, not taken off the socket) past which its connection is reset: a station that sends but never reads never makes the gateway wait nor holds its memory |
| `MAX_CONNECTIONS`          | `5000`      | Past this many stations, new handshakes get HTTP 503                    |
| `MAX_CONNECTIONS_PER_ADDRESS` | `100`    | Past this many from one client address, HTTP 503                        |
| `MAX_HANDSHAKING`          | `10000`     | Connections waiting for their handshake at once (idle, slow or in it); past it a new one is answered HTTP 503 at once and closed |
| `MAX_HANDSHAKING_PER_ADDRESS` | `2000`   | The same, from one client address: one address cannot take every file descriptor |
| `WRONG_PASSWORD_BURST`     | `5`         | Wrong passwords one client address may send before it is slowed ...     |
| `WRONG_PASSWORDS_PER_MINUTE` | `6`       | ... to this many a minute; past it, HTTP 429 with Retry-After before any password check |
| `PING_INTERVAL_SECONDS`    | `20`        | WebSocket ping period (the first ping after up to 1.25 of it); a station that does not answer within `PING_TIMEOUT_SECONDS` is dropped |
| `PING_TIMEOUT_SECONDS`     | `20`        |                                                                          |
| `CALLS_PER_SECOND`         | `20`        | A station's CALLs a second past this get a CALLERROR (`GenericError`) ... |
| `CALL_BURST`               | `40`        | ... after a burst of this many; more than five bursts refused within 10 s close the connection (1008) |
| `HEARTBEAT_SECONDS`        | `300`       | Heartbeat interval told in BootNotification                             |
| `RESPONSE_TIMEOUT_SECONDS` | `10`        | How long a CALL to a station waits for its answer                       |
| `AUTHORIZE_ALL`            | `false`     | `true` accepts every id tag; otherwise only those in `ID_TAGS`          |
| `ID_TAGS`                  | (empty)     | Comma-separated allow-list of id tags                                   |
| `LEASE_SECONDS`            | `60`        | Lease of every session at a substation; renewed every third of it       |
| `WATCH_WAIT_SECONDS`       | `20`        | Long-poll wait of `GET /sessions?after_version=N&wait=S` (at most 25)   |
| `SUBSTATION_TIMEOUT_SECONDS` | `5`       | Timeout of every other call to a substation                             |
| `DEADBAND_A`               | `0.5`       | An increase smaller than this is not sent (decreases always are)        |
| `MIN_PROFILE_INTERVAL_SECONDS` | `10`    | Least time between two increases to one transaction (stations keep profiles in flash) |
| `VEHICLE_RESPONSE_SECONDS` | `2`         | After a decrease is accepted, increases wait this long for the vehicle to follow |
| `FALLBACK_CURRENT_A`       | `0`         | TxDefaultProfile at boot, A per phase: a new transaction's draw before its TxProfile (0: none) ... |
|                            |             | ... so a station cut off from the gateway starts no new charging; running ones keep their last TxProfile |
| `STATION_MAX_CURRENT_A`    | `0`         | ChargePointMaxProfile / ChargingStationMaxProfile at boot: the whole station's cap, A per phase ... |
|                            |             | ... online or offline, never above its registered `max_current_a` (0: that maximum) |
| `MIN_CURRENT_A`            | `6`         | A vehicle's minimum current (IEC 61851), A per phase                    |
| `VOLTS`                    | `230`       | Phase voltage used to turn A into kW                                    |
| `TAPER_RATIO`              | `0.6`       | A vehicle drawing below this share of its allocation ...                |
| `TAPER_SECONDS`            | `60`        | ... for this long gets its amount lowered to what it draws ...          |
| `TAPER_MARGIN_KW`          | `1`         | ... plus this margin (never below its minimum); restored when it draws near its allocation |
| `TRANSACTION_TIMEOUT_SECONDS` | `3600`   | A transaction of a station that stays offline this long is ended        |
| `LOG_LEVEL`                | `info`      | Python log level                                                        |
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gridcommon.settings import (
    SettingsError,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_log_level,
    env_str,
)


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    ocpp_port: int = 9000
    http_port: int = 9001
    admin_token: str = ""
    state_dir: str = "state"
    state_full_sync: bool = False
    stations_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    open_timeout_seconds: float = 10.0
    max_message_bytes: int = 65536
    max_unread_bytes: int = 256 * 1024
    max_connections: int = 5000
    max_connections_per_address: int = 100
    max_handshaking: int = 10_000
    max_handshaking_per_address: int = 2_000
    wrong_password_burst: int = 5
    wrong_passwords_per_minute: float = 6.0
    ping_interval_seconds: float = 20.0
    ping_timeout_seconds: float = 20.0
    calls_per_second: float = 20.0
    call_burst: int = 40
    heartbeat_seconds: int = 300
    response_timeout_seconds: float = 10.0
    authorize_all: bool = False
    id_tags: tuple[str, ...] = ()
    lease_seconds: float = 60.0
    watch_wait_seconds: float = 20.0
    substation_timeout_seconds: float = 5.0
    deadband_a: float = 0.5
    min_profile_interval_seconds: float = 10.0
    vehicle_response_seconds: float = 2.0
    fallback_current_a: float = 0.0
    station_max_current_a: float = 0.0
    min_current_a: float = 6.0
    volts: float = 230.0
    taper_ratio: float = 0.6
    taper_seconds: float = 60.0
    taper_margin_kw: float = 1.0
    transaction_timeout_seconds: float = 3600.0
    log_level: str = "info"

    @property
    def state_file(self) -> Path:
        return Path(self.state_dir) / "gateway.sqlite3"

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Settings":
        """Read every setting; raises ``SettingsError`` naming the variable that is wrong."""
        cert, key = env_str(env, "TLS_CERT_FILE", ""), env_str(env, "TLS_KEY_FILE", "")
        if bool(cert) != bool(key):
            raise SettingsError("TLS_CERT_FILE and TLS_KEY_FILE go together: set both for TLS, or neither")
        settings = cls(
            host=env_str(env, "HOST", cls.host),
            ocpp_port=env_int(env, "OCPP_PORT", cls.ocpp_port, minimum=1, maximum=65535),
            http_port=env_int(env, "HTTP_PORT", cls.http_port, minimum=1, maximum=65535),
            admin_token=env_str(env, "ADMIN_TOKEN", ""),
            state_dir=env_str(env, "STATE_DIR", cls.state_dir),
            state_full_sync=env_choice(env, "STATE_SYNC", "normal", ("normal", "full")) == "full",
            stations_file=env_str(env, "STATIONS_FILE", ""),
            tls_cert_file=cert,
            tls_key_file=key,
            open_timeout_seconds=env_float(env, "OPEN_TIMEOUT_SECONDS", cls.open_timeout_seconds, minimum=0.1),
            max_message_bytes=env_int(env, "MAX_MESSAGE_BYTES", cls.max_message_bytes, minimum=1024),
            max_unread_bytes=env_int(env, "MAX_UNREAD_BYTES", cls.max_unread_bytes, minimum=16 * 1024),
            max_connections=env_int(env, "MAX_CONNECTIONS", cls.max_connections, minimum=1),
            max_connections_per_address=env_int(
                env, "MAX_CONNECTIONS_PER_ADDRESS", cls.max_connections_per_address, minimum=1
            ),
            max_handshaking=env_int(env, "MAX_HANDSHAKING", cls.max_handshaking, minimum=1),
            max_handshaking_per_address=env_int(
                env, "MAX_HANDSHAKING_PER_ADDRESS", cls.max_handshaking_per_address, minimum=1
            ),
            wrong_password_burst=env_int(env, "WRONG_PASSWORD_BURST", cls.wrong_password_burst, minimum=1),
            wrong_passwords_per_minute=env_float(
                env, "WRONG_PASSWORDS_PER_MINUTE", cls.wrong_passwords_per_minute, minimum=0.1
            ),
            ping_interval_seconds=env_float(env, "PING_INTERVAL_SECONDS", cls.ping_interval_seconds, minimum=0.1),
            ping_timeout_seconds=env_float(env, "PING_TIMEOUT_SECONDS", cls.ping_timeout_seconds, minimum=0.1),
            calls_per_second=env_float(env, "CALLS_PER_SECOND", cls.calls_per_second, minimum=0.1),
            call_burst=env_int(env, "CALL_BURST", cls.call_burst, minimum=1),
            heartbeat_seconds=env_int(env, "HEARTBEAT_SECONDS", cls.heartbeat_seconds, minimum=1),
            response_timeout_seconds=env_float(
                env, "RESPONSE_TIMEOUT_SECONDS", cls.response_timeout_seconds, minimum=0.1
            ),
            authorize_all=env_bool(env, "AUTHORIZE_ALL", cls.authorize_all),
            id_tags=env_list(env, "ID_TAGS"),
            lease_seconds=env_float(env, "LEASE_SECONDS", cls.lease_seconds, minimum=5, maximum=600),
            watch_wait_seconds=env_float(env, "WATCH_WAIT_SECONDS", cls.watch_wait_seconds, minimum=0.1, maximum=25),
            substation_timeout_seconds=env_float(
                env, "SUBSTATION_TIMEOUT_SECONDS", cls.substation_timeout_seconds, minimum=0.1
            ),
            deadband_a=env_float(env, "DEADBAND_A", cls.deadband_a, minimum=0),
            min_profile_interval_seconds=env_float(
                env, "MIN_PROFILE_INTERVAL_SECONDS", cls.min_profile_interval_seconds, minimum=0
            ),
            vehicle_response_seconds=env_float(
                env, "VEHICLE_RESPONSE_SECONDS", cls.vehicle_response_seconds, minimum=0
            ),
            fallback_current_a=env_float(env, "FALLBACK_CURRENT_A", cls.fallback_current_a, minimum=0),
            station_max_current_a=env_float(env, "STATION_MAX_CURRENT_A", cls.station_max_current_a, minimum=0),
            min_current_a=env_float(env, "MIN_CURRENT_A", cls.min_current_a, minimum=0.1),
            volts=env_float(env, "VOLTS", cls.volts, minimum=1),
            taper_ratio=env_float(env, "TAPER_RATIO", cls.taper_ratio, minimum=0, maximum=1),
            taper_seconds=env_float(env, "TAPER_SECONDS", cls.taper_seconds, minimum=0),
            taper_margin_kw=env_float(env, "TAPER_MARGIN_KW", cls.taper_margin_kw, minimum=0),
            transaction_timeout_seconds=env_float(
                env, "TRANSACTION_TIMEOUT_SECONDS", cls.transaction_timeout_seconds, minimum=1
            ),
            log_level=env_log_level(env),
        )
        if settings.ocpp_port == settings.http_port:
            raise SettingsError(f"OCPP_PORT and HTTP_PORT must differ; both are {settings.ocpp_port}")
        return settings
