"""The memory of forwards whose answer never came (no network)."""
from __future__ import annotations

import pytest

from load_balancer.lost_answers import LostAnswers
from tests.substation_support import FakeClock


def test_entries_are_kept_per_substation_until_resolved() -> None:
    lost = LostAnswers(clock=FakeClock())
    lost.remember("http://a", "substation-1", "s-1", lifetime_seconds=60)
    lost.remember("http://b", "substation-2", "s-2", lifetime_seconds=60)

    (entry,) = lost.pending("http://a")
    assert (entry.substation_id, entry.session_id) == ("substation-1", "s-1")
    lost.resolve(entry)
    assert lost.pending("http://a") == []
    assert len(lost) == 1


def test_an_entry_is_dropped_once_its_session_would_have_ended_anyway() -> None:
    clock = FakeClock()
    lost = LostAnswers(clock=clock)
    lost.remember("http://a", "substation-1", "s-1", lifetime_seconds=60)

    clock.advance(59.9)
    assert len(lost.pending("http://a")) == 1
    clock.advance(0.1)
    assert lost.pending("http://a") == []
    assert len(lost) == 0


def test_the_oldest_entries_give_way_beyond_the_limit() -> None:
    lost = LostAnswers(clock=FakeClock(), limit=2)
    for number in range(3):
        lost.remember("http://a", "substation-1", f"s-{number}", lifetime_seconds=60)

    assert [entry.session_id for entry in lost.pending("http://a")] == ["s-1", "s-2"]


def test_one_sweep_per_substation_at_a_time() -> None:
    lost = LostAnswers(clock=FakeClock())
    lost.remember("http://a", "substation-1", "s-1", lifetime_seconds=60)
    lost.remember("http://b", "substation-2", "s-2", lifetime_seconds=60)

    with lost.sweep("http://a") as first:
        assert [entry.session_id for entry in first] == ["s-1"]
        with lost.sweep("http://a") as overlapping:
            assert overlapping == [], "a second sweep of the same substation finds nothing to do"
        with lost.sweep("http://b") as other:
            assert [entry.session_id for entry in other] == ["s-2"], "other substations are swept meanwhile"

    with lost.sweep("http://a") as later:
        assert [entry.session_id for entry in later] == ["s-1"], "unresolved entries wait for the next sweep"


def test_a_sweep_that_fails_does_not_block_the_next() -> None:
    lost = LostAnswers(clock=FakeClock())
    lost.remember("http://a", "substation-1", "s-1", lifetime_seconds=60)

    with pytest.raises(RuntimeError), lost.sweep("http://a"):
        raise RuntimeError("a bug in the middle of a sweep")

    with lost.sweep("http://a") as entries:
        assert len(entries) == 1
