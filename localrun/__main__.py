"""`python -m localrun`: run the Procfile's processes under supervisord, in the foreground.

    python -m localrun [--optional prometheus] [NAME ...]

Starts every process of the Procfile (or only the NAMEs), restarts the ones that die,
and prints their output prefixed by their names. Ctrl-C, SIGTERM or SIGHUP stops them
all, and it returns once every one has stopped. One runs at a time per run folder: a second
start says which one runs and exits. `make run` is `python -m localrun --optional prometheus`.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from localrun import procfile, supervisor

ROOT = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# supervisord and everything it starts create files only you can read: logs, state, data.
SUPERVISORD_UMASK = 0o077
# Room in the pipe for what supervisord prints while it stops everything once this launcher is
# gone (a few kilobytes); Linux's default for a user (fs.pipe-max-size) and 16 times a pipe's default.
PIPE_BYTES = 1024 * 1024


def load_env_file(path: Path, environ: dict[str, str]) -> list[str]:
    """Adds the .env file's variables the environment does not set already (it wins, as with
    docker compose); returns their names."""
    if not path.is_file():
        return []
    from dotenv import dotenv_values

    added = []
    for name, value in dotenv_values(path).items():
        if value is not None and name not in environ:
            environ[name] = value
            added.append(name)
    return added


def choose(processes: list[procfile.Process], names: list[str], optional: list[str]) -> tuple[list, list[str]]:
    """The processes to run, and the optional ones skipped because their program is not installed."""
    known = {process.name for process in processes}
    unknown = [name for name in [*names, *optional] if name not in known]
    if unknown:
        raise SystemExit(f"localrun: the Procfile has no process {', '.join(unknown)} (it has {', '.join(known)})")
    chosen = [process for process in processes if not names or process.name in names]
    skipped = [process.name for process in chosen if process.name in optional and shutil.which(process.name) is None]
    return [process for process in chosen if process.name not in skipped], skipped


def _shown(path: Path) -> str:
    """A path as short as it can be said from here."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _die_with_parent() -> None:
    """In supervisord's process, before it starts: if this launcher is killed, supervisord gets
    SIGTERM and stops everything rather than running on unseen."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def hold_lock(path: Path) -> int:
    """Takes the run folder's lock (fcntl.flock) and returns its descriptor; exits saying who holds it.

    This launcher holds it, and supervisord too through the descriptor ``run`` hands it, so
    it is held until both have exited: until every process has stopped, even when this
    launcher is killed and supervisord stops them alone. The kernel drops it with the last
    of them however they end, so a file left by a killed run never blocks a start. The file
    names their pids, for the message of a start refused meanwhile.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holders = os.read(descriptor, 64).decode(errors="replace").split()
        os.close(descriptor)
        raise SystemExit(_already_running([int(word) for word in holders if word.isdigit()])) from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    return descriptor


def _already_running(pids: list[int]) -> str:
    """The one sentence of a refused start, from the pids in the lock file (launcher, supervisord)."""
    launcher, supervisord = (pids + [0, 0])[:2]
    if launcher and _alive(launcher):
        return (
            f"localrun: another `make run` (pid {launcher}) is running here or still stopping its services: "
            f"wait for it to end, or stop it (Ctrl-C in its terminal, or `kill {launcher}`) and start again."
        )
    which = f"supervisord (pid {supervisord})" if supervisord else "supervisord"
    return (
        f"localrun: the {which} of an earlier `make run` is still stopping its services: "
        "wait for it to end (a few seconds) and start again."
    )


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a killed launcher nobody has reaped yet (a zombie) does not."""
    try:
        os.kill(pid, 0)
    except OSError as exc:
        if exc.errno != errno.EPERM:
            return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def run(config: Path, width: int = 0, out=None, lock: int | None = None) -> int:
    """supervisord in the foreground until it stops; our signals become its SIGTERM.

    supervisord runs in a process group of its own: Ctrl-C reaches only this launcher, which
    asks supervisord to stop (SIGTERM), and a closing terminal (SIGHUP) stops it too instead
    of making it reload its configuration and restart everything. Everything supervisord
    prints (its own lines and, through the output listener, every process's) comes through
    one pipe to this launcher, the only writer of the terminal or file `make run` prints to.
    ``lock`` (``hold_lock``) is handed to supervisord, which holds it until it exits.

    supervisord holds the pipe's read end too, and never reads it: when this launcher is
    killed outright (SIGKILL, a process manager's last resort), supervisord gets SIGTERM
    (PR_SET_PDEATHSIG) and its lines still fit in the pipe while it stops everything. A
    pipe without a reader would fail its next line instead (EPIPE), which ends supervisord
    on the spot and leaves the processes it had not stopped yet running, on their ports.
    """
    out = out if out is not None else sys.stdout.buffer
    stop_asked = False
    child: subprocess.Popen | None = None

    def stop(signum, frame) -> None:
        nonlocal stop_asked
        stop_asked = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    # Before supervisord starts: a Ctrl-C at that moment stops it as soon as it runs.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:  # above this user's pipe quota: the default 64 KiB
        pass
    child = subprocess.Popen(
        [sys.executable, "-m", "supervisor.supervisord", "--nodaemon", "--configuration", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=write_end,
        stderr=subprocess.STDOUT,
        process_group=0,
        preexec_fn=_die_with_parent,
        # Its own umask= applies only when it daemonizes; nodaemon, it keeps the one it is given.
        umask=SUPERVISORD_UMASK,
        pass_fds=(read_end,) if lock is None else (read_end, lock),
    )
    os.close(write_end)
    if lock is not None:
        os.write(lock, f"{child.pid}\n".encode())
    if stop_asked:
        child.send_signal(signal.SIGTERM)
    writable = True
    with open(read_end, "rb") as printed:
        for line in printed:
            if writable:
                try:
                    out.write(_supervisord_line(line, width))
                    out.flush()
                except OSError:  # the terminal is gone: keep reading, so that supervisord never blocks
                    writable = False
    return child.wait()


# supervisord's own lines: "2026-01-01 12:00:00,123 INFO spawned: 'x' with pid 1"
_SUPERVISORD_LINE = re.compile(rb"^\d{4}-\d\d-\d\d (\d\d:\d\d:\d\d),\d{3} (CRIT|ERRO|WARN|INFO|DEBG|TRAC|BLAT) ")


def _supervisord_line(line: bytes, width: int = 0) -> bytes:
    """supervisord's own lines in the processes' shape: `12:00:00 supervisord | INFO ...`."""
    match = _SUPERVISORD_LINE.match(line)
    if match is None:
        return line
    name = b"supervisord".ljust(width)
    return b"%s %s | %s %s" % (match.group(1), name, match.group(2), line[match.end():])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localrun", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="processes to run (default: every one)")
    parser.add_argument("--procfile", type=Path, default=ROOT / "Procfile")
    parser.add_argument("--root", type=Path, default=ROOT, help="the folder the processes run in")
    parser.add_argument("--run-dir", type=Path, help="supervisord's files (default: ROOT/.run/supervisor)")
    parser.add_argument("--env-file", type=Path, help="variables for the processes (default: ROOT/.env)")
    parser.add_argument("--optional", action="append", default=[], metavar="NAME",
                        help="run NAME only when a program of that name is on PATH (prometheus)")
    parser.add_argument("--start-seconds", type=int, default=supervisor.START_SECONDS,
                        help="how long a process must run for its start to count (default %(default)s)")
    parser.add_argument("--start-retries", type=int, default=supervisor.START_RETRIES,
                        help="failed starts in a row before supervisord gives up on a process (default %(default)s)")
    parser.add_argument("--write-only", action="store_true", help="write the configuration, print its path, stop")
    args = parser.parse_args(argv)

    root = args.root.resolve()
    processes, skipped = choose(procfile.read(args.procfile), args.names, args.optional)
    if not processes:
        raise SystemExit("localrun: nothing to run")
    layout = supervisor.Layout((args.run_dir or root / ".run" / "supervisor").resolve())
    # Before the configuration is written: a running supervisord's would lose its password.
    lock = hold_lock(layout.lock)
    colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    settings = supervisor.Settings(args.start_seconds, args.start_retries, colour=colour)
    config = supervisor.write(processes, root, layout, sys.executable, settings)
    if args.write_only:
        print(config)
        return 0

    from_env_file = load_env_file(args.env_file or root / ".env", os.environ)
    for name in skipped:
        print(f"localrun: {name} is not installed: it does not run ('make {name}' installs it)", flush=True)
    if from_env_file:
        print(f"localrun: from {args.env_file or '.env'}: {', '.join(sorted(from_env_file))}", flush=True)
    ctl = f"{_shown(Path(sys.executable).with_name('supervisorctl'))} -c {_shown(config)}"
    print(
        f"localrun: supervisord runs {', '.join(process.name for process in processes)}; a process that dies is "
        f"started again. Logs in {_shown(layout.logs)}/; `{ctl} status` shows them; Ctrl-C stops everything.",
        flush=True,
    )
    return run(config, width=max(len(process.name) for process in processes), lock=lock)


if __name__ == "__main__":
    sys.exit(main())
