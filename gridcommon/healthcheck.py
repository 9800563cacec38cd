"""Container healthcheck without curl: ``python -m gridcommon.healthcheck [--at-least FIELD=N] URL``.

Exits 0 when the URL answers 2xx within the timeout, 1 otherwise, saying why on stderr.
With ``--at-least FIELD=N`` the answer must also be a JSON object whose FIELD is a number of
at least N: a load balancer answers its /status from its first moment, but it is of use only
once a poll has found a substation it can route to (``healthy_substations``).
"""
from __future__ import annotations

import json
import math
import sys
import urllib.error
import urllib.request

USAGE = "usage: python -m gridcommon.healthcheck [--at-least FIELD=N] http://127.0.0.1:PORT/health"


def problem(url: str, timeout: float = 3.0, at_least: tuple[str, float] | None = None) -> str | None:
    """Why ``url`` is not healthy, or None when it is."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our own URL
            if not 200 <= response.status < 300:
                return f"{url} answered HTTP {response.status}"
            body = response.read(1024 * 1024)
    except urllib.error.HTTPError as exc:
        return f"{url} answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"no answer from {url} ({getattr(exc, 'reason', exc)})"
    if at_least is None:
        return None
    field, minimum = at_least
    try:
        value = json.loads(body)[field]
    except (ValueError, KeyError, TypeError):
        return f"{url} gave no JSON object with a {field!r} field"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        return f"{url} reports {field} = {value!r}, and at least {minimum:g} is needed"
    return None


def parse_at_least(text: str) -> tuple[str, float]:
    """``FIELD=N`` as ``(FIELD, N)``; ``ValueError`` saying what is wrong."""
    field, equals, number = text.partition("=")
    try:
        minimum = float(number)
    except ValueError:
        minimum = math.nan
    if not field or not equals or not math.isfinite(minimum):
        raise ValueError(f"--at-least takes FIELD=N with N a number, not {text!r}")
    return field, minimum


def main(argv: list[str]) -> int:
    args = argv[1:]
    at_least = None
    if len(args) == 3 and args[0] == "--at-least":
        try:
            at_least = parse_at_least(args[1])
        except ValueError as exc:
            print(f"{exc}\n{USAGE}", file=sys.stderr)
            return 2
        args = args[2:]
    if len(args) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    reason = problem(args[0], at_least=at_least)
    if reason is not None:
        print(f"unhealthy: {reason}", file=sys.stderr)
    return 0 if reason is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
