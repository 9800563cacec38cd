"""supervisord event listener: every line the local processes write, prefixed by the
process's name, on the terminal `make run` runs in (as honcho showed them).

supervisord reads each program's output (stdout_events_enabled) and hands it here as
PROCESS_LOG events. A listener's stdout is its channel to supervisord, so the lines
go to stderr, which supervisord copies to its own stdout (stderr_logfile=/dev/stdout).

Standalone on purpose (no import of the package): supervisord runs it by its path.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time

# Long lines are cut into pieces of this size rather than held forever.
MAX_LINE = 16 * 1024
COLOURS = (36, 33, 32, 35, 34, 31, 96, 93, 92, 95, 94, 91)


def _headers(line: bytes) -> dict[str, str]:
    return dict(token.split(":", 1) for token in line.decode().split())


class Printer:
    def __init__(self, names: list[str], colour: bool, out=None) -> None:
        self._width = max((len(name) for name in names), default=0)
        self._colours = {name: COLOURS[index % len(COLOURS)] for index, name in enumerate(names)}
        self._colour = colour
        self._out = out if out is not None else sys.stderr.buffer
        self._partial: dict[str, bytes] = {}

    def _prefix(self, name: str) -> bytes:
        label = f"{time.strftime('%H:%M:%S')} {name:<{self._width}} |"
        if self._colour:
            label = f"\x1b[{self._colours.get(name, 37)}m{label}\x1b[0m"
        return (label + " ").encode()

    def write(self, name: str, data: bytes) -> None:
        """Prints every complete line of ``data``; the rest waits for its end."""
        pending = self._partial.pop(name, b"") + data
        *lines, rest = pending.split(b"\n")
        while len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        if rest:
            self._partial[name] = rest
        if lines:
            prefix = self._prefix(name)
            self._out.write(b"".join(prefix + line.rstrip(b"\r") + b"\n" for line in lines))
            self._out.flush()

    def flush(self) -> None:
        """Prints what is left of every unfinished line."""
        for name in list(self._partial):
            self.write(name, b"\n")


def listen(printer: Printer, stdin=None, stdout=None) -> None:
    """supervisord's event listener protocol: READY, one event, RESULT; until stdin closes."""
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdout = stdout if stdout is not None else sys.stdout.buffer
    while True:
        stdout.write(b"READY\n")
        stdout.flush()
        header = stdin.readline()
        if not header:
            return
        headers = _headers(header)
        payload = stdin.read(int(headers["len"]))
        if headers.get("eventname", "").startswith("PROCESS_LOG"):
            event_header, _, data = payload.partition(b"\n")
            printer.write(_headers(event_header).get("processname", "?"), data)
        stdout.write(b"RESULT 2\nOK")
        stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", default="", help="the processes, comma-separated: sets the width and colours")
    parser.add_argument("--colour", action="store_true", help="colour each process's prefix")
    args = parser.parse_args(argv)
    printer = Printer([name for name in args.names.split(",") if name], args.colour)
    # supervisord stops the listener last, with SIGTERM: a normal end, not a crash.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        listen(printer)
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        try:
            printer.flush()
        except OSError:
            pass


if __name__ == "__main__":
    main()
