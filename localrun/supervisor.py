"""The supervisord configuration of local mode, written from the Procfile.

Restarts work as supervisord's do:

* a process that dies after it has run START_SECONDS is started again at once (its
  port held a moment by a dying worker only makes that start fail, which
  is the next case);
* a process that dies within START_SECONDS of its start is a failed start: supervisord
  waits 1 s before the next try, then 2 s, 3 s... one second more each time (BACKOFF),
  and after START_RETRIES failed starts in a row gives up on it (FATAL: "gave up" in
  the log) while the others keep running; `supervisorctl -c <conf> start NAME`
  tries again. 60 tries wait up to a minute each, about half an hour in all.
* stopping sends SIGTERM to the process's whole group (nginx and granian stop
  gracefully), and SIGKILL after STOP_WAIT_SECONDS.

Each process's command goes into a script of its own (sh runs it), so the Procfile's
quoting reaches the shell untouched: `honcho export supervisord` instead pastes each
line inside single quotes, which breaks on the quotes the lines already have.
"""
from __future__ import annotations

import hashlib
import os
import pwd
import secrets
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

from localrun.procfile import Process, exec_form

START_SECONDS = 5
START_RETRIES = 60
STOP_WAIT_SECONDS = 10
LOG_MAX_BYTES = "10MB"
# Events waiting for the output listener; past this supervisord drops the oldest (and says so).
OUTPUT_BUFFER_EVENTS = 4096
OUTPUT_LISTENER = Path(__file__).resolve().with_name("output.py")
# What a process creates (the state, Prometheus's data) is yours alone, whatever your shell's umask.
PROGRAM_UMASK = 0o077
# AF_UNIX paths are limited to 108 bytes on Linux.
MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class Layout:
    """Where local mode keeps supervisord's files."""

    run_dir: Path

    @property
    def config(self) -> Path:
        return self.run_dir / "supervisord.conf"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "supervisord.pid"

    @property
    def log(self) -> Path:
        return self.run_dir / "supervisord.log"

    @property
    def lock(self) -> Path:
        return self.run_dir / "localrun.lock"

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def scripts(self) -> Path:
        return self.run_dir / "programs"

    @property
    def socket(self) -> Path:
        path = self.run_dir / "supervisor.sock"
        if len(str(path)) <= MAX_SOCKET_PATH:
            return path
        digest = hashlib.sha256(str(self.run_dir).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"localrun-{digest}.sock"

    @property
    def server_url(self) -> str:
        return f"unix://{self.socket}"


@dataclass(frozen=True)
class Settings:
    start_seconds: int = START_SECONDS
    start_retries: int = START_RETRIES
    stop_wait_seconds: int = STOP_WAIT_SECONDS
    colour: bool = False


RPC_USER = "localrun"


def _user_line() -> list[str]:
    """Whoever runs `make run`: supervisord then switches to no other user (and, run as
    root, does not warn that it keeps root)."""
    try:
        return [f"user={_value(pwd.getpwuid(os.getuid()).pw_name)}"]
    except KeyError:  # a uid without a name (some containers)
        return []


def _value(text: object) -> str:
    """A value for supervisord's ini file: it expands %(name)s, so % is written %%."""
    return str(text).replace("%", "%%")


def _command(*words: object) -> str:
    return _value(shlex.join(str(word) for word in words))


def write(processes: list[Process], root: Path, layout: Layout, python: str, settings: Settings = Settings()) -> Path:
    """Writes the configuration and one script per process; returns the configuration's path."""
    for folder in (layout.run_dir, layout.logs, layout.scripts):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    names = [process.name for process in processes]
    # The control socket is yours alone (chmod 0700); the password, new at every run, only
    # keeps supervisord from warning about a socket without one.
    password = secrets.token_hex(16)
    listener = [python, OUTPUT_LISTENER, "--names", ",".join(names)] + (["--colour"] if settings.colour else [])
    sections = [
        "; Written by `python -m localrun` from the Procfile at every `make run`: edit the Procfile, not this.",
        "[supervisord]",
        "nodaemon=true",
        f"logfile={_value(layout.log)}",
        f"logfile_maxbytes={LOG_MAX_BYTES}",
        "logfile_backups=1",
        f"pidfile={_value(layout.pidfile)}",
        f"childlogdir={_value(layout.logs)}",
        "loglevel=info",
        *_user_line(),
        # supervisord's own umask= applies only when it daemonizes: the launcher starts it with
        # umask 077 (its logs and socket are yours alone) and each program gets PROGRAM_UMASK.
        "",
        "[unix_http_server]",
        f"file={_value(layout.socket)}",
        "chmod=0700",
        f"username={RPC_USER}",
        f"password={password}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl={_value(layout.server_url)}",
        f"username={RPC_USER}",
        f"password={password}",
        "",
        "[eventlistener:output]",
        f"command={_command(*listener)}",
        "events=PROCESS_LOG",
        f"buffer_size={OUTPUT_BUFFER_EVENTS}",
        f"directory={_value(root)}",
        # Started before and stopped after every process, so it prints their last lines.
        "priority=1",
        "autorestart=true",
        # Its stdout talks to supervisord; the lines it prints come on stderr, which goes to
        # supervisord's stdout, the launcher's pipe (see localrun.__main__).
        "stdout_logfile=NONE",
        "stderr_logfile=/dev/stdout",
        "stderr_logfile_maxbytes=0",
        "",
    ]
    for index, process in enumerate(processes):
        script = layout.scripts / f"{process.name}.sh"
        script.write_text(
            f"# {process.name}: written by `python -m localrun` from the Procfile; edit the Procfile, not this.\n"
            f"{exec_form(process.command)}\n"
        )
        sections += [
            f"[program:{process.name}]",
            f"command={_command('/bin/sh', script)}",
            f"directory={_value(root)}",
            f"umask={PROGRAM_UMASK:03o}",
            # Started in Procfile order, stopped the other way round: the charge API first.
            f"priority={100 + 10 * index}",
            "autostart=true",
            "autorestart=true",
            f"startsecs={settings.start_seconds}",
            f"startretries={settings.start_retries}",
            "stopsignal=TERM",
            f"stopwaitsecs={settings.stop_wait_seconds}",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={_value(layout.logs / f'{process.name}.log')}",
            f"stdout_logfile_maxbytes={LOG_MAX_BYTES}",
            "stdout_logfile_backups=1",
            "stdout_events_enabled=true",
            "",
        ]
    # Only you can read it: it holds the control socket's password.
    descriptor = os.open(layout.config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as config:
        config.write("\n".join(sections))
    os.chmod(layout.config, 0o600)
    return layout.config
