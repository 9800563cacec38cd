"""The Procfile: `name: command` lines, read the way honcho and foreman read them."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


class ProcfileError(ValueError):
    """A Procfile line that names no process, or a process named twice."""


@dataclass(frozen=True)
class Process:
    name: str
    command: str  # one /bin/sh command line, exactly as the Procfile writes it


def parse(text: str, source: str = "Procfile") -> list[Process]:
    """The processes in Procfile order; blank lines and `#` comments are skipped."""
    processes: list[Process] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ProcfileError(f"{source}:{number}: expected 'name: command', got {line!r}")
        name, command = match.group(1), match.group(2).strip()
        if any(process.name == name for process in processes):
            raise ProcfileError(f"{source}:{number}: process {name!r} is defined twice")
        processes.append(Process(name, command))
    return processes


def read(path: Path) -> list[Process]:
    return parse(path.read_text(), source=str(path))


def exec_form(command: str) -> str:
    """The command with its last program exec'd by the shell, so that the process supervisord
    starts, watches and signals is the service itself rather than a shell waiting for it.

    ``A=1 B="$(cat f)" prog args`` becomes ``A=1 B="$(cat f)" exec prog args`` and
    ``mkdir d && prog args`` becomes ``mkdir d && exec prog args``: the assignments stay
    assignments (expanded without field splitting, as the Procfile wrote them), and sh
    exports them to the program it execs, as dash and bash do. A line with any other
    shell syntax at its top level (pipes, ``;``, ``||``, background jobs, redirections,
    subshells) is left as it is: sh then stays the program's parent.
    """
    scanned = _scan(command)
    if scanned is None:
        return command
    operators, blanks = scanned
    if any(operator != "&&" for _, operator in operators):
        return command
    start = operators[-1][0] + 2 if operators else 0
    for word_start, word_end in _words(command, start, blanks):
        if not _ASSIGNMENT.match(command[word_start:word_end]):
            return f"{command[:word_start]}exec {command[word_start:]}"
    return command  # assignments only: nothing to exec


def _words(command: str, start: int, blanks: list[int]) -> list[tuple[int, int]]:
    """The spans of the top-level words of command[start:], split at unquoted blanks."""
    words, begin = [], start
    for blank in [offset for offset in blanks if offset >= start] + [len(command)]:
        if blank > begin:
            words.append((begin, blank))
        begin = blank + 1
    return words


def _scan(command: str) -> tuple[list[tuple[int, str]], list[int]] | None:
    """The control operators (&&, ||, ;, |, &) and blanks outside quotes, ``$(...)``, ``${...}``
    and backquotes, with their offsets; None for syntax this does not follow."""
    operators: list[tuple[int, str]] = []
    blanks: list[int] = []
    open_: list[str] = []  # the constructs we are inside: ' " ` $( ${
    i, n = 0, len(command)
    while i < n:
        char = command[i]
        inside = open_[-1] if open_ else None
        if inside == "'":
            if char == "'":
                open_.pop()
            i += 1
            continue
        if char == "\\":
            i += 2
            continue
        if inside == "`":
            if char == "`":
                open_.pop()
            i += 1
            continue
        if char == '"':
            if inside == '"':
                open_.pop()
            else:
                open_.append('"')
            i += 1
            continue
        if char == "$" and command[i + 1:i + 2] in ("(", "{"):
            open_.append("$" + command[i + 1])
            i += 2
            continue
        if char == "`":
            open_.append("`")
            i += 1
            continue
        if inside == '"':
            i += 1
            continue
        if char == "'":
            open_.append("'")
        elif inside == "$(" and char == ")":
            open_.pop()
        elif inside == "${" and char == "}":
            open_.pop()
        elif inside == "$(" and char == "(":
            return None  # arithmetic or a subshell inside $(...)
        elif inside is None:
            if char in "()<>\n" or (char == "#" and (i == 0 or command[i - 1].isspace())):
                return None
            pair = command[i:i + 2]
            if pair in ("&&", "||"):
                operators.append((i, pair))
                i += 2
                continue
            if char in ";|&":
                operators.append((i, char))
            elif char in " \t":
                blanks.append(i)
        i += 1
    return None if open_ else (operators, blanks)
