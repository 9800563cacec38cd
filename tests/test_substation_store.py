"""The substation's durable ledger: what a restart keeps, and what it refuses to start from."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from substation_service import ledger as ledger_module
from substation_service.ledger import CapacityExceeded, Ledger, SessionIdRetired, SessionState, UnknownSession
from substation_service.peering.power import LocalPower, parse_profile
from substation_service.store import LedgerStore, StoreError
from tests.harness import REPO_ROOT, all_at_once, free_port
from tests.substation_support import FakeClock

ID = "substation-9"


def open_ledger(path: Path, clock: FakeClock, **options) -> Ledger:
    return Ledger(20.0, 60.0, clock=clock, store=LedgerStore(path, ID), substation_id=ID, **options)


def test_a_new_store_creates_its_schema_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "state" / f"{ID}.sqlite3"
    open_ledger(path, FakeClock())
    db = sqlite3.connect(path)
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"meta", "sessions", "levels", "limits", "retired"} <= tables
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_restart_carries_on_with_every_session_its_load_and_its_counters(tmp_path: Path) -> None:
    path, clock = tmp_path / "ledger.sqlite3", FakeClock()
    before = open_ledger(path, clock)
    ids = []
    for index in range(3):
        ids.append(before.admit(f"ev-{index}", 10.0).session.session_id)
        clock.advance(1)
    before.set_operator_limit(12.0)
    clock.advance(5)
    kept = before.snapshot()

    after = open_ledger(path, clock)  # the old process is gone without a word
    snapshot = after.snapshot()
    assert (snapshot.load_kw, snapshot.requested_kw, snapshot.active_chargers) == (12.0, 30.0, 3)
    assert snapshot.limit_source.value == "operator"
    assert snapshot.state_version > kept.state_version  # a restart never looks older to the balancer
    assert snapshot.energy_kwh == pytest.approx(kept.energy_kwh)
    assert [s.session_id for s in after.sessions()] == ids
    history = after.session(ids[0]).history
    assert [kw for _, kw in history] == [10.0, 6.666666, 4.0]


def test_sessions_that_ended_while_it_was_down_end_at_their_time(tmp_path: Path) -> None:
    path, clock = tmp_path / "ledger.sqlite3", FakeClock()
    before = open_ledger(path, clock)
    short = before.admit("ev-short", 10.0, duration_seconds=10).session.session_id
    long = before.admit("ev-long", 15.0, duration_seconds=600).session.session_id
    ended_at = clock.now + 10
    clock.advance(100)

    after = open_ledger(path, clock)
    report = after.session(short)
    assert (report.state, report.ended_at, report.end_reason) == (SessionState.ENDED, ended_at, "completed")
    assert after.session(long).allocated_kw == 15.0
    with pytest.raises(SessionIdRetired):
        after.admit("ev-short", 10.0, session_id=short)  # a late copy of its request is still refused


def test_suspended_sessions_and_retired_ids_survive_a_restart(tmp_path: Path) -> None:
    path, clock = tmp_path / "ledger.sqlite3", FakeClock()
    before = open_ledger(path, clock, min_charge_kw=4.0)
    ids = [before.admit(f"ev-{index}", 8.0).session.session_id for index in range(4)]
    with pytest.raises(KeyError):
        before.release("never-arrived")
    before.set_operator_limit(8.0)  # two minimums fit: the two newest are suspended
    clock.advance(3)

    after = open_ledger(path, clock, min_charge_kw=4.0)
    states = [after.session(i).state for i in ids]
    assert states == [SessionState.CHARGING] * 2 + [SessionState.SUSPENDED] * 2
    with pytest.raises(CapacityExceeded):
        after.admit("ev-new", 8.0)
    with pytest.raises(SessionIdRetired):
        after.admit("ev-x", 8.0, session_id="never-arrived")
    after.set_operator_limit(12.0)  # room for one more: the one suspended first (the newest, ev-3) resumes
    assert after.session(ids[3]).state is SessionState.CHARGING
    assert after.session(ids[3]).suspended_seconds == pytest.approx(3.0)


def test_ids_of_sessions_whose_copies_all_had_deadlines_do_not_pile_up(tmp_path: Path) -> None:
    path, clock = tmp_path / "ledger.sqlite3", FakeClock()
    ledger = Ledger(100.0, 1.0, clock=clock, store=LedgerStore(path, ID), substation_id=ID,
                    retire_ids_for_seconds=3600)
    for index in range(2_000):
        ledger.admit("ev-1", 30.0, session_id=f"s-{index}", deadline=clock.now + 0.5)
        if index % 2:
            ledger.release(f"s-{index}")  # half stopped early (a hedge's unused copy), half run their time
        clock.advance(1.0)
    with pytest.raises(KeyError):
        ledger.release("never-arrived")  # no deadline known: the whole window

    db = sqlite3.connect(path)
    retired = {row[0] for row in db.execute("SELECT session_id FROM retired WHERE forget_at > ?", (clock.now,))}
    # Of 2,000 ended ids only the last stopped one, whose copies' deadline (+ margin) is still ahead.
    assert retired == {"never-arrived", "s-1999"}
    assert db.execute("SELECT count(*) FROM sessions WHERE report IS NOT NULL").fetchone()[0] == 2_000
    with pytest.raises(SessionIdRetired):  # an ended session known here is still never started again
        ledger.admit("ev-1", 30.0, session_id="s-1998")


def test_a_finished_record_outlives_the_memory_and_its_id_is_never_used_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "ENDED_SESSIONS_KEPT", 3)
    monkeypatch.setattr(ledger_module, "TRIM_EVERY_FINISHES", 1)
    path, clock = tmp_path / "ledger.sqlite3", FakeClock()
    ledger = open_ledger(path, clock, retire_ids_for_seconds=10)
    for index in range(5):
        ledger.admit("ev-1", 5.0, duration_seconds=1, session_id=f"s-{index}")
        clock.advance(2)
    clock.advance(10)

    assert ledger.session("s-0").energy_kwh == pytest.approx(5.0 / 3600)  # forgotten by memory, read from the file
    with pytest.raises(SessionIdRetired):  # starting it again would overwrite what an operator bills from
        ledger.admit("ev-2", 7.0, session_id="s-0")
    restarted = open_ledger(path, clock)
    assert (restarted.session("s-0").state, restarted.session("s-0").session.vehicle_id) == (SessionState.ENDED, "ev-1")


def test_records_past_their_retention_or_the_row_bound_are_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "TRIM_EVERY_FINISHES", 1)
    path, clock = tmp_path / "ledger.sqlite3", FakeClock()
    ledger = open_ledger(path, clock, retire_ids_for_seconds=1, records_retention_seconds=100, records_max_rows=3)

    def kept() -> list[str]:
        ledger.admit("ev-1", 5.0, duration_seconds=1)  # a change: the next one trims
        clock.advance(2)
        ledger.snapshot()
        db = sqlite3.connect(path)
        return sorted(row[0] for row in db.execute(
            "SELECT vehicle_id || ':' || session_id FROM sessions "
            "WHERE ended_at IS NOT NULL AND session_id LIKE 's-%'"))

    for index in range(5):
        ledger.admit("ev-1", 5.0, duration_seconds=1, session_id=f"s-{index}")
        clock.advance(2)
    assert kept() == ["ev-1:s-3", "ev-1:s-4"]  # the row bound: the three newest, the third is unnamed
    for index in range(5, 7):
        ledger.admit("ev-2", 5.0, duration_seconds=1, session_id=f"s-{index}")
        clock.advance(2)
    assert ledger.session("s-5").session.vehicle_id == "ev-2"
    clock.advance(200)
    assert kept() == []  # past their 100 s of retention: gone from the file (memory keeps the newest)
    with pytest.raises(UnknownSession):
        open_ledger(path, clock).session("s-6")


def test_concurrent_admissions_are_each_in_the_file_when_they_return(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(10_000.0, 600.0, store=LedgerStore(path, ID), substation_id=ID)
    missing: list[str] = []

    def admit_many(number: int) -> None:
        with sqlite3.connect(path) as db:  # the file as another process would read it
            for index in range(40):
                session_id = f"s-{number}-{index}"
                ledger.admit(f"ev-{number}-{index}", 5.0, session_id=session_id)
                if db.execute("SELECT 1 FROM sessions WHERE session_id = ?", (session_id,)).fetchone() is None:
                    missing.append(session_id)

    all_at_once(16, admit_many)

    assert missing == []
    restarted = Ledger(10_000.0, 600.0, store=LedgerStore(path, ID), substation_id=ID)
    assert restarted.snapshot().active_chargers == 16 * 40
    assert restarted.snapshot().load_kw == 16 * 40 * 5.0


def test_when_the_file_cannot_be_written_every_change_of_the_group_fails_loudly(tmp_path: Path) -> None:
    path, clock = tmp_path / "ledger.sqlite3", FakeClock()
    ledger = open_ledger(path, clock)
    with sqlite3.connect(path) as other:
        other.execute("DROP TABLE sessions")  # the file changes under the substation

    outcomes = []

    def admit(number: int) -> None:
        try:
            ledger.admit(f"ev-{number}", 1.0)
            outcomes.append("committed")
        except StoreError as exc:
            assert "could not write the state file" in str(exc)
            outcomes.append("refused")

    all_at_once(6, admit)
    assert outcomes == ["refused"] * 6


def test_older_ended_reports_are_read_from_the_file_as_they_were_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "ENDED_REPORTS_IN_MEMORY", 2)
    path, clock = tmp_path / "ledger.sqlite3", FakeClock()
    ledger = open_ledger(path, clock)
    stopped = []
    for index in range(5):
        ledger.admit(f"ev-{index}", 4.0, session_id=f"s-{index}")
        clock.advance(3)
        stopped.append(ledger.release(f"s-{index}").report)

    assert [ledger.session(f"s-{index}") for index in range(5)] == stopped
    _, listed = ledger.reports(include_ended=True)
    assert listed == stopped
    after = open_ledger(path, clock)
    assert after.session("s-0") == stopped[0] and after.reports(include_ended=True)[1] == stopped


def test_a_generation_step_during_the_downtime_is_played_at_its_time(tmp_path: Path) -> None:
    path, clock = tmp_path / "ledger.sqlite3", FakeClock(start=0.0)
    power = LocalPower(profile=parse_profile("0:10,12:0", day_seconds=240.0))  # 10 kW until 120 s
    before = Ledger(20.0, 600.0, clock=clock, power=power, store=LedgerStore(path, ID), substation_id=ID)
    session_id = before.admit("ev-1", 30.0).session.session_id
    clock.advance(200)
    after = Ledger(20.0, 600.0, clock=clock, power=power, store=LedgerStore(path, ID), substation_id=ID)
    assert after.session(session_id).history == ((0.0, 30.0), (120.0, 20.0))


def test_a_store_of_another_substation_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    open_ledger(path, FakeClock())
    with pytest.raises(StoreError, match="belongs to 'substation-9'"):
        LedgerStore(path, "substation-1")


def test_a_corrupt_store_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(b"this is not a database, it is a shopping list" * 100)
    with pytest.raises(StoreError, match="cannot be used .*move it away"):
        LedgerStore(path, ID)


def start_substation(state_dir: Path, log: Path) -> subprocess.CompletedProcess:
    env = {
        "PATH": str(Path(sys.executable).parent), "HOME": str(state_dir), "SUBSTATION_ID": ID,
        "STATE_DIR": str(state_dir), "PORT": str(free_port()), "HOST": "127.0.0.1",
    }
    with log.open("w") as out:
        return subprocess.run(
            [sys.executable, "-m", "gunicorn", "-c", "python:gridcommon.gunicorn_conf", "substation_service:create_app()"],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=30,
        )


@pytest.mark.parametrize("damage", ["corrupt", "unwritable"])
def test_a_substation_whose_state_cannot_be_used_does_not_start(tmp_path: Path, damage: str) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    if damage == "corrupt":
        (state_dir / f"{ID}.sqlite3").write_bytes(b"\x00garbage" * 512)
    else:
        (state_dir / f"{ID}.sqlite3").mkdir()  # a folder where the file should be: nothing can open it
    log = tmp_path / "substation.log"
    finished = start_substation(state_dir, log)
    assert finished.returncode != 0
    text = log.read_text()
    assert "cannot start" in text and str(state_dir) in text, text[-2000:]
