"""Local mode (`make run`): the Procfile's processes under supervisord (localrun/).

The unit tests check what localrun makes of the Procfile (the scripts, supervisord's
configuration, the output listener); the integration tests start the real runner on
free ports, kill a service and watch it come back while the others keep answering.
Everything is bounded in time, and every process started is stopped at the end.
"""
from __future__ import annotations

import configparser
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from supervisor.datatypes import RestartUnconditionally
from supervisor.options import ServerOptions
from supervisor.xmlrpc import SupervisorTransport

from localrun import procfile, supervisor
from localrun.__main__ import _supervisord_line, choose
from localrun.output import Printer, listen
from tests.harness import REPO_ROOT, free_port, wait_until_healthy

# The ports of `make run` (the Procfile) that the tests move to free ones.
LOCAL_PORTS = (5000, 5002, 5003, 5011, 5012, 5013)
SERVICES = ("substation-1", "substation-2", "substation-3", "load-balancer", "load-balancer-2", "charge-request-service")
TIMEOUT = 60
# Settings of the caller's shell must not reach the processes the tests start.
CLEAN_ENV = {
    key: value
    for key, value in os.environ.items()
    if key not in {"PEER_KEY", "ADMIN_TOKEN", "ROUTING_POLICY", "LOG_LEVEL", "GRAFANA_ADMIN_PASSWORD"}
    and not key.startswith("SUPERVISOR_")
}


# --- a runner on free ports -------------------------------------------------------------------


def procfile_on_free_ports(workdir: Path, names: tuple[str, ...] = SERVICES) -> tuple[Path, dict[int, int]]:
    """The Procfile's lines for ``names``, every `make run` port moved to a free one and every
    .run/ path (the state, the peer key) into ``workdir``: a test never touches `make run`'s."""
    moved = {port: free_port() for port in LOCAL_PORTS}
    lines = []
    for process in procfile.read(REPO_ROOT / "Procfile"):
        if process.name not in names:
            continue
        command = process.command
        for fixed, free in moved.items():
            command = re.sub(rf"\b{fixed}\b", str(free), command)
        command = command.replace(".run/", f"{workdir}/")
        assert ".run" not in command and not any(re.search(rf"\b{port}\b", command) for port in LOCAL_PORTS)
        lines.append(f"{process.name}: {command}")
    (workdir / "peer.key").write_text(secrets.token_hex(32) + "\n")
    path = workdir / "Procfile"
    path.write_text("\n".join(lines) + "\n")
    return path, moved


@dataclass
class Runner:
    """`python -m localrun` started by a test; ``log`` is what it printed (the terminal)."""

    process: subprocess.Popen
    run_dir: Path
    log: Path

    def rpc(self) -> xmlrpc.client.ServerProxy:
        ini = configparser.RawConfigParser()
        ini.read(self.run_dir / "supervisord.conf")
        ctl = ini["supervisorctl"]
        transport = SupervisorTransport(ctl["username"], ctl["password"], ctl["serverurl"])
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def info(self, name: str) -> dict:
        return self.rpc().supervisor.getProcessInfo(name)

    def wait_for_rpc(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"localrun exited with {self.process.returncode}:\n{self.output()}"
            try:
                self.rpc().supervisor.getState()
                return
            except (OSError, xmlrpc.client.Error, KeyError):
                assert time.monotonic() < deadline, f"supervisord did not answer in {timeout} s:\n{self.output()}"
                time.sleep(0.2)

    def program_pids(self) -> list[int]:
        return [info["pid"] for info in self.rpc().supervisor.getAllProcessInfo() if info["pid"]]

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, signum: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        """Signals the launcher and waits for everything to stop; kills what is left after ``timeout``."""
        if self.process.poll() is not None:
            return self.process.returncode
        try:
            pids = self.program_pids()
        except (OSError, xmlrpc.client.Error, KeyError):
            pids = []
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in pids:
                _kill_group(pid)
            pidfile = self.run_dir / "supervisord.pid"
            if pidfile.exists():
                _kill_group(int(pidfile.read_text()))
            self.process.kill()
            self.process.wait(timeout=10)
            raise


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: its parent has not reaped it yet.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def localrun_command(procfile_path: Path, workdir: Path, run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "localrun", "--procfile", str(procfile_path), "--root", str(REPO_ROOT),
            "--run-dir", str(run_dir), "--env-file", str(workdir / "no.env"), *args]


@contextmanager
def local_runner(procfile_path: Path, workdir: Path, *args: str) -> Iterator[Runner]:
    # AF_UNIX paths are short: supervisord's files go to a short temporary folder.
    run_dir = Path(tempfile.mkdtemp(prefix="localrun-"))
    log = workdir / "terminal.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            localrun_command(procfile_path, workdir, run_dir, *args),
            cwd=REPO_ROOT,
            env=CLEAN_ENV,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own process group, as `make run` in a terminal or under a process manager.
            start_new_session=True,
            # A usual shell's umask: what local mode writes must be private all the same.
            umask=0o022,
        )
    runner = Runner(process, run_dir, log)
    try:
        runner.wait_for_rpc()
        yield runner
    finally:
        try:
            runner.stop()
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def local_stack(tmp_path: Path) -> Iterator[tuple[Runner, dict[int, int]]]:
    """Every service of the Procfile (Prometheus aside) under localrun, on free ports, all healthy."""
    path, ports = procfile_on_free_ports(tmp_path)
    with local_runner(path, tmp_path) as runner:
        for port in ports.values():
            wait_until_healthy(f"http://127.0.0.1:{port}/health", runner.process, timeout=TIMEOUT)
        yield runner, ports


# --- the Procfile, line by line --------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("prog a 'b c'", "exec prog a 'b c'"),
        ('A=1 B="$(cat f)" prog', 'A=1 B="$(cat f)" exec prog'),
        ('A="x && y" B=${C:-$(echo "a;b")} prog "&&"', 'A="x && y" B=${C:-$(echo "a;b")} exec prog "&&"'),
        ("mkdir -p d && A=1 prog --flag=x", "mkdir -p d && A=1 exec prog --flag=x"),
        ("echo 'it''s' && prog", "echo 'it''s' && exec prog"),
        # Anything else stays as it is: sh remains the parent.
        ("a | b", "a | b"),
        ("a; b", "a; b"),
        ("a && b || c", "a && b || c"),
        ("a & b", "a & b"),
        ("prog > file", "prog > file"),
        ("(cd x && prog)", "(cd x && prog)"),
        ("echo $((1 + 2))", "echo $((1 + 2))"),
        ("A=1", "A=1"),
        ("prog 'unclosed", "prog 'unclosed"),
    ],
)
def test_exec_form_execs_the_last_program_and_keeps_the_rest(command, expected):
    assert procfile.exec_form(command) == expected


def test_procfile_parser_reads_names_and_commands_and_rejects_mistakes():
    processes = procfile.parse("# a comment\n\nweb: prog --port 1\nworker-2:   A=1 other  \n")
    assert processes == [procfile.Process("web", "prog --port 1"), procfile.Process("worker-2", "A=1 other")]
    with pytest.raises(procfile.ProcfileError, match="defined twice"):
        procfile.parse("web: a\nweb: b\n")
    with pytest.raises(procfile.ProcfileError, match="expected 'name: command'"):
        procfile.parse("just a command\n")


def test_the_procfile_defines_every_local_process():
    names = [process.name for process in procfile.read(REPO_ROOT / "Procfile")]
    # The gateway is no WSGI app behind an edge: it runs alone, on its own two ports (9000, 9001).
    assert names == [*SERVICES, "charge-point-gateway", "prometheus"]


def test_an_optional_process_runs_only_when_its_program_is_installed():
    processes = procfile.parse("a: prog\nsh: sh -c true\nnot-installed-program-xyz: prog\n")
    chosen, skipped = choose(processes, [], ["sh", "not-installed-program-xyz"])
    assert [process.name for process in chosen] == ["a", "sh"]
    assert skipped == ["not-installed-program-xyz"]
    with pytest.raises(SystemExit, match="no process nope"):
        choose(processes, ["nope"], [])


# --- supervisord's configuration -------------------------------------------------------------


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, supervisor.Layout, list[procfile.Process]]:
    processes = procfile.read(REPO_ROOT / "Procfile")
    layout = supervisor.Layout(tmp_path / "supervisor")
    config = supervisor.write(processes, REPO_ROOT, layout, sys.executable)
    return config, layout, processes


def test_supervisord_accepts_the_configuration_with_a_restart_policy_for_every_process(written):
    config, layout, processes = written
    options = ServerOptions()
    options.realize(args=["-c", str(config)])  # supervisord's own parser: exits on a bad file
    programs = {group.name: group.process_configs[0] for group in options.process_group_configs}
    assert set(programs) == {process.name for process in processes} | {"output"}
    for process in processes:
        program = programs[process.name]
        assert program.autorestart is RestartUnconditionally, process.name
        assert program.startsecs == supervisor.START_SECONDS
        assert program.startretries == supervisor.START_RETRIES
        assert program.stopasgroup and program.killasgroup
        assert program.stdout_events_enabled and program.redirect_stderr
        assert program.directory == str(REPO_ROOT)
        # supervisord's own umask= is for daemon mode only: each program gets its own.
        assert program.umask == supervisor.PROGRAM_UMASK == 0o077
    # Started in Procfile order (substations first), so stopped the other way round.
    priorities = [programs[process.name].priority for process in processes]
    assert priorities == sorted(priorities) and len(set(priorities)) == len(priorities)
    assert programs["output"].priority < min(priorities)
    assert os.stat(config).st_mode & 0o077 == 0, "the configuration holds the control socket's password"


def test_each_script_is_the_procfile_line_with_its_program_execd(written):
    config, layout, processes = written
    for process in processes:
        script = (layout.scripts / f"{process.name}.sh").read_text()
        assert script.splitlines()[-1] == procfile.exec_form(process.command)
        assert " exec " in script, f"{process.name}: supervisord would watch sh, not the service"
        assert subprocess.run(["sh", "-n", layout.scripts / f"{process.name}.sh"], timeout=10).returncode == 0


@pytest.mark.parametrize("process", SERVICES)
def test_each_script_runs_the_dockerfiles_command_with_the_procfiles_settings(process, tmp_path, written):
    """The quoting survives: the program gets exactly the Procfile's words and settings
    (`honcho export supervisord` breaks on the quotes of these lines)."""
    _, layout, _ = written
    stubs = tmp_path / "bin"
    stubs.mkdir()
    stub = stubs / "python"
    stub.write_text(f"#!{sys.executable}\nimport json, os, sys\nprint(json.dumps([sys.argv[1:], dict(os.environ)]))\n")
    stub.chmod(0o755)
    key = secrets.token_hex(32)
    result = subprocess.run(
        ["/bin/sh", layout.scripts / f"{process}.sh"],
        cwd=REPO_ROOT,
        env={"PATH": f"{stubs}:/usr/bin:/bin", "PEER_KEY": key, "ADMIN_TOKEN": "tok en"},
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 0, result.stderr
    argv, environ = json.loads(result.stdout)
    package = "substation_service" if process.startswith("substation") else process.replace("-2", "").replace("-", "_")
    assert argv == ["-m", "gridcommon.serve", f"{package}:create_app()"]
    assert environ["HOST"] == "127.0.0.1"
    assert environ["ADMIN_TOKEN"] == "tok en", "an assignment keeps its value whole, spaces included"
    if process.startswith("substation"):
        assert environ["PEER_KEY"] == key and environ["STATE_DIR"] == ".run/state"
    if process.startswith("load-balancer"):
        assert environ["ROUTING_POLICY"] == "fair_share" and environ["SUBSTATION_URL_ALLOW"] == "127.0.0.1"


def test_a_long_run_dir_gets_a_socket_path_that_fits(tmp_path):
    deep = tmp_path.joinpath(*["a-long-folder-name"] * 8)
    socket = supervisor.Layout(deep).socket
    assert len(str(socket)) <= supervisor.MAX_SOCKET_PATH
    assert socket == supervisor.Layout(deep).socket  # the same run dir, the same socket


# --- the output listener ----------------------------------------------------------------------


def test_printer_prefixes_every_line_with_its_process_and_keeps_partial_lines():
    out = io.BytesIO()
    printer = Printer(["substation-1", "lb"], colour=False, out=out)
    printer.write("lb", b"first\nsecond line, cut ")
    printer.write("substation-1", b"other\r\n")
    printer.write("lb", b"here\n")
    printer.write("lb", b"no newline")
    printer.flush()
    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in out.getvalue().decode().splitlines()]
    assert lines == [
        "lb           | first",
        "substation-1 | other",
        "lb           | second line, cut here",
        "lb           | no newline",
    ]


def test_listener_speaks_supervisords_protocol():
    body = b"processname:web groupname:web pid:7 channel:stdout\nhello\n"
    event = b"ver:3.0 server:supervisor serial:1 pool:output poolserial:1 eventname:PROCESS_LOG_STDOUT len:%d\n" % len(body)
    stdin, stdout, printed = io.BytesIO(event + body), io.BytesIO(), io.BytesIO()
    listen(Printer(["web"], colour=False, out=printed), stdin=stdin, stdout=stdout)
    assert stdout.getvalue() == b"READY\nRESULT 2\nOKREADY\n"
    assert printed.getvalue().decode().endswith("web | hello\n")


def test_supervisords_own_lines_get_the_same_prefix():
    line = b"2026-01-01 12:00:00,123 WARN exited: web (terminated by SIGKILL; not expected)\n"
    assert _supervisord_line(line, 13) == b"12:00:00 supervisord   | WARN exited: web (terminated by SIGKILL; not expected)\n"
    assert _supervisord_line(b"anything else\n") == b"anything else\n"


# --- the real runner ----------------------------------------------------------------------------


@pytest.mark.integration
def test_a_killed_service_comes_back_while_the_others_keep_answering(local_stack):
    runner, ports = local_stack
    admitted = requests.post(
        f"http://127.0.0.1:{ports[5000]}/charge",
        json={"vehicle_id": "EV-restart", "amount": 10, "duration_seconds": 600},
        timeout=10,
    )
    assert admitted.status_code == 201, admitted.text
    victim = admitted.json()["substation"]  # substation-N, its process's name too
    victim_url = f"http://127.0.0.1:{ports[5010 + int(victim[-1])]}"
    sessions_before = {s["session_id"] for s in requests.get(f"{victim_url}/sessions", timeout=5).json()["sessions"]}
    assert len(sessions_before) == 1
    others = {port: free for port, free in ports.items() if free != ports[5010 + int(victim[-1])]}

    pids_before = {name: runner.info(name)["pid"] for name in SERVICES}
    killed = pids_before[victim]
    os.kill(killed, signal.SIGKILL)
    started = time.monotonic()
    failures: list[str] = []
    back = False
    while time.monotonic() - started < TIMEOUT:
        for port in others.values():
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code != 200:
                    failures.append(f"{port}: not healthy")
            except requests.RequestException as exc:
                failures.append(f"{port}: {exc}")
        info = runner.info(victim)
        try:
            back = info["pid"] not in (0, killed) and requests.get(f"{victim_url}/health", timeout=1).ok
        except requests.RequestException:
            back = False
        if back:
            break
        time.sleep(0.2)
    assert back, f"{victim} did not come back within {TIMEOUT} s: {runner.info(victim)}\n{runner.output()[-3000:]}"
    assert not failures, f"the other services stopped answering while {victim} was down: {failures[:5]}"
    # Its durable ledger (STATE_DIR) brought the session back.
    sessions_after = {s["session_id"] for s in requests.get(f"{victim_url}/sessions", timeout=5).json()["sessions"]}
    assert sessions_after == sessions_before

    # Every other process kept its pid: nothing else was restarted.
    assert {name: runner.info(name)["pid"] for name in SERVICES if name != victim} == {
        name: pid for name, pid in pids_before.items() if name != victim
    }
    output = runner.output()
    assert re.search(rf"supervisord +\| WARN exited: {victim} \(terminated by SIGKILL; not expected\)", output)
    for name in SERVICES:
        assert re.search(rf"^\d\d:\d\d:\d\d {re.escape(name)} +\| ", output, re.MULTILINE), f"no line of {name}"

    # SIGTERM stops everything, the ports free again.
    pids = runner.program_pids()
    assert runner.stop(signal.SIGTERM) == 0
    assert not [pid for pid in pids if _alive(pid)]
    for port in ports.values():
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=2)


@pytest.mark.integration
def test_a_process_that_keeps_crashing_backs_off_then_is_given_up_alone(tmp_path):
    path = tmp_path / "Procfile"
    path.write_text(
        "crasher: sh -c 'echo crasher starting; exit 3'\n"
        f"steady: {sys.executable} -c \"import time; print('steady up', flush=True); time.sleep(600)\"\n"
    )
    with local_runner(path, tmp_path, "--start-retries", "2", "--start-seconds", "2") as runner:
        steady = runner.info("steady")["pid"]
        deadline = time.monotonic() + TIMEOUT
        while runner.info("crasher")["statename"] != "FATAL":
            assert time.monotonic() < deadline, runner.output()
            time.sleep(0.2)
        assert runner.info("steady")["pid"] == steady and runner.info("steady")["statename"] in ("STARTING", "RUNNING")
        output = runner.output()
        assert "gave up: crasher entered FATAL state" in output
        assert output.count("crasher starting") == 3  # the first start and two retries
        spawned = [
            time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
            for stamp, millis in re.findall(
                r"^(\S+ \S+),(\d+) INFO spawned: 'crasher'", (runner.run_dir / "supervisord.log").read_text(), re.M
            )
        ]
        # At least one second before the first retry, two before the second: the back-off grows.
        waits = [later - earlier for earlier, later in zip(spawned, spawned[1:])]
        assert len(waits) == 2 and waits[0] >= 0.9 and waits[1] >= 1.9, waits
        assert re.search(r"^\d\d:\d\d:\d\d crasher +\| crasher starting$", output, re.MULTILINE)
        assert re.search(r"^\d\d:\d\d:\d\d steady +\| steady up$", output, re.MULTILINE)
        # Ctrl-C (SIGINT to the launcher) stops what is left.
        assert runner.stop(signal.SIGINT) == 0
        assert not _alive(steady)


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: signal.Signals(s).name)
def test_ctrl_c_sigterm_and_a_closing_terminal_stop_everything(tmp_path, signum):
    path = tmp_path / "Procfile"
    path.write_text(f"steady: {sys.executable} -c \"import time; time.sleep(600)\"\n")
    with local_runner(path, tmp_path) as runner:
        steady = runner.info("steady")["pid"]
        started = time.monotonic()
        assert runner.stop(signum, timeout=20) == 0
        assert time.monotonic() - started < 20
        assert not _alive(steady)
        assert "supervisord" in runner.output() and "stopped: steady" in runner.output()


def _processes_in_group(pgid: int) -> set[int]:
    """The live processes of process group ``pgid`` (a supervised program and its gunicorn worker)."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            members.add(int(stat.parent.name))
    return members


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.integration
def test_sigterm_to_its_group_returns_once_every_service_stopped_and_a_start_meanwhile_is_refused(local_stack, tmp_path):
    """`kill -TERM -<pgid>` as a process manager sends it, and `make run` again at once."""
    runner, ports = local_stack
    admitted = requests.post(
        f"http://127.0.0.1:{ports[5000]}/charge",
        json={"vehicle_id": "EV-private", "amount": 10, "duration_seconds": 600},
        timeout=10,
    )
    assert admitted.status_code == 201, admitted.text

    # The ledgers and the charge API's records, their -wal and -shm included, and supervisord's
    # logs are yours alone, though the launcher runs with umask 022.
    state = tmp_path / "state"
    files = sorted(state.iterdir())
    assert {path.name for path in files} >= {
        f"{name}.sqlite3{suffix}"
        for name in ("substation-1", "substation-2", "substation-3", "charge_request_service")
        for suffix in ("", "-wal", "-shm")
    }
    assert _mode(state) == 0o700
    assert {path.name: oct(_mode(path)) for path in files} == {path.name: "0o600" for path in files}
    logs = [runner.run_dir / "supervisord.log", *(runner.run_dir / "logs").iterdir()]
    assert {path.name: oct(_mode(path) & 0o077) for path in logs} == {path.name: "0o0" for path in logs}

    # Every process of every service: supervisord gives each its own group (gunicorn's master and worker).
    groups = [runner.info(name)["pid"] for name in SERVICES]
    services = {pid for group in groups for pid in _processes_in_group(group)}
    assert len(services) >= 2 * len(SERVICES), services
    supervisord = int((runner.run_dir / "supervisord.pid").read_text())

    os.killpg(runner.process.pid, signal.SIGTERM)
    second = subprocess.Popen(
        localrun_command(tmp_path / "Procfile", tmp_path, runner.run_dir),
        cwd=REPO_ROOT, env=CLEAN_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        printed, _ = second.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:  # it started after all: stop it before failing
        os.killpg(second.pid, signal.SIGTERM)
        printed, _ = second.communicate(timeout=TIMEOUT)
        pytest.fail(f"a second start ran while the first was stopping:\n{printed.decode(errors='replace')}")
    text = printed.decode(errors="replace")
    assert second.returncode != 0, text
    assert "Another program is already listening" not in text
    assert text.count("\n") == 1, f"one sentence, not: {text!r}"
    assert re.fullmatch(
        rf"localrun: another `make run` \(pid {runner.process.pid}\) is running here or still stopping its "
        rf"services: wait for it to end, or stop it \(Ctrl-C in its terminal, or `kill {runner.process.pid}`\) "
        r"and start again\.\n",
        text,
    ), text

    assert runner.process.wait(timeout=TIMEOUT) == 0
    # Checked the moment it returned: not a process of any service left, nor supervisord.
    left = {pid for group in groups for pid in _processes_in_group(group)} | {
        pid for pid in (*services, supervisord) if _alive(pid)
    }
    assert not left, f"still running after the launcher returned: {left}\n{runner.output()[-3000:]}"
    for port in ports.values():
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
    output = runner.output()
    assert "stopped: substation-1" in output and "stopped: charge-request-service" in output

    # The lock file is left with the pids of a run that has ended: it does not hold the next start back.
    assert str(runner.process.pid) in (runner.run_dir / "localrun.lock").read_text()
    again = subprocess.run(
        localrun_command(tmp_path / "Procfile", tmp_path, runner.run_dir, "--write-only"),
        cwd=REPO_ROOT, env=CLEAN_ENV, capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert again.returncode == 0 and again.stdout.strip() == str(runner.run_dir / "supervisord.conf"), again


@pytest.mark.integration
def test_a_killed_launcher_leaves_supervisord_to_stop_every_service_and_keeps_the_lock_meanwhile(local_stack, tmp_path):
    """SIGKILL, a process manager's last resort: supervisord, left without a reader, still stops everything."""
    runner, ports = local_stack
    groups = [runner.info(name)["pid"] for name in SERVICES]
    services = {pid for group in groups for pid in _processes_in_group(group)}
    supervisord = int((runner.run_dir / "supervisord.pid").read_text())
    try:
        runner.process.kill()
        assert runner.process.wait(timeout=10) == -signal.SIGKILL
        second = subprocess.run(
            localrun_command(tmp_path / "Procfile", tmp_path, runner.run_dir, "--write-only"),
            cwd=REPO_ROOT, env=CLEAN_ENV, capture_output=True, text=True, timeout=TIMEOUT,
        )
        assert second.returncode != 0 and second.stdout == "", second
        assert second.stderr == (
            f"localrun: the supervisord (pid {supervisord}) of an earlier `make run` is still stopping its services: "
            "wait for it to end (a few seconds) and start again.\n"
        )
        deadline = time.monotonic() + TIMEOUT
        while _alive(supervisord) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(supervisord), "supervisord did not stop"
        left = {pid for group in groups for pid in _processes_in_group(group)} | {
            pid for pid in services if _alive(pid)
        }
        assert not left, f"services left running: {left}"
        log = (runner.run_dir / "supervisord.log").read_text()
        assert "received SIGTERM indicating exit request" in log
        assert all(f"stopped: {name}" in log for name in SERVICES), log[-3000:]
    finally:  # whatever a failure left running
        for group in [*groups, supervisord]:
            if _processes_in_group(group):
                _kill_group(group)
    for port in ports.values():
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
