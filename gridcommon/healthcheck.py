"""Container healthcheck without curl: ``python -m gridcommon.healthcheck URL``.

Exits 0 when the URL answers 2xx within the timeout, 1 otherwise.
"""
from __future__ import annotations

import sys
import urllib.error
import urllib.request


def check(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our own URL
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m gridcommon.healthcheck http://127.0.0.1:PORT/health", file=sys.stderr)
        return 2
    healthy = check(argv[1])
    if not healthy:
        print(f"unhealthy: no 2xx answer from {argv[1]}", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
