"""Phase and round timing, the generation profile and the peer-balancing settings."""
from __future__ import annotations

import pytest

from gridcommon.settings import SettingsError
from substation_service.config import Settings
from substation_service.peering.config import PeeringSettings
from substation_service.peering.power import LocalPower, parse_profile
from substation_service.peering.schedule import PhaseSchedule, Slot


@pytest.mark.parametrize(
    ("phase", "round_", "rounds"),
    [(1.0, 0.2, 4), (4.0, 0.4, 9), (1.0, 0.5, 1), (1.0, 1.0, 1), (1.0, 0.3, 3)],
)
def test_a_round_follows_only_while_more_than_two_rounds_are_left(phase: float, round_: float, rounds: int) -> None:
    assert PhaseSchedule(phase, round_).rounds_per_phase == rounds


def test_slots_are_aligned_to_wall_time() -> None:
    schedule = PhaseSchedule(1.0, 0.2)
    assert schedule.first_slot_at_or_after(100.0) == Slot(100, 0, 100.0)
    assert schedule.first_slot_at_or_after(100.1) == Slot(100, 1, pytest.approx(100.2))
    # Past the last round of phase 100 (round 3 at 100.6): the first round of phase 101.
    assert schedule.first_slot_at_or_after(100.61) == Slot(101, 0, 101.0)


def test_next_slot_moves_on_within_the_phase_then_to_the_next() -> None:
    schedule = PhaseSchedule(1.0, 0.2)
    assert schedule.next_slot(schedule.slot(100, 0), now=100.05) == schedule.slot(100, 1)
    assert schedule.next_slot(schedule.slot(100, 3), now=100.65) == schedule.slot(101, 0)
    # A round that overran by more than a round skips the slots already past.
    assert schedule.next_slot(schedule.slot(100, 0), now=100.5) == schedule.slot(100, 3)


def test_schedule_refuses_rounds_longer_than_phases() -> None:
    with pytest.raises(ValueError):
        PhaseSchedule(1.0, 2.0)


HOUR = 3600.0


def test_profile_holds_each_value_until_the_next_hour_and_wraps_at_midnight() -> None:
    profile = parse_profile("7:20, 10:60,16:20,19:0")
    day = 1_800_000_000 - 1_800_000_000 % 86400  # a UTC midnight
    assert profile.at(day + 6 * HOUR) == 0  # before 7:00, the evening's last value holds
    assert profile.at(day + 7 * HOUR) == 20
    assert profile.at(day + 12.5 * HOUR) == 60
    assert profile.at(day + 23 * HOUR) == 0


def test_profile_day_can_be_compressed() -> None:
    profile = parse_profile("0:0,12:50", day_seconds=600)
    assert profile.at(1_800_000_000 - 1_800_000_000 % 600 + 299) == 0
    assert profile.at(1_800_000_000 - 1_800_000_000 % 600 + 300) == 50


def test_local_power_uses_the_profile_over_the_constant() -> None:
    assert LocalPower(generation_kw=10).generation_at(123.0) == 10
    assert LocalPower(generation_kw=10, profile=parse_profile("0:33")).generation_at(123.0) == 33


@pytest.mark.parametrize("text", ["", "7", "7:x", "24:5", "-1:5", "7:-2", "7:5,7:6", "7:inf"])
def test_bad_profiles_are_refused_with_a_clear_message(text: str) -> None:
    with pytest.raises(SettingsError, match="GENERATION_PROFILE"):
        parse_profile(text)


def test_settings_defaults() -> None:
    settings = PeeringSettings.from_env({})
    assert settings.peers == ()
    assert settings.balancing.migration_step_kw == 2.0
    assert settings.balancing.enabled and not settings.balancing.malicious
    assert not settings.balancing.invariant_check
    assert settings.schedule == PhaseSchedule(4.0, 0.4)
    assert settings.draft_request_timeout_seconds < settings.schedule.round_seconds


def test_peer_key_is_read_and_never_shown() -> None:
    assert PeeringSettings.from_env({}).peer_key == ""
    key = "0123456789abcdef" * 2
    settings = PeeringSettings.from_env({"PEER_KEY": f" {key} ", "PEER_CLOCK_TOLERANCE_SECONDS": "2"})
    assert settings.peer_key == key and settings.balancing.clock_tolerance_seconds == 2
    # Settings are printed in tracebacks and debug sessions: the key must not be in them.
    assert key not in repr(settings) and key not in repr(Settings(peering=settings))


def test_a_short_peer_key_says_how_to_make_a_good_one() -> None:
    with pytest.raises(SettingsError, match="at least 32 characters.*secrets.token_hex"):
        PeeringSettings.from_env({"PEER_KEY": "x" * 31})


def test_the_charge_services_request_timeout_leaves_the_substations_alone() -> None:
    # make run and compose give every service one environment; REQUEST_TIMEOUT_SECONDS is the charge service's.
    settings = Settings.from_env({"REQUEST_TIMEOUT_SECONDS": "20"})
    assert settings.peering.draft_request_timeout_seconds == PeeringSettings().draft_request_timeout_seconds


def test_settings_from_env() -> None:
    settings = PeeringSettings.from_env(
        {
            "PEERS": "http://substation_1:5011/, http://substation_2:5012",
            "PEER_BALANCING_ENABLED": "false",
            "GENERATION_KW": "40",
            "STORAGE_KW": "15",
            "GENERATION_PROFILE": "0:0,10:60",
            "MIGRATION_STEP_KW": "1",
            "PHASE_SECONDS": "1",
            "ROUND_SECONDS": "0.2",
            "DRAFT_REQUEST_TIMEOUT_SECONDS": "0.05",
            "INVARIANT_CHECK": "yes",
            "INVARIANT_LIMIT_KW": "3",
            "MALICIOUS": "on",
        }
    )
    assert settings.peers == ("http://substation_1:5011", "http://substation_2:5012")
    assert not settings.balancing.enabled and settings.balancing.malicious and settings.balancing.invariant_check
    assert settings.balancing.invariant_limit_kw == 3 and settings.balancing.migration_step_kw == 1
    assert settings.power.storage_kw == 15 and settings.power.profile is not None
    assert settings.schedule.rounds_per_phase == 4 and settings.draft_request_timeout_seconds == 0.05


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PEERS": "substation_2:5012"}, "PEERS"),
        ({"ROUND_SECONDS": "0.1"}, "DRAFT_REQUEST_TIMEOUT_SECONDS"),
        ({"PHASE_SECONDS": "1", "ROUND_SECONDS": "2", "DRAFT_REQUEST_TIMEOUT_SECONDS": "0.1"}, "ROUND_SECONDS"),
        ({"MIGRATION_STEP_KW": "6"}, "INVARIANT_LIMIT_KW"),
        ({"MIGRATION_STEP_KW": "0"}, "MIGRATION_STEP_KW"),
        ({"GENERATION_KW": "-3"}, "GENERATION_KW"),
        ({"MALICIOUS": "maybe"}, "MALICIOUS"),
        ({"PEER_MISSED_POLLS": "0"}, "PEER_MISSED_POLLS"),
        ({"PEER_KEY": "too-short-to-be-a-key"}, "PEER_KEY"),
        ({"PEER_KEY": "changeme" * 4}, "PEER_KEY"),
        ({"PEER_CLOCK_TOLERANCE_SECONDS": "0"}, "PEER_CLOCK_TOLERANCE_SECONDS"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        PeeringSettings.from_env(env)
