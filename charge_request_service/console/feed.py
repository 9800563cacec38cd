"""One gatherer thread for every console watching: a snapshot at most every ``interval`` seconds.

Snapshots are taken only while someone watches (a stream is open or a page asked for one in
the last minute), so an idle console costs the grid nothing. Every stream waits on the same
condition for the next snapshot, already encoded once as an SSE event.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from gridcommon import jsonfast

log = logging.getLogger("charge.console")

# A stream gets a comment line this often when nothing new came: the edge and proxies see it alive.
KEEPALIVE_SECONDS = 10.0
# After the last request for a snapshot, the gatherer keeps going this long before it rests.
LINGER_SECONDS = 60.0


class StreamsFull(Exception):
    """Every stream slot is taken."""


class Feed:
    def __init__(self, take_snapshot: Callable[[], dict[str, Any]], interval_seconds: float, max_streams: int) -> None:
        self._take = take_snapshot
        self.interval_seconds = interval_seconds
        self.max_streams = max_streams
        self._changed = threading.Condition()
        self._event: bytes | None = None
        self._snapshot: dict[str, Any] | None = None
        self._number = 0
        self._streams = 0
        self._wanted_until = 0.0
        self._stopped = False
        self._thread: threading.Thread | None = None

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def _ensure_running(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="console-feed", daemon=True)
            self._thread.start()

    def _watched(self) -> bool:
        return self._streams > 0 or time.monotonic() < self._wanted_until

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._stopped and not self._watched():
                    self._changed.wait(timeout=5.0)
                if self._stopped:
                    return
            started = time.monotonic()
            try:
                snapshot = self._take()
            except Exception:  # noqa: BLE001 - the feed must outlive one bad snapshot
                log.exception("the console's snapshot of the grid failed; the next one is taken as scheduled")
                snapshot = None
            if snapshot is not None:
                event = b"event: snapshot\ndata: " + jsonfast.dumps(snapshot) + b"\n\n"
                with self._changed:
                    self._snapshot, self._event = snapshot, event
                    self._number += 1
                    self._changed.notify_all()
            time.sleep(max(0.0, self.interval_seconds - (time.monotonic() - started)))

    def latest(self, timeout: float) -> dict[str, Any] | None:
        """The newest snapshot, waiting up to ``timeout`` for the first one."""
        with self._changed:
            self._wanted_until = time.monotonic() + LINGER_SECONDS
            self._ensure_running()
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._snapshot is not None, timeout=timeout)
            return self._snapshot

    def open_stream(self) -> None:
        """Take a stream slot, or raise :class:`StreamsFull`."""
        with self._changed:
            if self._streams >= self.max_streams:
                raise StreamsFull()
            self._streams += 1
            self._ensure_running()
            self._changed.notify_all()

    def close_stream(self) -> None:
        with self._changed:
            self._streams -= 1

    def next_event(self, after: int) -> tuple[int, bytes]:
        """The event after number ``after``, or a keep-alive comment when none comes in time."""
        with self._changed:
            self._changed.wait_for(lambda: self._number > after or self._stopped, timeout=KEEPALIVE_SECONDS)
            if self._number > after and self._event is not None:
                return self._number, self._event
            return after, b": still here\n\n"
