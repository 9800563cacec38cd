"""One log format for every service, each line carrying the request id."""
from __future__ import annotations

import logging
import sys

from gridcommon.request_context import current_request_id

LOG_FORMAT = "%(asctime)s %(levelname)s %(service)s [%(request_id)s] %(name)s: %(message)s"


class _ContextFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id()
        record.service = self.service
        return True


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send this process's logs to stderr in the shared format (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_gridcommon", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._gridcommon = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_ContextFilter(service))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # urllib3 logs every new connection at DEBUG/INFO; that is noise here.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
