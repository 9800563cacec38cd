"""Routing one charge request: try the policy's candidates until one admits it.

201 ends the search. 409 means the view was behind: the answer updates it and
the next candidate is tried. A connection error, timeout or 5xx marks the
substation down and the next candidate is tried (a pooled connection that
breaks before any answer is first replaced and the request sent once more).
When nothing admits the request, the view is refreshed once (single-flight,
rate-limited) and the decision is made again before giving up. The refusal
says why, from what happened to the forwards and the refresh
(``refusal_reason``): the grid is full (with what is free now), the
substations could not be reached, they were too slow, or the caller's
deadline left no time. A request whose minimum exceeds every substation's
limit is refused before any search (``TooLarge``): no amount of waiting makes
room for it while the limits stay as they are.

The whole search ends by ROUTE_DEADLINE_SECONDS, kept below the caller's own
timeout: a request still searching after its caller gave up would be admitted
somewhere with nobody told of it. No forward and no refresh starts without
time for a useful attempt after it, and each forward's read timeout is cut to
the time left. The refresh is waited for only while a forward still fits after
it: a slow poll round goes on in the background and the request is answered.
"""
from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import Any, Callable
from urllib.parse import quote

import requests

from gridcommon.deadline import DEADLINE_HEADER, format_deadline
from gridcommon.httpclient import BrokeBeforeAnswer, Exchange, HttpClient, HttpResponse, NotSent
from gridcommon.validation import ChargeRequest, finite_number
from load_balancer.lost_answers import LostAnswers, UnansweredForward
from load_balancer.policies import Policy, make_policy, with_need
from load_balancer.poller import describe_request_error, record_failure
from load_balancer.tail import ForwardTiming, TailSettings
from load_balancer.view import FIT_TOLERANCE_KW, GridView, Observation, SubstationSnapshot

log = logging.getLogger(__name__)

# A substation answers within milliseconds; less time than this for its answer is not worth a
# forward, whose session would most likely be admitted only after the request was answered.
SHORTEST_ANSWER_WAIT_SECONDS = 0.5


def shortest_forward_seconds(connect_timeout_seconds: float, forward_timeout_seconds: float) -> float:
    """The least time left worth starting a forward with: time to connect and a moment for the answer."""
    return connect_timeout_seconds + min(forward_timeout_seconds, SHORTEST_ANSWER_WAIT_SECONDS)


# Why a request was not placed (``NoCapacity.reason``): a bounded set, each its own metrics outcome and
# error code (load_balancer.routes).
FULL = "full"
UNREACHABLE = "unreachable"
TOO_SLOW = "too_slow"
NO_TIME = "no_time"


class ForwardError(Exception):
    """A substation did not give a usable answer; the message says why."""

    def __init__(self, message: str, sick: bool = True, slow: bool = False) -> None:
        super().__init__(message)
        # A timeout, a 5xx or a broken answer: the substation is there but unwell, and is ejected
        # for a while. A refused connection is not: nothing listens, and the next poll tells when
        # it is back.
        self.sick = sick
        # No answer within the read timeout: the substation is there but too slow (or frozen).
        self.slow = slow


class UnknownSubstation(LookupError):
    pass


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Admitted:
    answer: Answer
    substation_id: str
    policy: str
    attempts: int


@dataclass(frozen=True)
class NoCapacity:
    """Nothing admitted the request; ``reason`` is FULL, UNREACHABLE, TOO_SLOW or NO_TIME."""

    retry_after_seconds: int
    message: str
    attempts: int
    reason: str = FULL
    # Room for a new session's minimum at each substation that is up, by id (reason FULL only).
    free_kw: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TooLarge:
    """The request's minimum exceeds every substation's limit: it fits nowhere, however long it waits."""

    message: str
    amount_kw: float
    # The least any substation would give a session of this amount: its whole amount under strict.
    minimum_kw: float
    largest_limit_kw: float
    substation_id: str


@dataclass(frozen=True)
class Refused:
    """The substation turned the request down as invalid (4xx other than 409): the client's to fix."""

    answer: Answer
    attempts: int


RouteOutcome = Admitted | NoCapacity | Refused | TooLarge


@dataclass
class _Search:
    request: ChargeRequest
    # One request keeps one policy even if an admin switches it meanwhile.
    policy: Policy
    # When the search must be over, on the router's clock.
    deadline: float
    attempts: int = 0
    retry_hints: list[float] = field(default_factory=list)
    # Substations whose answer never came: each may hold this request's session.
    unanswered: list[SubstationSnapshot] = field(default_factory=list)
    admitted_at: str | None = None
    # The deadline cut the search short: a forward or a refresh was left out for lack of time.
    out_of_time: bool = False
    # What went wrong with forwards, by substation id: "unreachable" or "too_slow", and the reason in words.
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)
    # A refresh was started or joined; and it had not ended while a forward still fit after it.
    refreshed: bool = False
    refresh_late: bool = False
    # The caller's deadline in seconds since the epoch, passed on to the substations.
    caller_deadline: float | None = None


def observation_from_answer(body: dict[str, Any]) -> Observation:
    """The state a substation reports in its answer; ``ValueError`` if it is missing."""
    try:
        return Observation(
            state_version=_whole(body["state_version"]),
            load_kw=_number(body["load"]),
            capacity_kw=_number(body["capacity"]),
            total_capacity_kw=_optional(body.get("total_capacity"), _number),
            active_chargers=_optional(body.get("active_chargers"), _whole),
            minimum_load_kw=_optional(body.get("minimum_load"), _number),
            suspended=_optional(body.get("suspended"), _whole) or 0,
            curtailed=_optional(body.get("curtailed_sessions"), _whole) or 0,
            fair_share_kw=_optional(body.get("fair_share_kw"), _number),
            min_charge_kw=_optional(body.get("min_charge_kw"), _number),
        )
    except KeyError as exc:
        raise ValueError(f"the answer has no {exc.args[0]!r} field") from None


def _number(value: Any) -> float:
    number = finite_number(value)
    if number is None:
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {value!r}")
    return value


def _optional(value: Any, convert: Callable[[Any], Any]) -> Any:
    return None if value is None else convert(value)


def _retry_hint(body: dict[str, Any]) -> float | None:
    """A 409's retry_after_seconds, when it is a usable positive number."""
    try:
        hint = _number(body.get("retry_after_seconds"))
    except ValueError:
        return None
    return hint if hint > 0 else None


def whole_seconds(seconds: float) -> int:
    """Retry-After takes whole seconds; never tell a client to retry at once."""
    return max(1, math.ceil(seconds))


def free_kw(substation: SubstationSnapshot) -> float:
    """Room for a new session's minimum at ``substation`` now: what a request could ask for and start.

    Under fair sharing the sessions charging are curtailed to make room, so what counts is the
    limit less their minimums; a substation that reports no minimums shares nothing. Nothing is
    free while a session is suspended, or at a substation that is down.
    """
    if not substation.up:
        return 0.0
    if substation.minimum_load_kw is None:
        used = substation.committed_kw
    elif substation.suspended:
        return 0.0
    else:
        used = substation.minimum_load_kw + substation.reserved_minimum_kw
    return max(0.0, substation.capacity_kw - used)


def fits_nowhere(substations: list[SubstationSnapshot], amount_kw: float) -> TooLarge | None:
    """``TooLarge`` when the minimum of ``amount_kw`` exceeds the limit of every substation polled so far.

    Each substation's minimum is its own (the whole amount under strict allocation, at most
    MIN_CHARGE_KW under fair sharing), against its limit as last reported. A substation that is down
    counts with its last limit: it may come back. With no substation polled yet, or every limit at
    zero (a grid with no power at all is full, not too small), nothing is known to be too large.
    """
    known = [s for s in substations if s.substation_id is not None and s.last_poll_at is not None]
    if not known or any(s.minimum_for(amount_kw) <= s.capacity_kw + FIT_TOLERANCE_KW for s in known):
        return None
    largest = max(known, key=lambda s: s.capacity_kw)
    if largest.capacity_kw <= 0:
        return None
    minimum = min(s.minimum_for(amount_kw) for s in known)
    message = (
        f"No substation can ever take this request while the limits stay as they are: a session of "
        f"{amount_kw:g} kW needs at least {minimum:g} kW, and the largest limit on the grid now is "
        f"{largest.capacity_kw:g} kW (substation {largest.polled_id}). Ask for at most "
        f"{largest.capacity_kw:g} kW instead."
    )
    return TooLarge(message, amount_kw, minimum, largest.capacity_kw, largest.polled_id)


def refusal_reason(failures: list[str], out_of_time: bool, tried: bool, any_up: bool) -> str:
    """Why nothing admitted a request, from what happened to it.

    ``failures``: the kind of each failed forward (``TOO_SLOW`` or ``UNREACHABLE``);
    ``out_of_time``: the deadline left out a forward or the wait for a refresh; ``tried``: a
    forward or a refresh was under way before that; ``any_up``: a substation is routable now.
    A substation that failed may have had room, so its failure is the reason rather than the
    others being full; slowness first, since it is also what used the deadline up.
    """
    if TOO_SLOW in failures or (out_of_time and tried):
        return TOO_SLOW
    if out_of_time:
        return NO_TIME
    if UNREACHABLE in failures or not any_up:
        return UNREACHABLE
    return FULL


class Router:
    def __init__(
        self,
        view: GridView,
        client: HttpClient,
        refresh: Callable[[], None],
        policy: Policy,
        poll_interval_seconds: float,
        on_admitted: Callable[[str], None],
        on_forward_failure: Callable[[str], None],
        lost_answers: LostAnswers,
        on_lost_session_freed: Callable[[str], None],
        longest_session_seconds: float,
        deadline_seconds: float,
        refresh_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        tail: TailSettings | None = None,
        on_hedge: Callable[[str], None] = lambda outcome: None,
        forward_threads: int = 64,
    ) -> None:
        """``refresh_seconds`` is the longest ``refresh`` takes (a request waits for it only while a
        forward still fits after it); ``client.timeout`` bounds each forward.

        ``tail`` sets the adaptive forward timeout and hedging (``load_balancer.tail``); its
        ceiling is the client's read timeout. ``on_hedge`` counts hedges by outcome.
        """
        self._view = view
        self.timing = ForwardTiming(replace(tail or TailSettings(), max_timeout_seconds=client.timeout[1]))
        self._on_hedge = on_hedge
        # Forwards run here so that one still unanswered can be hedged while it waits.
        self._forwards = ThreadPoolExecutor(max_workers=forward_threads, thread_name_prefix="forward")
        self._deadline = deadline_seconds
        self._refresh_seconds = refresh_seconds
        # Refreshes run here, so a request waits for one only as long as its deadline allows; every
        # request that needs one while it runs waits for that same one.
        self._refresher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refresh")
        self._refresh_lock = threading.Lock()
        self._refreshing: Future | None = None
        self._clock = clock
        self._lost_answers = lost_answers
        self._on_lost_session_freed = on_lost_session_freed
        self._longest_session = longest_session_seconds
        self._client = client
        self._refresh = refresh
        self._policy = policy
        self._poll_interval = poll_interval_seconds
        self._on_admitted = on_admitted
        self._on_forward_failure = on_forward_failure

    @property
    def policy_name(self) -> str:
        return self._policy.name

    def set_policy(self, name: str) -> str:
        """Switch policy at run time; returns the previous one's name. ``ValueError`` if unknown."""
        previous = self._policy.name
        self._policy = make_policy(name)
        log.info("routing policy changed from %s to %s", previous, name)
        return previous

    # Charge requests --------------------------------------------------------

    def route(self, request: ChargeRequest, deadline: float | None = None) -> RouteOutcome:
        """Find a substation for ``request`` by ROUTE_DEADLINE_SECONDS, or by ``deadline`` if sooner.

        ``deadline`` is the caller's, in seconds since the epoch (X-Request-Deadline); it is
        passed on to the substations, which admit nothing after it.
        """
        session_id = request.session_id or uuid.uuid4().hex
        search = self._search(replace(request, session_id=session_id), deadline)
        too_large = self._too_large(search)
        if too_large is not None:
            return too_large
        outcome = self._try_candidates(search)
        if outcome is None and self._refreshed_in_time(search):
            outcome = self._try_candidates(search)
        self._remember_unanswered(search)
        return outcome or self._no_capacity(search)

    def check(self, request: ChargeRequest, deadline: float | None = None) -> TooLarge | None:
        """``TooLarge`` if ``request`` fits under no substation's limit; nothing is reserved or sent."""
        return self._too_large(self._search(request, deadline))

    def _search(self, request: ChargeRequest, deadline: float | None) -> _Search:
        own = self._clock() + self._deadline
        if deadline is not None:
            own = min(own, self._clock() + (deadline - time.time()))
        # A request with an energy need goes where it is best met first (load_balancer.policies.order_for_need).
        return _Search(request, with_need(self._policy, request), deadline=own, caller_deadline=deadline)

    def _too_large(self, search: _Search) -> TooLarge | None:
        """Whether the request fits nowhere; a view that says so is refreshed first, as the limits move."""
        amount = search.request.amount_kw
        if fits_nowhere(self._view.snapshots(), amount) is None:
            return None
        self._refreshed_in_time(search)
        too_large = fits_nowhere(self._view.snapshots(), amount)
        if too_large is not None:
            log.info("%g kW for vehicle %s fits under no substation's limit (the largest is %g kW)",
                     amount, search.request.vehicle_id, too_large.largest_limit_kw)
        return too_large

    def _refreshed_in_time(self, search: _Search) -> bool:
        """Refresh the view, waiting for it only while a forward still fits after it; True once refreshed.

        A refresh that has not ended by then goes on for the requests after this one.
        """
        connect_timeout, forward_timeout = self._client.timeout
        wait_seconds = self._time_left(search) - shortest_forward_seconds(connect_timeout, forward_timeout)
        if search.out_of_time or wait_seconds <= 0:
            search.out_of_time = True
            return False
        with self._refresh_lock:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = self._refresher.submit(contextvars.copy_context().run, self._refresh)
            refreshing = self._refreshing
        search.refreshed = True
        # No round outlasts refresh_seconds (the poller gives up on a poll by then): one that
        # takes that long has a substation that did not answer its poll.
        longest_wait = min(wait_seconds, self._refresh_seconds)
        try:
            refreshing.result(timeout=longest_wait)
        except FutureTimeout:
            search.out_of_time = search.refresh_late = True
            log.info("the refresh of the view took longer than the %.2f s the request could wait for it",
                     longest_wait)
            return False
        return True

    def _time_left(self, search: _Search) -> float:
        return search.deadline - self._clock()

    def _forward_timeout(self, search: _Search) -> tuple[float, float] | None:
        """``(connect, read)`` timeouts of a forward that ends by the deadline; None if too little time is left.

        The read timeout follows what forwards take now (``load_balancer.tail``).
        """
        connect_timeout, forward_timeout = self._client.timeout
        left = self._time_left(search)
        if left < shortest_forward_seconds(connect_timeout, forward_timeout):
            return None
        return connect_timeout, min(self.timing.timeout_seconds, left - connect_timeout)

    def _remember_unanswered(self, search: _Search) -> None:
        # Only once the request is finished: no later attempt can still be admitted under its id.
        assert search.request.session_id is not None
        lifetime = self._lifetime(search.request)
        for substation in search.unanswered:
            if substation.url != search.admitted_at:
                self._lost_answers.remember(
                    substation.url, substation.polled_id, search.request.session_id, lifetime
                )

    def _lifetime(self, request: ChargeRequest) -> float:
        """How long a session of ``request`` may run: its duration, else until its departure, else the longest."""
        if request.duration_seconds is not None:
            return request.duration_seconds
        if request.departure is not None:
            return max(0.0, request.departure.timestamp() - time.time())
        return self._longest_session

    def _try_candidates(self, search: _Search) -> Admitted | Refused | None:
        """Forward to the policy's candidates in turn; hedge one that is slow to answer.

        A forward is sent and its answer awaited in this thread. Only one still
        unanswered after the hedge delay is handed to a thread of its own, while the
        next candidate is asked too; the first admission wins (``_race``).
        """
        amount = search.request.amount_kw
        candidates = iter(enumerate(self._view.choose(amount, search.policy, self.timing.unresponsive_seconds)))

        def start_next() -> tuple[SubstationSnapshot, _Forward] | None:
            for index, candidate in candidates:
                # The first candidate was reserved by choose(); later ones may have filled up since.
                if index > 0 and not self._view.reserve(candidate.url, amount):
                    continue
                timeout = self._forward_timeout(search)
                if timeout is None:
                    self._view.release(candidate.url, amount)
                    search.out_of_time = True
                    return None
                search.attempts += 1
                return candidate, _Forward(self, candidate, search, timeout)
            return None

        while (started := start_next()) is not None:
            candidate, forward = started
            if not self._answered_or_hedge(candidate, forward):
                return self._race(candidate, forward, start_next, search)
            outcome = self._settle(candidate, search, forward.finish())
            if outcome is not None:
                return outcome
        return None

    def _answered_or_hedge(self, candidate: SubstationSnapshot, forward: "_Forward") -> bool:
        """Wait for the forward's answer: True once it is there to read (or timed out), False to hedge it.

        A forward unanswered after the hedge delay is hedged if its substation went silent
        (whatever the budget), or if the budget allows; otherwise it is looked at again after
        each further hedge delay.
        """
        delay = self.timing.hedge_delay_seconds
        if delay is None:
            return True
        over_budget = False
        while not forward.ready(delay):
            self._eject_if_stalled(candidate)
            if self._suspect(candidate) or self.timing.take_hedge():
                return False
            if not over_budget:
                over_budget = True
                self._on_hedge("over_budget")
        return True

    def _race(
        self,
        first_candidate: SubstationSnapshot,
        first_forward: "_Forward",
        start_next: Callable[[], tuple[SubstationSnapshot, "_Forward"] | None],
        search: _Search,
    ) -> Admitted | Refused | None:
        """The slow forward and the next candidate, each answered in a thread of its own: the first admission wins."""
        under_way: dict[Future, SubstationSnapshot] = {}

        def finish_elsewhere(candidate: SubstationSnapshot, forward: _Forward) -> Future:
            # The request's context (its id, whether it is logged) goes along to the forwarding thread.
            future = self._forwards.submit(contextvars.copy_context().run, forward.finish)
            under_way[future] = candidate
            return future

        def hedge() -> bool:
            started = start_next()
            if started is None:
                return False
            finish_elsewhere(*started)
            return True

        first = finish_elsewhere(first_candidate, first_forward)
        if hedge():
            self._on_hedge("sent")
        while under_way:
            done, _ = wait(under_way, return_when=FIRST_COMPLETED)
            for future in done:
                candidate = under_way.pop(future)
                outcome = self._settle(candidate, search, future.result())
                if outcome is not None:
                    self._on_hedge("first_won" if future is first else "hedge_won")
                    self._abandon(under_way, search)
                    return outcome
            if not under_way and not hedge():
                break
        return None

    def _suspect(self, candidate: SubstationSnapshot) -> bool:
        """Whether ``candidate`` has answered nothing for a while although forwards wait on it."""
        current = self._view.entry(candidate.url)
        return current is not None and current.unresponsive(self._view.now(), self.timing.unresponsive_seconds)

    def _eject_if_stalled(self, candidate: SubstationSnapshot) -> None:
        """Eject a substation that has answered nothing for a while although forwards wait on it."""
        now = self._view.now()
        current = self._view.entry(candidate.url)
        if current is not None and current.up and current.unresponsive(now, self.timing.stall_seconds):
            silent = now - (current.waiting_since or now)
            self._mark_failed(current, f"forwards have waited on it for {silent:.2f} s with no answer",
                              eject=True)

    def _settle(
        self, candidate: SubstationSnapshot, search: _Search, result: Answer | Exception
    ) -> Admitted | Refused | None:
        """Apply one forward's answer to the view; the outcome if it ends the search."""
        amount = search.request.amount_kw
        try:
            if isinstance(result, Exception):
                raise result
            answer = result
            observation = observation_from_answer(answer.body) if answer.status in (201, 409) else None
        except (ForwardError, ValueError) as exc:
            # A timeout may hide an admission whose answer got lost: it is freed after a later poll.
            search.failures[candidate.polled_id] = (TOO_SLOW if getattr(exc, "slow", False) else UNREACHABLE,
                                                    str(exc))
            search.unanswered.append(candidate)
            self._view.release(candidate.url, amount)
            self._mark_failed(candidate, f"forwarding to {candidate.url}/charge failed: {exc}",
                              eject=getattr(exc, "sick", True))
            return None
        self._view.release(candidate.url, amount, observation, admitted=answer.status == 201)
        if answer.status == 201:
            search.admitted_at = candidate.url
            substation_id = candidate.polled_id
            self._on_admitted(substation_id)
            log.info(
                "%g kW for vehicle %s admitted at %s (attempt %d, policy %s)",
                amount,
                search.request.vehicle_id,
                substation_id,
                search.attempts,
                search.policy.name,
            )
            return Admitted(answer, substation_id, search.policy.name, search.attempts)
        if answer.status == 409:
            hint = _retry_hint(answer.body)
            if hint is not None:
                search.retry_hints.append(hint)
            return None
        return Refused(answer, search.attempts)

    def _abandon(self, under_way: dict[Future, SubstationSnapshot], search: _Search) -> None:
        """The search is over, with forwards still under way: each is settled when it ends.

        One that admits is stopped at once; one that never answers is remembered, so the
        sweep after its substation's next poll stops whatever it may hold.
        """
        for future, candidate in under_way.items():
            future.add_done_callback(lambda done, candidate=candidate: self._settle_abandoned(candidate, search, done))

    def _settle_abandoned(self, candidate: SubstationSnapshot, search: _Search, done: Future) -> None:
        assert search.request.session_id is not None
        result = done.result()
        amount = search.request.amount_kw
        if isinstance(result, Exception):
            self._view.release(candidate.url, amount)
            self._mark_failed(candidate, f"forwarding to {candidate.url}/charge failed: {result}",
                              eject=getattr(result, "sick", True))
            self._lost_answers.remember(candidate.url, candidate.polled_id, search.request.session_id,
                                        self._lifetime(search.request))
            self._on_hedge("lost")
            return
        try:
            observation = observation_from_answer(result.body) if result.status in (201, 409) else None
        except ValueError:
            observation = None
        self._view.release(candidate.url, amount, observation, admitted=result.status == 201)
        if result.status != 201:
            self._on_hedge("refused")
            return
        # Admitted here too, after the request was answered from elsewhere: stop this copy now.
        self._on_hedge("stopped")
        try:
            self._delete_session(candidate.url, search.request.session_id)
        except ForwardError as exc:
            log.info("could not stop the unused copy of session %s at %s yet (%s); the next sweep will",
                     search.request.session_id, candidate.url, exc)
            self._lost_answers.remember(candidate.url, candidate.polled_id, search.request.session_id,
                                        self._lifetime(search.request))

    def _no_capacity(self, search: _Search) -> NoCapacity:
        retry_after = whole_seconds(min(search.retry_hints, default=self._poll_interval))
        snapshots = self._view.snapshots()
        up = [s for s in snapshots if s.up and s.substation_id is not None]
        reason = refusal_reason(
            [kind for kind, _ in search.failures.values()], search.out_of_time,
            tried=search.attempts > 0 or search.refreshed, any_up=bool(up),
        )
        free = {s.polled_id: round(free_kw(s), 3) for s in up} if reason == FULL else {}
        message = self._refusal_message(search, reason, retry_after, free, snapshots)
        log.info("%g kW for vehicle %s not placed after %d attempts (%s): %s",
                 search.request.amount_kw, search.request.vehicle_id, search.attempts, reason, message)
        return NoCapacity(retry_after, message, search.attempts, reason, free)

    def _refusal_message(self, search: _Search, reason: str, retry_after: int, free: dict[str, float],
                         snapshots: list[SubstationSnapshot]) -> str:
        see_status = "GET /status on the load balancer shows each substation's state."
        failed = "; ".join(f"{substation}: {what}" for substation, (_, what) in sorted(search.failures.items()))
        if reason == TOO_SLOW:
            what = (f"forwards got no answer in time ({failed})" if failed
                    else "the poll of the substations did not end in time" if search.refresh_late
                    else "the substations answered too slowly to try them all in time")
            return (f"The request could not be placed in time: {what}. The substations may be overloaded "
                    f"or stuck. Retry after {retry_after} s; {see_status}")
        if reason == NO_TIME:
            return ("The request's time ran out before a substation could be asked (its deadline, "
                    f"X-Request-Deadline, left too little). Retry after {retry_after} s, with a later deadline.")
        if reason == UNREACHABLE:
            down = [s.substation_id or s.url for s in snapshots if not s.up]
            what = failed or (f"{', '.join(down)} cannot be reached" if down else "none is registered")
            return (f"No substation could be reached or used, so the request cannot be placed ({what}). Retry after "
                    f"{retry_after} s; if it persists, the substations or the network to them are down. {see_status}")
        most = max(free.values(), default=0.0)
        room = ", ".join(f"{substation} {kw:g} kW" for substation, kw in sorted(free.items()))
        down = [s.substation_id or s.url for s in snapshots if not s.up]
        also = f"; {', '.join(down)} cannot be reached now" if down else ""
        ask_less = f", or ask for at most {most:g} kW to start now" if most > 0 else ""
        return (f"The grid is full: no substation has room for {search.request.amount_kw:g} kW now (free for a "
                f"new session: {room}{also}). Retry after {retry_after} s{ask_less}.")

    # Lost answers -----------------------------------------------------------

    def free_lost_sessions(self, url: str) -> None:
        """Stop the sessions ``url`` may have admitted for forwards whose answer was lost.

        Called after a successful poll of ``url``, when it is reachable again.
        While one call works through ``url``'s entries, another finds none.
        """
        with self._lost_answers.sweep(url) as entries:
            for entry in entries:
                if not self._free_lost_session(entry):
                    return  # unreachable again: the sweep after the next poll asks about the rest

    def _free_lost_session(self, entry: UnansweredForward) -> bool:
        """Stop one session behind a lost answer, if it exists; False when the substation could not be asked."""
        try:
            answer = self._delete_session(entry.url, entry.session_id)
        except ForwardError as exc:
            log.info(
                "could not check %s for a lost session yet (%s); trying again after the next poll", entry.url, exc
            )
            return False
        if answer.status == 200:
            self._on_lost_session_freed(entry.substation_id)
            log.warning(
                "freed session %s at %s: it was admitted but its answer was lost, "
                "and the request was answered without it",
                entry.session_id,
                entry.substation_id,
            )
        self._lost_answers.resolve(entry)
        return True

    # Stopping a session -----------------------------------------------------

    def stop_session(self, substation_id: str, session_id: str) -> Answer:
        """Forward a stop to the substation that holds the session.

        Raises :class:`UnknownSubstation` or :class:`ForwardError`.
        """
        substation = self._view.find(substation_id)
        if substation is None:
            raise UnknownSubstation(substation_id)
        try:
            return self._delete_session(substation.url, session_id)
        except ForwardError as exc:
            self._mark_failed(substation, f"stopping session {session_id} at {substation.url} failed: {exc}")
            raise

    def stop_everywhere(self, session_id: str) -> Answer | None:
        """Stop ``session_id`` at every known substation; the stopping answer, or None if none held it.

        Every substation asked retires the id, even one that did not hold it, so a copy
        of its request still on its way is refused there.
        """
        stopped: Answer | None = None
        for substation in self._view.snapshots():
            if substation.substation_id is None:
                continue
            try:
                answer = self._delete_session(substation.url, session_id)
            except ForwardError as exc:
                # Unreachable now: remembered, so the sweep after its next successful poll stops it there.
                self._lost_answers.remember(substation.url, substation.polled_id, session_id, self._longest_session)
                log.info("could not ask %s to stop session %s yet (%s)", substation.url, session_id, exc)
                continue
            if answer.status == 200:
                stopped = answer
        return stopped

    def show_session(self, substation_id: str, session_id: str) -> Answer:
        """The substation's record of a session (live allocation, energy, history).

        Raises :class:`UnknownSubstation` or :class:`ForwardError`.
        """
        substation = self._view.find(substation_id)
        if substation is None:
            raise UnknownSubstation(substation_id)
        answer = self._call("GET", f"{substation.url}/charge/{quote(session_id, safe='')}")
        if answer.status not in (200, 404):
            raise ForwardError(f"it answered HTTP {answer.status}")
        return answer

    def _delete_session(self, url: str, session_id: str) -> Answer:
        """``DELETE /charge/<session_id>`` at ``url``; a 200 updates the view. Raises :class:`ForwardError`."""
        answer = self._call("DELETE", f"{url}/charge/{quote(session_id, safe='')}")
        if answer.status == 200:
            try:
                self._view.observe(url, observation_from_answer(answer.body))
            except ValueError as exc:
                raise ForwardError(f"its answer to the stop is unusable: {exc}") from None
        return answer

    # Plumbing ---------------------------------------------------------------

    def _call(self, method: str, url: str, **kwargs: Any) -> Answer:
        try:
            # Every forward carries the request's session id: sending it twice admits it once.
            response = self._client.request(method, url, resend_if_broken=True, **kwargs)
        except requests.RequestException as exc:
            raise forward_error(exc) from None
        return answer_of(response)

    def _mark_failed(self, substation: SubstationSnapshot, reason: str, eject: bool = False) -> None:
        self._on_forward_failure(substation.polled_id)
        record_failure(self._view, substation.url, reason, eject=eject)

    def close(self) -> None:
        self._forwards.shutdown(wait=False, cancel_futures=True)
        self._refresher.shutdown(wait=False, cancel_futures=True)


def forward_error(exc: requests.RequestException) -> ForwardError:
    # A connect timeout is no slowness of the substation: nothing accepted the connection.
    slow = isinstance(exc, requests.Timeout) and not isinstance(exc, requests.ConnectTimeout)
    return ForwardError(describe_request_error(exc), sick=not isinstance(exc, NotSent), slow=slow)


def answer_of(response: HttpResponse) -> Answer:
    """A substation's answer as the router uses it; ``ForwardError`` if it is a 5xx or not a JSON object."""
    if response.status_code >= 500:
        raise ForwardError(f"it answered HTTP {response.status_code}")
    try:
        body = response.json()
    except ValueError:
        raise ForwardError(f"its HTTP {response.status_code} answer is not JSON") from None
    if not isinstance(body, dict):
        raise ForwardError(f"its HTTP {response.status_code} answer is not a JSON object")
    return Answer(response.status_code, body)


class _Forward:
    """One charge request sent to one substation; its answer read when it comes (``finish``)."""

    def __init__(self, router: Router, candidate: SubstationSnapshot, search: _Search,
                 timeout: tuple[float, float]) -> None:
        self._router = router
        # The substation admits nothing after this forward's own end, so a copy that arrives
        # late (at a substation that was frozen, say) is refused there, not admitted twice.
        connect_timeout, read_timeout = timeout
        own_end = time.time() + connect_timeout + read_timeout
        deadline = own_end if search.caller_deadline is None else min(search.caller_deadline, own_end)
        self._call = dict(url=f"{candidate.url}/charge", json=search.request.as_json(), timeout=timeout,
                          headers={DEADLINE_HEADER: format_deadline(deadline)})
        self._started = time.perf_counter()
        self._exchange: Exchange | None = None
        self._error: ForwardError | None = None
        try:
            self._exchange = self._send(fresh=False)
        except requests.RequestException as exc:
            self._error = forward_error(exc)

    def _send(self, fresh: bool) -> Exchange:
        client = self._router._client
        try:
            return client.send("POST", fresh=fresh, **self._call)
        except BrokeBeforeAnswer:
            # The request never reached the substation; it carries its session id, so sending it
            # again cannot admit it twice.
            return client.send("POST", fresh=True, **self._call)

    def ready(self, seconds: float) -> bool:
        return self._exchange is None or self._exchange.ready(seconds)

    def finish(self) -> Answer | ForwardError:
        """The answer, or why there is none."""
        if self._error is not None:
            return self._error
        assert self._exchange is not None
        try:
            try:
                response = self._exchange.finish()
            except BrokeBeforeAnswer:
                response = self._send(fresh=True).finish()
            answer = answer_of(response)
        except requests.RequestException as exc:
            return forward_error(exc)
        except ForwardError as exc:
            return exc
        self._router.timing.record(time.perf_counter() - self._started)
        return answer
