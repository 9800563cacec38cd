"""One log format for every service, each line carrying the request id.

Log lines are one record each: paths, query strings, ids and anything else a
caller chose end up in messages, so the formatter escapes every character that
could end a line (or hide text on a terminal) instead of trusting each call
site to do it. A traceback keeps its line breaks, but each of its lines is
indented, so no line of it can pass for a record of its own.
"""
from __future__ import annotations

import logging
import re
import sys

from gridcommon.log_sampling import LogSampler, LogSampling
from gridcommon.request_context import current_request_id, current_request_logged

LOG_FORMAT = "%(asctime)s %(levelname)s %(service)s [%(request_id)s] %(name)s: %(message)s"

# C0 and C1 control characters (\n, \r, \x1b, NEL ...), Unicode's line and paragraph
# separators (str.splitlines() and some log viewers break lines there) and the bidi
# overrides that make a terminal show text in another order than it was written.
_UNSAFE_IN_LOGS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Marks the lines of a traceback as part of the record above them.
TRACEBACK_INDENT = "  | "


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_for_log(text: str) -> str:
    """``text`` on one line: control characters written as escapes (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return _UNSAFE_IN_LOGS.sub(_escape_one, text)


class SafeFormatter(logging.Formatter):
    """The shared format, with whatever a caller put in a message unable to start a new line."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        parts = [escape_for_log(self.formatMessage(record))]
        # Not the record's cached exc_text: another handler's formatter may have made it unindented.
        if record.exc_info:
            parts.append(self._indented(self.formatException(record.exc_info)))
        elif record.exc_text:
            parts.append(self._indented(record.exc_text))
        if record.stack_info:
            parts.append(self._indented(self.formatStack(record.stack_info)))
        return "\n".join(parts)

    @staticmethod
    def _indented(text: str) -> str:
        # An exception's message may carry a caller's text with line breaks in it: every line
        # is escaped and indented, so even those cannot look like a record of their own.
        return "\n".join(TRACEBACK_INDENT + escape_for_log(line) for line in text.splitlines())


class _ContextFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id()
        record.service = self.service
        return True


class SampledLogger(logging.Logger):
    """A logger that skips its lines below WARNING for a request left out of the sample.

    Skipped in ``isEnabledFor``, before the record and its arguments are made: a
    filter would only drop them after paying for both.
    """

    def isEnabledFor(self, level: int) -> bool:
        if level < logging.WARNING and not current_request_logged():
            return False
        return super().isEnabledFor(level)


# Set by configure_logging; the web layer asks it, once per request, whether to log that request.
request_sampler = LogSampler(LogSampling())


def configure_logging(service: str, level: str = "INFO", sampling: LogSampling | None = None) -> None:
    """Send this process's logs to stderr in the shared format (idempotent)."""
    global request_sampler
    request_sampler = LogSampler(sampling or LogSampling())
    # Loggers made from now on are sampled; those the modules already made at import become so too.
    logging.setLoggerClass(SampledLogger)
    for logger in logging.Logger.manager.loggerDict.values():
        if type(logger) is logging.Logger:
            logger.__class__ = SampledLogger
    # No format here or in gunicorn's names a source file, line or thread: not looking them up for
    # every record is the optimisation Python's logging HOWTO describes. (gunicorn's shows the process.)
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_gridcommon", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._gridcommon = True  # type: ignore[attr-defined]
    handler.setFormatter(SafeFormatter(LOG_FORMAT))
    handler.addFilter(_ContextFilter(service))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # urllib3 logs every new connection at DEBUG/INFO; that is noise here.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
