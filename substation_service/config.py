"""Settings of one substation, read once from the environment.

| Variable              | Default                      | Meaning                                                        |
|-----------------------|------------------------------|----------------------------------------------------------------|
| `SUBSTATION_ID`       | `substation-1`               | Name in every answer and metric label (A-Z a-z 0-9 . _ -)      |
| `CAPACITY_KW`         | `100`                        | Transformer capacity in kW (`total_capacity`)                  |
| `SESSION_SECONDS`     | `60`                         | Length of a session whose request gives no `duration_seconds`  |
| `MAX_SESSION_SECONDS` | `3600`                       | Longest `duration_seconds` a request may ask for               |
| `MAX_AMOUNT_KW`       | `350`                        | Largest `amount` a request may ask for (a fast charger's peak)  |
| `PUBLIC_URL`          | `http://127.0.0.1:$PORT`     | How peers and operators reach this substation (`/status` url)  |
| `ALLOCATION_POLICY`   | `deadline`                   | `deadline`: every session gets its minimum, the rest goes first to sessions with an energy need (`energy_kwh` by `departure`), least laxity first, and what they leave is shared max-min fairly (without needs it is `fair_share`); `fair_share`: every session gets between `MIN_CHARGE_KW` and its amount, the rest shared max-min fairly; `strict`: its whole amount or it is refused |
| `MIN_CHARGE_KW`       | `1.4`                        | Least power a charging session gets under `fair_share` (6 A single phase); a session asking less gets what it asks |
| `ADMIN_TOKEN`         | (empty)                      | Operator token of `PUT`/`DELETE /limit`; empty turns the operator API off (403) |
| `STATE_DIR`           | (empty)                      | Folder of the durable ledger (`<SUBSTATION_ID>.sqlite3`, SQLite in WAL mode); empty keeps state in memory only |
| `STATE_SYNC`          | `normal`                     | `normal` survives a killed process; `full` also a power cut (an fsync per change) |
| `SESSION_RECORDS_RETENTION_DAYS` | `90`              | How long finished sessions' records stay in the state file (billing, reports; `GET /sessions?ended=1&since=`) |
| `SESSION_RECORDS_MAX_ROWS` | `1000000`               | Most finished records kept in the state file, the oldest forgotten first (about 1-2 KB each: size it to the disk) |
| `MAX_LONG_POLLS`      | `4`                          | Long polls of `GET /sessions?after_version=&wait=` waiting at once; more get a 429. Each holds one of granian's `THREADS` (16), so it must stay below them |
| `LOG_LEVEL`           | `info`                       | Python log level, shared with granian                          |
| `ACCESS_LOG_BURST`    | `20`                         | Requests a second whose log lines are all written (unless the charge API chose) |
| `ACCESS_LOG_SAMPLE`   | `100`                        | Past the burst, one request in this many is logged             |

Peer balancing, local generation and storage have settings of their own
(`PEERS`, `GENERATION_KW`, `STORAGE_KW`, `MIGRATION_STEP_KW`, ...), read into
``Settings.peering``: their table is in ``substation_service/peering/config.py``.

`PORT` (default 8000) is the service's listening port (its edge's: gridcommon/edge.py, with the
`EDGE_*` timeouts and caps), read here only to build the default `PUBLIC_URL`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from dataclasses import dataclass, field

from gridcommon.settings import SettingsError, env_choice, env_float, env_int, env_str, env_log_level, env_log_sampling
from gridcommon.log_sampling import LogSampling
from gridcommon.validation import DEFAULT_MAX_AMOUNT_KW, DEFAULT_MAX_DURATION_SECONDS
from substation_service.allocation import ALLOCATION_POLICIES, AllocationPolicy
from substation_service.peering.config import PeeringSettings

# The id travels in the balancer's URLs (DELETE /charge/<substation>/<session>) and in metric labels.
SUBSTATION_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class Settings:
    substation_id: str = "substation-1"
    capacity_kw: float = 100.0
    session_seconds: float = 60.0
    max_session_seconds: float = DEFAULT_MAX_DURATION_SECONDS
    max_amount_kw: float = DEFAULT_MAX_AMOUNT_KW
    public_url: str = "http://127.0.0.1:8000"
    log_level: str = "info"
    log_sampling: LogSampling = field(default_factory=LogSampling)
    allocation_policy: AllocationPolicy = AllocationPolicy.DEADLINE
    min_charge_kw: float = 1.4
    admin_token: str = ""
    state_dir: str = ""
    state_full_sync: bool = False
    max_long_polls: int = 4
    records_retention_days: float = 90.0
    records_max_rows: int = 1_000_000
    peering: PeeringSettings = field(default_factory=PeeringSettings)

    @property
    def state_file(self) -> Path | None:
        return Path(self.state_dir) / f"{self.substation_id}.sqlite3" if self.state_dir else None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Settings":
        """Read every setting; raises ``SettingsError`` naming the variable that is wrong."""
        substation_id = env_str(env, "SUBSTATION_ID", cls.substation_id)
        if not SUBSTATION_ID_PATTERN.match(substation_id):
            raise SettingsError(
                f"SUBSTATION_ID must be 1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-'; got {substation_id!r}"
            )
        max_session_seconds = env_float(env, "MAX_SESSION_SECONDS", cls.max_session_seconds, minimum=1)
        session_seconds = env_float(env, "SESSION_SECONDS", cls.session_seconds, minimum=0.001)
        if session_seconds > max_session_seconds:
            raise SettingsError(
                f"SESSION_SECONDS ({session_seconds:g}) must not be longer than MAX_SESSION_SECONDS "
                f"({max_session_seconds:g}); lower one or raise the other."
            )
        port = env_int(env, "PORT", 8000, minimum=1, maximum=65535)
        # THREADS (gridcommon/serve.py): long polls must leave threads for everything else.
        threads = env_int(env, "THREADS", 16, minimum=1, maximum=256)
        max_long_polls = env_int(env, "MAX_LONG_POLLS", cls.max_long_polls, minimum=0)
        if max_long_polls >= threads:
            raise SettingsError(
                f"MAX_LONG_POLLS ({max_long_polls}) must be below THREADS ({threads}): every waiting long poll "
                "holds a thread, and admissions and renewals need one too. Lower it or raise THREADS."
            )
        return cls(
            substation_id=substation_id,
            capacity_kw=env_float(env, "CAPACITY_KW", cls.capacity_kw, minimum=0),
            session_seconds=session_seconds,
            max_session_seconds=max_session_seconds,
            max_amount_kw=env_float(env, "MAX_AMOUNT_KW", cls.max_amount_kw, minimum=0.001),
            public_url=env_str(env, "PUBLIC_URL", f"http://127.0.0.1:{port}").rstrip("/"),
            log_level=env_log_level(env),
            log_sampling=env_log_sampling(env),
            allocation_policy=AllocationPolicy(
                env_choice(env, "ALLOCATION_POLICY", cls.allocation_policy.value, ALLOCATION_POLICIES)
            ),
            min_charge_kw=env_float(env, "MIN_CHARGE_KW", cls.min_charge_kw, minimum=0.001),
            admin_token=env_str(env, "ADMIN_TOKEN", ""),
            state_dir=env_str(env, "STATE_DIR", ""),
            state_full_sync=env_choice(env, "STATE_SYNC", "normal", ("normal", "full")) == "full",
            max_long_polls=max_long_polls,
            records_retention_days=env_float(env, "SESSION_RECORDS_RETENTION_DAYS", cls.records_retention_days,
                                             minimum=0.001),
            records_max_rows=env_int(env, "SESSION_RECORDS_MAX_ROWS", cls.records_max_rows, minimum=1),
            peering=PeeringSettings.from_env(env),
        )
