"""When the rounds of the peer-balancing phases run: plain arithmetic on wall time.

Phases are aligned to the wall clock (phase n starts at ``n * phase_seconds``
since the epoch), so substations sharing a clock, as on one host, agree on
the phase without talking: the part FREEDM's clock synchroniser plays.
Inside a phase, rounds start every ``round_seconds``; as in FREEDM, the next
round is scheduled only while more than two rounds' time is left, otherwise
the node waits for the first round of the next phase.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Rounds that start exactly two round times before the phase ends must not flip with float rounding.
_TOLERANCE_SECONDS = 1e-9


@dataclass(frozen=True)
class Slot:
    phase: int
    round: int
    starts_at: float


@dataclass(frozen=True)
class PhaseSchedule:
    phase_seconds: float
    round_seconds: float

    def __post_init__(self) -> None:
        if not 0 < self.round_seconds <= self.phase_seconds:
            raise ValueError(
                f"round_seconds must be greater than 0 and at most phase_seconds; got round {self.round_seconds}, "
                f"phase {self.phase_seconds}"
            )

    @property
    def rounds_per_phase(self) -> int:
        rounds = 1
        while self._time_left(rounds - 1) > 2 * self.round_seconds + _TOLERANCE_SECONDS:
            rounds += 1
        return rounds

    def phase_at(self, moment: float) -> int:
        """The phase the wall clock is in at ``moment``."""
        return math.floor(moment / self.phase_seconds)

    def slot(self, phase: int, round_: int) -> Slot:
        return Slot(phase, round_, phase * self.phase_seconds + round_ * self.round_seconds)

    def first_slot_at_or_after(self, moment: float) -> Slot:
        phase = self.phase_at(moment)
        for round_ in range(self.rounds_per_phase):
            candidate = self.slot(phase, round_)
            if candidate.starts_at >= moment:
                return candidate
        return self.slot(phase + 1, 0)

    def next_slot(self, current: Slot, now: float) -> Slot:
        """Step 1 of a round: the next round of this phase, or the first of the next one.

        A round that overran its slot skips the slots already past instead of running them late.
        """
        if current.round + 1 < self.rounds_per_phase:
            following = self.slot(current.phase, current.round + 1)
        else:
            following = self.slot(current.phase + 1, 0)
        return following if following.starts_at >= now else self.first_slot_at_or_after(now)

    def _time_left(self, round_: int) -> float:
        return self.phase_seconds - round_ * self.round_seconds
