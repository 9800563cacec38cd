"""The time budget of a request, carried from hop to hop.

The charge API counts a request's budget from when it arrived and sends the
moment it will stop waiting, as seconds since the epoch, in
``X-Request-Deadline``. The balancer stops routing by then and passes it on;
a substation refuses to admit a session after it. So no service admits a
session after its caller gave up on the answer. (The services share a clock:
one host, or hosts kept in step by NTP, which is far tighter than the margin.)
"""
from __future__ import annotations

import math
import time

DEADLINE_HEADER = "X-Request-Deadline"
# A deadline further off than this is not a budget anyone meant.
LONGEST_BUDGET_SECONDS = 3600.0


def format_deadline(epoch_seconds: float) -> str:
    return f"{epoch_seconds:.3f}"


def parse_deadline(value: str | None, now: float | None = None) -> float | None:
    """The deadline in the header, or None when there is none or it is not a plausible moment."""
    if not value:
        return None
    try:
        deadline = float(value)
    except ValueError:
        return None
    now = time.time() if now is None else now
    if not math.isfinite(deadline) or deadline > now + LONGEST_BUDGET_SECONDS:
        return None
    return deadline

