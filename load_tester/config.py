"""Defaults the environment may set for the load tester; command-line options override them.

| Variable                | Default                  | Meaning                                              |
|-------------------------|--------------------------|------------------------------------------------------|
| `LOADTEST_TARGET_URL`   | `http://127.0.0.1:5000`  | the charge request service the requests go to        |
| `LOADTEST_BALANCER_URL` | `http://127.0.0.1:5002`  | the balancer sampled for load (and switched for `--compare-policies`) |
| `LOADTEST_OUTPUT_DIR`   | `loadtest-results`       | where results.json, the plots and the report go      |
| `ADMIN_TOKEN`           | empty                    | operator token: `--compare-policies`, `--compare-allocation`, `derate`; sent with every charge request too, which a charge API with `PUBLIC_API_AUTH=keys` needs |
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gridcommon.settings import env_str


@dataclass(frozen=True)
class Defaults:
    target_url: str = "http://127.0.0.1:5000"
    balancer_url: str = "http://127.0.0.1:5002"
    output_dir: str = "loadtest-results"
    admin_token: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "Defaults":
        fallback = cls()
        return cls(
            target_url=env_str(environ, "LOADTEST_TARGET_URL", fallback.target_url),
            balancer_url=env_str(environ, "LOADTEST_BALANCER_URL", fallback.balancer_url),
            output_dir=env_str(environ, "LOADTEST_OUTPUT_DIR", fallback.output_dir),
            admin_token=env_str(environ, "ADMIN_TOKEN", fallback.admin_token),
        )
