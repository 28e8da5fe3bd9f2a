"""The gate: requests wait in ``acquire()`` until every bucket they need can admit them.

Layout: ``Limiter`` owns one ``_PoolRuntime`` per shared limit (model class,
batches, count_tokens). A runtime pairs the pure ``Pool`` (buckets) with a
priority queue of waiters. All state is guarded by one ``threading.Lock`` so
async tasks and worker threads can share a limiter; nothing awaits while
holding it.

Scheduling: the oldest waiter of the highest priority is the *head*. It is
granted as soon as its cost fits. While it waits, a later waiter may go first
only if that does not delay the head (EASY backfilling), looking at a bounded
window behind the head so a grant costs the same however long the queue is.
Only the head sleeps on a timer; everybody else sleeps until a grant or a
change of plan wakes exactly them.

Feedback: a response's report is read under both moments it may describe (at
the request's admission, replayed with this client's traffic since, or when
the answer left) and corrects the buckets as ``_feedback`` says; it fits the
burst to the bucket size the headers show, and a 429 pauses the pool, halves the burst when nothing
explains it, or cuts the share of the refill the pool counts on when others'
use does. An ordinary request that fits at once takes a fast path
(``_admit_plain``, ``_settle_plain``) that ``tests/test_fast_path.py`` holds to
the general one.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import logging
import math
import threading
import time
from asyncio import _get_running_loop as _running_loop
from collections import deque
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, final

import anyio
import sniffio

from ratekeeper.core._accounting import AccountingRules, Cost, Demand, OutputRule, Usage, request_cost
from ratekeeper.core._bucket import TokenBucket
from ratekeeper.core._feedback import (
    NO_READINGS,
    MomentEvidence,
    Readings,
    admission_estimate,
    correction,
    response_estimate,
)
from ratekeeper.core._headers import RateLimitSnapshot, parse_headers
from ratekeeper.core._pool import Pool
from ratekeeper.core._presets import batch_limits, count_tokens_rpm, limit_overrides, limits_for, spend_cap
from ratekeeper.core._reading import (
    ROUNDING_MARGIN,
    burst_bound,
    capped_pause,
    error_fields,
    explained_by_remaining,
    first_of_next_month,
    fitted_burst,
    unified_wait,
)
from ratekeeper.core._stats import (
    AdmittedWindow,
    EventSummary,
    LimiterEvent,
    LimiterStatistics,
    Mark,
    PoolStatistics,
    WaitSamples,
    with_tokens,
)
from ratekeeper.errors import (
    AcquireTimeout,
    CapacityExceeded,
    ConfigurationError,
    InsufficientCredits,
    SpendLimitReached,
    UnknownModelError,
    WouldBlock,
)
from ratekeeper.gate._events import EventLog, HookLock

if TYPE_CHECKING:
    from ratekeeper.redis._engine import RemoteEngine

__all__ = ["Limiter", "Permit"]

log = logging.getLogger("ratekeeper")

#: The share of the refill rate a pool counts on: cut by this factor on a 429 that the server's
#: report explains but the model did not foresee, raised by SHARE_STEP every SHARE_STEP_EVERY
#: clean seconds, never below MIN_SHARE (additive increase, multiplicative decrease).
SHARE_DECREASE: Final = 0.7
SHARE_STEP: Final = 0.02
SHARE_STEP_EVERY: Final = 5.0
MIN_SHARE: Final = 0.25

#: How many entries a map keyed by caller or server input (model ids, subscription claims,
#: warned resets) holds before it is emptied, so hostile input cannot grow it without bound.
MAX_REMEMBERED: Final = 1024

#: The longest a request is taken to travel to the server (in case no answer came quickly):
#: one the server may not have received yet is not counted in a report taken at its response.
MAX_TRANSIT: Final = 0.25
#: How many recent sends a pool remembers for that (more than MAX_TRANSIT's worth at any rate
#: a client reaches: 256 in a quarter second is over 60,000 requests a minute).
_SENDS_KEPT: Final = 256
_SHORTFALLS_KEPT: Final = 64
#: Over the worst shortfall seen lately, what an unsettled input estimate may still fall short by.
_SHORTFALL_SLACK: Final = 0.05
#: The dimensions our own draws on are estimates until settled (the server counts the real input).
_ESTIMATED: Final = frozenset({"input_tokens", "tokens", "priority_input_tokens"})
#: The dimensions output draws on.
_PRODUCED: Final = frozenset({"output_tokens", "tokens", "priority_output_tokens"})
#: How long after its grant a request is taken to be sent, at the most, when looking back.
_GRANT_TO_SEND: Final = 5.0
#: ``date`` and ``-reset`` are given to the second: a reset this far before the date is real.
_RESET_ROUNDING: Final = 1.5

#: Header dimension names that map onto pool buckets.
_RESYNC_DIMS: Final = (
    "requests",
    "input_tokens",
    "output_tokens",
    "tokens",
    "priority_input_tokens",
    "priority_output_tokens",
)
_ONE_REQUEST: Final = {"requests": 1.0}
#: The dimensions whose reports show which moment they describe: the client's own traffic is
#: known exactly there (a request is one request; a max_tokens reservation is what the server
#: reserves too), so only the reports' rounding blurs them. Input is estimated: it would not.
_EVIDENCE_DIMS: Final = frozenset({"requests", "output_tokens"})
_EVIDENCE_TOLERANCE: Final = {"requests": 1.01, "output_tokens": 2 * ROUNDING_MARGIN + 1.0}
_DEFAULT_PRESET: Final = "tier-1"
_FALLBACK_PRESET: Final = "start"

_ACTIVE, _SETTLED, _RELEASED = 0, 1, 2
#: The largest token count ``record_output`` takes: one a float holds exactly.
_MAX_COUNT: Final = 2**53

#: An ordinary request's demand, checked: input, max_tokens, cache reads, cache writes,
#: expected output (no priority tier, no credits). ``Limiter._admit_plain`` takes it.
_Plain = tuple[int, int, int, int, "int | None"]
_WAITING, _GRANTED, _FAILED, _GONE = 0, 1, 2, 3


def _draws(cost: Cost) -> dict[str, float]:
    out = {"requests": cost.requests, "input_tokens": cost.input_tokens, "output_tokens": cost.output_tokens}
    tokens = cost.input_tokens + cost.output_tokens
    if tokens:
        out["tokens"] = tokens
    if cost.priority_input_tokens or cost.priority_output_tokens:
        out["priority_input_tokens"] = cost.priority_input_tokens
        out["priority_output_tokens"] = cost.priority_output_tokens
    return out


def _diff(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    """``a - b`` dimension by dimension (a missing one counts as 0), without the zeros."""
    out = {}
    for k, v in a.items():
        d = v - b.get(k, 0.0)
        if d:
            out[k] = d
    for k, v in b.items():
        if v and k not in a:
            out[k] = -v
    return out


class _Waiter:
    __slots__ = (
        "credit",
        "draws",
        "enqueued_at",
        "error",
        "event",
        "loop_thread",
        "permit",
        "priority",
        "seq",
        "state",
        "sync_event",
        "threadsafe",
    )

    def __init__(self, draws: dict[str, float], priority: int, seq: int, now: float) -> None:
        self.draws = draws
        self.credit = 0.0
        self.priority = priority
        self.seq = seq
        self.enqueued_at = now
        self.state = _WAITING
        self.error: BaseException | None = None
        self.event: anyio.Event | None = None
        self.sync_event: threading.Event | None = None
        self.loop_thread = 0
        self.threadsafe: Callable[[Callable[[], object]], object] | None = None
        self.permit: Permit | None = None

    def wake(self) -> None:
        sync_event = self.sync_event
        if sync_event is not None:
            sync_event.set()
            return
        event = self.event
        if event is None:
            return
        if self.threadsafe is None or threading.get_ident() == self.loop_thread:
            event.set()
        else:
            self.threadsafe(event.set)


class _PoolRuntime:
    """A pool, its queue and its counters."""

    __slots__ = (
        "admitted",
        "cache_reads_count",
        "changes",
        "events",
        "fastest",
        "granted",
        "in_flight",
        "moment",
        "next_wake",
        "overload_backoff",
        "overloaded",
        "pool",
        "queue",
        "queued",
        "raised",
        "rate_limited",
        "rate_limited_predicted",
        "readings",
        "reserves_max_tokens",
        "resyncs",
        "rules",
        "sends",
        "share",
        "share_seq",
        "share_since",
        "shortfalls",
        "shrink_seq",
        "too_small",
        "uncounted",
        "waits",
    )

    def __init__(self, pool: Pool, rules: AccountingRules, created: float = math.nan) -> None:
        self.pool = pool
        self.rules = rules
        self.cache_reads_count = rules.cache_reads_count
        self.reserves_max_tokens = rules.output_rule is OutputRule.MAX_TOKENS
        # priority -> FIFO of waiters; cancelled waiters stay until they reach the front
        self.queue: dict[int, deque[_Waiter]] = {}
        self.queued = 0
        self.in_flight: dict[int, Permit] = {}
        self.next_wake = math.inf
        self.granted = 0
        self.rate_limited = 0
        self.rate_limited_predicted = 0
        self.overloaded = 0
        self.overload_backoff = 0.0
        self.resyncs = 0
        self.raised = 0
        # the quickest answer seen from sending to its headers: no request travels longer
        self.fastest = math.inf
        # the dimensions whose bucket was found smaller than a request's reservation (said once)
        self.too_small: set[str] = set()
        # [sent at, seq, charges, granted at] of the latest requests granted (sent at = granted
        # at until marked sent): what reached the server after a report's moment, and what may
        # not have reached it yet; bounded
        self.sends: deque[list[Any]] = deque(maxlen=_SENDS_KEPT)
        # (time, {dim: change}) of what settlements (and output charged as it is produced) did
        # to the server's buckets lately, for replaying them after a report (see _feedback)
        # (and when, in which order, the request settled had drawn, as ``sends`` has it)
        self.changes: deque[tuple[float, Mapping[str, float], float, float]] = deque(maxlen=_SENDS_KEPT)
        # by how much (a fraction) the input estimates settled lately fell short of the usage
        self.shortfalls: deque[float] = deque(maxlen=_SHORTFALLS_KEPT)
        # what the reports have shown of the moment they describe (see _feedback)
        self.moment = MomentEvidence()
        # per dimension: what each reading of the reports says, relative to the model
        self.readings: dict[str, Readings] = {}
        if created == created:
            self.moment.start(created)
        self.waits = WaitSamples()
        # What this client has spent on the pool so far (see ``spent_since``) is the admitted
        # window's running total plus what was given back of requests the server never
        # counted (never sent, or refused): a resync then errs on the safe side. Replaced,
        # never changed in place, so a permit's mark can hold it without a copy.
        self.admitted = AdmittedWindow()
        self.uncounted: Mapping[str, float] = {}
        # permits admitted before the last burst shrink: their 429s are old news
        self.shrink_seq = -1
        # the fraction of each refill this client counts on: others may be drawing too
        # (lowered by 429s the model did not foresee, raised back by clean traffic)
        self.share = 1.0
        self.share_seq = -1
        self.share_since = -math.inf
        # for statistics(): by kind of event, when the last was, how many, its detail
        self.events: dict[str, tuple[float, int, Mapping[str, Any]]] = {}

    def record(
        self, now: float, draws: Mapping[str, float], sign: float = 1.0, *, counted: bool = True
    ) -> None:
        """Note a charge (or with ``sign=-1`` a refund) of this client's on the pool.

        ``counted=False``: a refund of what the server never counted (see ``spent_since``).
        """
        self.admitted.add(now, draws, sign)
        if not counted:
            uncounted = dict(self.uncounted)
            for dim, amount in draws.items():
                uncounted[dim] = uncounted.get(dim, 0.0) - sign * amount
            self.uncounted = uncounted

    def note_grant(self, permit: Permit, now: float) -> None:
        """Remember a grant in ``sends`` (its send time is its grant's until ``mark_sent``)."""
        entry = [now, permit.seq, dict(permit._charged), now]
        permit._send = entry
        self.sends.append(entry)

    def changes_since(self, t0: float, seq: int) -> list[tuple[float, Mapping[str, float]]] | None:
        """This client's own changes to the server's buckets after ``t0``: requests reaching it
        (drawing) and settlements; ``None`` if the remembered ones do not reach back that far.
        ``seq`` is the reported request, sent at ``t0``: its send and those before it are in
        the report. Requests not sent yet are left out (the caller counts them at the end)."""
        out: list[tuple[float, Mapping[str, float]]] = []
        sends, changes = self.sends, self.changes
        in_flight = self.in_flight
        under = max(self.shortfalls, default=0.0) + _SHORTFALL_SLACK
        oldest = t0 - _GRANT_TO_SEND
        reached = len(sends) < _SENDS_KEPT
        for t, other, charged, granted in reversed(sends):
            if granted < oldest:
                reached = True
                break
            # sent at the same instant: in the order granted (the order they left in)
            if t < t0 or (t == t0 and other <= seq):
                continue
            held = in_flight.get(other)
            if held is not None and not held.sent:
                continue
            draws = {d: -a for d, a in charged.items()}
            if held is not None and under > 0.0 and (estimated := charged.get("input_tokens", 0.0)):
                # still unsettled: the server counted its actual input, which may be more than
                # this estimate; by as much as the estimates settled lately fell short
                draws["input_tokens"] = -estimated * (1.0 + under)
                if "tokens" in draws:
                    draws["tokens"] -= estimated * under
            out.append((t, draws))
        if not reached:
            return None
        reached = len(changes) < _SENDS_KEPT
        for t, change, drawn_at, drawn_seq in reversed(changes):
            if t <= t0:
                reached = True
                break
            if drawn_at < t0 or (drawn_at == t0 and drawn_seq <= seq):
                # settled after the report, drawn before it: the report has the server's own count
                # of it, and what the settlement changes of our estimates is not the server's
                change = _server_side(change, self.reserves_max_tokens)
            out.append((t, change))
        return out if reached else None

    def counted_total(self, dim: str) -> float:
        """Everything charged on ``dim`` so far, net of settlements and of what was given back
        without the server counting it (refusals, requests never sent)."""
        w = self.admitted
        if dim == "requests":
            return w.requests
        if dim == "input_tokens":
            return w.input_tokens
        if dim == "output_tokens":
            return w.output_tokens
        return w.other.get(dim, 0.0)

    def mark(self) -> tuple[Mark, Mapping[str, float]]:
        """What ``spent`` is now, for a permit to note at its grant."""
        return self.admitted.mark(), self.uncounted

    def spent_since(self, mark: tuple[Mark, Mapping[str, float]]) -> dict[str, float]:
        """What this client charged (or refunded) on the pool since ``mark``.

        Spent is everything charged, net of the settlements the server makes
        too; a request the server never counted keeps its charge when it is
        given back. A resync subtracts what was spent since a response's
        request was admitted: the server could not have seen it yet.
        """
        admitted_then, uncounted_then = mark
        out = self.admitted.since(admitted_then)
        uncounted = self.uncounted
        if uncounted is not uncounted_then:
            for dim, amount in uncounted.items():
                if dim != "tokens":
                    out[dim] = out.get(dim, 0.0) + amount - uncounted_then.get(dim, 0.0)
            with_tokens(out)
        return out

    def ordered(self) -> list[deque[_Waiter]]:
        return [self.queue[p] for p in sorted(self.queue, reverse=True)]

    def head(self) -> _Waiter | None:
        for dq in self.ordered():
            while dq and dq[0].state != _WAITING:
                dq.popleft()
            if dq:
                return dq[0]
        return None


@final
class Permit:
    """The right to send one request, held from admission until it is settled.

    Use it inside ``async with limiter.acquire(...) as permit:``. After the
    response, ``observe`` its headers and ``settle`` its usage; leaving the
    block without settling releases what was reserved (see ``release``).
    """

    __slots__ = (
        "_charged",
        "_limiter",
        "_mark",
        "_plain",
        "_runtime",
        "_send",
        "_state",
        "credits",
        "model",
        "pool",
        "reserved",
        "response_status",
        "sent",
        "sent_at",
        "seq",
        "started_at",
    )

    def __init__(
        self,
        limiter: Limiter,
        runtime: _PoolRuntime,
        model: str,
        draws: dict[str, float],
        credits: float,
        seq: int,
        now: float,
    ) -> None:
        self._limiter = limiter
        self._runtime = runtime
        self.pool = runtime.pool.name
        self.model = model
        self.reserved: Mapping[str, float] = draws
        self._charged = dict(draws)
        self._mark = runtime.mark()
        # nothing but requests and (combined) input/output tokens: settle's fast path applies
        self._plain = not credits and "priority_output_tokens" not in draws and "queued_requests" not in draws
        self.credits = credits
        self.seq = seq
        self.started_at = now
        self._state = _ACTIVE
        self.sent = False
        self.sent_at = math.nan
        # [sent at (its grant until marked sent), seq, what it draws, granted at]: its pool's
        # ``sends`` entry, for replaying what reached the server after a report
        self._send: list[Any] | None = None
        self.response_status: int | None = None

    @property
    def active(self) -> bool:
        """True until the permit is settled or released."""
        return self._state == _ACTIVE

    def mark_sent(self) -> None:
        """Record that the request is leaving for the server (its RPM token is spent)."""
        self.sent = True
        self.sent_at = now = self._limiter._now()
        if self._send is not None:
            self._send[0] = now

    def record_output(self, output_tokens: int) -> None:
        """Charge output produced so far (cumulative), as a stream runs.

        Under the real-time OTPM rule output is charged as it is produced; under
        the ``max_tokens`` rule the reservation already covers it and this only
        guards against going over it. A count that is not a finite non-negative
        number raises (a NaN would otherwise drive the bucket to minus its capacity).
        """
        if type(output_tokens) is not int:
            if not isinstance(output_tokens, int | float) or isinstance(output_tokens, bool):
                raise TypeError(f"output_tokens must be a number, got {type(output_tokens).__name__}")
            if not (output_tokens >= 0 and math.isfinite(output_tokens)):
                raise ValueError(f"output_tokens must be a non-negative finite number, got {output_tokens!r}")
        elif not 0 <= output_tokens <= _MAX_COUNT:
            raise ValueError(f"output_tokens must be between 0 and {_MAX_COUNT}, got {output_tokens!r:.40}")
        self._limiter._progress(self, float(output_tokens))

    def observe(
        self,
        headers: object,
        *,
        status: int = 200,
        body: object = None,
    ) -> RateLimitSnapshot:
        """Feed the response's headers (and, for errors, its JSON body) back to the limiter."""
        if type(status) is not int:
            _check_status(status)
        self.sent = True
        self.response_status = status
        return self._limiter._observe(headers, status=status, body=body, permit=self, runtime=self._runtime)

    def settle(self, usage: object, *, credits: float | None = None, headers: object = None) -> Cost:
        """Apply the actual usage: refund what was over-reserved, charge what was under.

        ``usage`` is an SDK ``Usage`` object, a mapping with the usage fields, or a
        ``Usage``. ``credits`` is the wallet's actual charge, when known. Returns the
        settled cost. Settling twice is an error; settling after release does nothing.

        ``headers``: a complete (non-streamed) answer's headers, fed back in the
        same step. They may already count this settlement (the moment they
        describe is undocumented), so the limiter reads them with it applied,
        and lets nobody in on the refund before it has read them.
        """
        limiter = self._limiter
        if headers is not None and self._state == _ACTIVE:
            return limiter._settle_observing(self, usage, credits, headers)
        return self._settle(usage, credits, wake=True)

    def _settle(self, usage: object, credits: float | None, *, wake: bool) -> Cost:
        limiter = self._limiter
        if self._state == _ACTIVE and self._plain and credits is None and limiter._backend is None:
            if type(usage) is Usage:
                return limiter._settle_plain(
                    self,
                    usage.input_tokens,
                    usage.output_tokens,
                    usage.cache_read_input_tokens,
                    usage.cache_creation_input_tokens,
                    wake=wake,
                )
            counts = _usage_counts(usage)
            if counts is not None:
                return limiter._settle_plain(self, *counts, wake=wake)
        if self._state == _SETTLED:
            raise ConfigurationError("this permit is already settled")
        if self._state == _RELEASED:
            return Cost()
        return limiter._settle(self, Usage.from_any(usage), credits, wake=wake)

    def release(self) -> None:
        """Give back what the request did not use, without a usage report.

        A request that never left gives everything back. One that reached the
        server keeps its RPM token; after an error response its tokens are given
        back (the server refused it); after a successful response with no usage
        settled, the reservation stands (the server charged it).
        """
        if self._state == _ACTIVE:
            self._limiter._release(self)

    def __repr__(self) -> str:
        state = ("active", "settled", "released")[self._state]
        return f"<Permit {self.pool} #{self.seq} {state} reserved={dict(self.reserved)}>"


@final
class _Acquire:
    """``async with limiter.acquire(...)``; also usable as ``await`` for the bare permit."""

    __slots__ = ("_args", "_limiter", "_permit", "_plain")

    def __init__(self, limiter: Limiter, args: tuple[Any, ...], plain: _Plain | None = None) -> None:
        # checked here, before anything is enqueued: a bad priority met in the queue's
        # ordering would raise there and leave its waiter behind, wedging the pool
        if type(args[0]) is not str or type(args[2]) is not int or args[3] is not None:
            _check_args(*args)
        self._limiter = limiter
        self._args = args
        self._plain = plain
        self._permit: Permit | None = None

    async def __aenter__(self) -> Permit:
        limiter = self._limiter
        # uncontended: admitted at once, without a coroutine for the waiting path
        permit = None
        if limiter._backend is None:
            if self._plain is not None:  # (no local: a waiter must not keep the tuple alive)
                permit = limiter._admit_plain(self._args[0], self._plain)
            else:
                permit = limiter._admit_at_once(*self._args)
        if permit is None:
            permit = await limiter._acquire(*self._full_args())
        self._permit = permit
        return permit

    def _full_args(self) -> tuple[Any, ...]:
        args = self._args
        plain = self._plain
        if args[1] is None and plain is not None:
            demand = Demand(
                input_tokens=plain[0],
                max_tokens=plain[1],
                cache_read_input_tokens=plain[2],
                cache_creation_input_tokens=plain[3],
                expected_output_tokens=plain[4],
            )
            args = self._args = (args[0], demand, *args[2:])
            self._plain = None  # a waiter holds one form of its demand, not two
        return args

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        permit = self._permit
        if permit is not None and permit._state == _ACTIVE:
            self._limiter._release(permit)

    def __await__(self) -> Any:
        return self._limiter._acquire(*self._full_args()).__await__()

    # The blocking form too, so the special endpoints (count_tokens, batches) can be
    # gated from threads: ``with limiter.acquire_count_tokens() as permit:``.
    def __enter__(self) -> Permit:
        self._permit = self._limiter._acquire_blocking(*self._full_args())
        return self._permit

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        permit = self._permit
        if permit is not None and permit._state == _ACTIVE:
            self._limiter._release(permit)


@final
class Limiter:
    """Gates requests to the Messages API so they stay inside the organization's limits.

    ``preset`` (``"tier-1"`` .. ``"tier-4"``, ``"start"``, ``"build"``,
    ``"scale"``) gives the starting limits; without one the limiter starts at
    Tier 1 and learns the real limits from the first responses' ``-limit``
    headers. ``limits`` overrides per pool, e.g. ``{"sonnet-4.x": {"requests":
    50, "input_tokens": 30000, "output_tokens": 8000, "tokens": 20000}}`` (a
    ``tokens`` entry adds a combined limit, such as a workspace's); a key may
    also be a model class or id (``"sonnet-4"``, ``"claude-sonnet-4-5"``) and a
    dimension ``rpm``, ``itpm`` or ``otpm``. Anything else is a ``ConfigurationError``.

    Under asyncio and trio alike::

        limiter = Limiter("tier-2")
        async with limiter.acquire("claude-sonnet-4-5", input_tokens=1200, max_tokens=1024) as permit:
            response = await send()
            permit.observe(response.headers)
            permit.settle(response.usage)

    Options: ``output_rule`` (how OTPM counts), ``burst`` (fraction of a
    minute a bucket holds; ``adaptive_burst`` shrinks it after a 429 the model
    did not predict and grows it back after ``burst_recovery`` clean seconds),
    ``warmup`` (seconds of slow start from ``warmup_floor`` of the rate),
    ``wallet_balance`` (credits of a prepaid wallet), ``opening`` (seconds
    of the limit a new pool spends before its first response's headers show
    how much the server holds: a server may enforce a minute's limit over
    a few seconds, so a minute's burst at once can meet 429s; the first
    report lifts the level to what the server holds; default: a full
    bucket), ``clock`` (a
    zero-argument function returning seconds; default: the event loop's clock
    in async code, ``time.monotonic`` in threads), ``on_event`` (called with a
    ``LimiterEvent`` for grants, pauses, resyncs, 429s..., once the limiter's
    lock is let go, so it may call back in), ``backfill_window``. What a user
    should hear of (429s, pauses, limits learned) is also logged at INFO on the
    ``ratekeeper`` logger (``_events.EventLog``).
    """

    def __init__(
        self,
        preset: str | None = None,
        *,
        rules: AccountingRules | None = None,
        output_rule: OutputRule | str | None = None,
        limits: Mapping[str, Mapping[str, float]] | None = None,
        batch: bool = True,
        burst: float = 1.0,
        adaptive_burst: bool = True,
        burst_recovery: float = 60.0,
        warmup: float | None = None,
        warmup_floor: float = 0.1,
        wallet_balance: float | None = None,
        learn_limits: bool = True,
        backfill_window: int = 16,
        opening: float | None = None,
        clock: Callable[[], float] | None = None,
        on_event: Callable[[LimiterEvent], None] | None = None,
        backend: object = None,
    ) -> None:
        bind = getattr(backend, "_bind_limiter", None)
        if backend is not None and bind is None:
            raise ConfigurationError(
                f"backend must be a ratekeeper backend such as RedisBackend, got {backend!r}"
            )
        if rules is not None and output_rule is not None:
            raise ConfigurationError("give either rules or output_rule, not both")
        if isinstance(output_rule, str):
            try:
                output_rule = OutputRule(output_rule)
            except ValueError:
                choices = ", ".join(r.value for r in OutputRule)
                raise ConfigurationError(
                    f"unknown output_rule {output_rule!r}; choose one of: {choices}"
                ) from None
        self._rules = rules or AccountingRules(output_rule=output_rule or OutputRule.MAX_TOKENS)
        self._preset = preset
        if preset is not None:
            spend_cap(preset)  # an unknown preset raises the presets module's error, listing the names
        if warmup is not None and not warmup > 0:
            raise ConfigurationError(f"warmup must be a positive number of seconds, got {warmup!r}")
        if not 0 < warmup_floor <= 1:
            raise ConfigurationError(f"warmup_floor must be in (0, 1], got {warmup_floor!r}")
        if backfill_window < 0:
            raise ConfigurationError(f"backfill_window must be >= 0, got {backfill_window!r}")
        if opening is not None and not 0 < opening <= 60:
            raise ConfigurationError(f"opening must be a number of seconds in (0, 60], got {opening!r}")
        self._opening = opening
        Pool("check", {}, now=0.0, burst=burst)  # validates burst with the pool's own message
        for pool_name, dims in (limits or {}).items():
            for dim, value in dict(dims).items():  # under the names the user wrote; not at first acquire
                if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < math.inf:
                    raise ConfigurationError(
                        f"limits[{pool_name!r}][{dim!r}] must be a positive finite number, got {value!r}"
                    )
        self._overrides = limit_overrides(limits or {})
        self._batch = batch
        self._burst = burst
        self._adaptive = adaptive_burst
        self._burst_recovery = burst_recovery
        self._warmup = warmup
        self._warmup_floor = warmup_floor
        self._warm_start: float | None = None
        self._learn = learn_limits
        self._window = backfill_window
        self._clock = clock
        self._on_event = on_event
        self._events_log = EventLog(log)
        # with a hook, a lock that runs it once let go (a hook may call back in; see HookLock)
        self._hook_lock = HookLock(self._call_hook) if on_event is not None else None
        self._lock: threading.Lock | HookLock = self._hook_lock or threading.Lock()
        self._pools: dict[str, _PoolRuntime] = {}
        self._model_pool: dict[str, str] = {}
        # the same, straight to the runtime, for the uncontended path (filled by _runtime_for)
        self._model_runtime: dict[str, _PoolRuntime] = {}
        self._seq = itertools.count()
        self._wallet: TokenBucket | None = None
        if wallet_balance is not None:
            self._wallet = _wallet_bucket(wallet_balance)
        self._spend_until: float | None = None
        self._spend_resets_at: _dt.datetime | None = None
        self._unified_warned: set[tuple[str | None, str | None]] = set()
        # subscription rejections by claim: until when, so pools made later are held too
        self._unified_holds: dict[str | None, float] = {}
        self._async_clock_ok: bool | None = None
        self._thread_offset = 0.0
        # remote mode: every permit operation goes to the backend's engine (_remote.py)
        self._backend: RemoteEngine | None = bind(self) if bind is not None else None

    # ------------------------------------------------------------------ clock

    def _now(self) -> float:
        clock = self._clock
        if clock is not None:
            return clock()
        loop = _running_loop()
        if loop is not None:  # asyncio: what anyio.current_time() returns, without its lookups
            return loop.time()
        try:
            now = anyio.current_time()
        except (RuntimeError, sniffio.AsyncLibraryNotFoundError):
            # a plain thread: time.monotonic, moved onto the event loop's clock as last seen
            # (asyncio's is time.monotonic itself; trio's is offset from it)
            return time.monotonic() + self._thread_offset
        self._thread_offset = now - time.monotonic()
        return now

    # ------------------------------------------------------------------ pools

    def _runtime_for(self, model: str, now: float) -> _PoolRuntime:
        if len(self._model_runtime) >= MAX_REMEMBERED:
            # 100k distinct model ids held 15.8 MB: forget the lookups (pools stay; a model
            # is looked up again in the presets at its next request)
            self._model_runtime.clear()
            self._model_pool.clear()
        rt = self._runtime_for_model(model, now)
        self._model_runtime[model] = rt
        return rt

    def _runtime_for_model(self, model: str, now: float) -> _PoolRuntime:
        name = self._model_pool.get(model)
        if name is not None:
            return self._pools[name]
        if model in self._overrides and model not in self._pools:
            rt = self._new_pool(model, self._overrides[model], AccountingRules(), now)
            self._model_pool[model] = model
            return rt
        try:
            ml = limits_for(self._preset or _DEFAULT_PRESET, model)
        except UnknownModelError:
            if self._preset is not None:
                raise
            # no preset: start from the newer scheme for classes Tier 1 doesn't list
            ml = limits_for(_FALLBACK_PRESET, model)
        pool_name = ml.pool
        rt_existing = self._pools.get(pool_name)
        if rt_existing is None:
            base = {
                "requests": float(ml.rpm),
                "input_tokens": float(ml.itpm),
                "output_tokens": float(ml.otpm),
            }
            base.update(self._overrides.get(pool_name, {}))
            rules = _rules_with(self._rules, ml.cache_reads_count)
            rt_existing = self._new_pool(pool_name, base, rules, now)
        self._model_pool[model] = pool_name
        return rt_existing

    def _new_pool(
        self, name: str, limits: Mapping[str, float], rules: AccountingRules, now: float
    ) -> _PoolRuntime:
        scale = self._warm_scale(now)
        pool = Pool(name, limits, now=now, burst=self._burst, rate_scale=scale)
        if scale < 1.0:
            for bucket in pool.buckets.values():
                bucket.set_level(bucket.capacity * scale, now)
        if self._opening is not None:
            # how much the server's bucket holds is not known before its first report: the
            # first wave spends only ``opening`` seconds of the limit, whatever the interval it
            # is enforced over; that report then lifts the level to what the server holds
            for dim, bucket in pool.buckets.items():
                bucket.set_level(min(bucket.level_at(now), pool.limits[dim] * self._opening / 60.0), now)
        rt = _PoolRuntime(pool, rules, now)
        self._pools[name] = rt
        for claim, until in self._unified_holds.items():
            if until > now and _unified_targets(claim, {name: rt}, None):
                pool.pause(until, f"subscription limit ({claim})")
        return rt

    def _special_pool(self, name: str, limits: Mapping[str, float], now: float) -> _PoolRuntime:
        rt = self._pools.get(name)
        if rt is None:
            rt = _PoolRuntime(Pool(name, limits, now=now), self._rules)
            self._pools[name] = rt
        return rt

    def _warm_scale(self, now: float) -> float:
        if self._warmup is None:
            return 1.0
        if self._warm_start is None:
            self._warm_start = now
        progress = (now - self._warm_start) / self._warmup
        if progress >= 1.0:
            return 1.0
        return self._warmup_floor + (1.0 - self._warmup_floor) * max(0.0, progress)

    def _apply_warmup(self, now: float) -> None:
        if self._warmup is None:
            return
        scale = self._warm_scale(now)
        for rt in self._pools.values():
            rt.pool.scale_rates(scale * rt.share, now)
        if scale >= 1.0:
            self._warmup = None

    def pool_of(self, model: str) -> str:
        """The name of the shared pool ``model`` draws from (e.g. ``"sonnet-4"``)."""
        with self._lock:
            return self._runtime_for(model, self._now()).pool.name

    def set_limits(self, pool_or_model: str, **limits: float) -> None:
        """Change a pool's per-minute limits by hand: ``set_limits("sonnet-4", requests=100)``.

        State is brought up to date first, then the change applies, then the
        waiters that can now go are woken.
        """
        with self._lock:
            now = self._now()
            rt = self._pools.get(pool_or_model) or self._runtime_for(pool_or_model, now)
            scale = self._warm_scale(now) * rt.share  # a warm-up or a cut share goes on applying
            for dim, value in limits.items():
                rt.pool.set_limit(dim, float(value), now, rate_scale=scale)
            self._emit("limit_change", rt, now, dict(limits))
            if self._backend is not None:
                self._backend.set_limits(rt, limits)
            else:
                self._fail_impossible(rt)
                self._dispatch(rt, now)

    # ------------------------------------------------------------------ acquire

    def acquire(
        self,
        model: str,
        *,
        input_tokens: int = 0,
        max_tokens: int = 0,
        cache_read_input_tokens: int = 0,
        cache_creation_input_tokens: int = 0,
        expected_output_tokens: int | None = None,
        service_tier: str | None = None,
        credits: float = 0.0,
        priority: int = 0,
        timeout: float | None = None,
    ) -> _Acquire:
        """Wait until the model's pool can admit the request, then hold a ``Permit``.

        ``input_tokens`` is the uncached input, ``cache_read_input_tokens`` and
        ``cache_creation_input_tokens`` the predicted cache split. ``priority``
        orders the queue (higher first; FIFO within a level). ``service_tier``
        ``"priority"`` draws on Priority Tier limits too. Raises
        ``CapacityExceeded`` at once for a cost no bucket could ever admit,
        ``AcquireTimeout`` after ``timeout`` seconds, ``SpendLimitReached`` and
        ``InsufficientCredits`` when waiting cannot help.
        """
        plain = _plain(
            input_tokens,
            max_tokens,
            cache_read_input_tokens,
            cache_creation_input_tokens,
            expected_output_tokens,
        )
        if plain is not None and service_tier != "priority" and credits == 0.0:
            # the common request: its checks are done, the Demand is built only if it must wait
            return _Acquire(self, (model, None, priority, timeout), plain)
        demand = _demand(
            input_tokens,
            max_tokens,
            cache_read_input_tokens,
            cache_creation_input_tokens,
            expected_output_tokens,
            service_tier,
            credits,
        )
        return _Acquire(self, (model, demand, priority, timeout))

    def acquire_demand(
        self, model: str, demand: Demand, *, priority: int = 0, timeout: float | None = None
    ) -> _Acquire:
        """Like ``acquire`` with a ready ``Demand`` (for example from ``TokenEstimator``)."""
        plain = None
        if not demand.priority and not demand.credits:
            plain = (
                demand.input_tokens,
                demand.max_tokens,
                demand.cache_read_input_tokens,
                demand.cache_creation_input_tokens,
                demand.expected_output_tokens,
            )
        return _Acquire(self, (model, demand, priority, timeout), plain)

    def acquire_sync(
        self,
        model: str,
        demand: Demand | None = None,
        *,
        input_tokens: int = 0,
        max_tokens: int = 0,
        cache_read_input_tokens: int = 0,
        cache_creation_input_tokens: int = 0,
        expected_output_tokens: int | None = None,
        service_tier: str | None = None,
        credits: float = 0.0,
        priority: int = 0,
        timeout: float | None = None,
    ) -> _Acquire:
        """The blocking form, for synchronous code in threads: ``with limiter.acquire_sync(...) as p:``.

        It takes the same keywords as ``acquire`` and ``acquire_nowait``
        (``acquire_sync(model, input_tokens=1200, max_tokens=1024)``), or a
        ready ``Demand`` in their place.

        In a worker thread started by anyio it waits in the event loop; in any
        other thread it waits on the thread itself, with ``time.monotonic``
        (which is asyncio's clock too) moved onto the clock the event loop last
        showed (trio's is offset from it), so threads and tasks can share a
        limiter.
        """
        if demand is None:
            return self.acquire(
                model,
                input_tokens=input_tokens,
                max_tokens=max_tokens,
                cache_read_input_tokens=cache_read_input_tokens,
                cache_creation_input_tokens=cache_creation_input_tokens,
                expected_output_tokens=expected_output_tokens,
                service_tier=service_tier,
                credits=credits,
                priority=priority,
                timeout=timeout,
            )
        given = (input_tokens, max_tokens, cache_read_input_tokens, cache_creation_input_tokens, credits)
        if any(given) or expected_output_tokens is not None or service_tier is not None:
            raise ConfigurationError("acquire_sync: give either a Demand or the token keywords, not both")
        return _Acquire(self, (model, demand, priority, timeout))

    def acquire_nowait(
        self,
        model: str,
        *,
        input_tokens: int = 0,
        max_tokens: int = 0,
        cache_read_input_tokens: int = 0,
        cache_creation_input_tokens: int = 0,
        expected_output_tokens: int | None = None,
        service_tier: str | None = None,
        credits: float = 0.0,
    ) -> Permit:
        """Admit the request now or raise ``WouldBlock`` (with the earliest retry time)."""
        if type(model) is not str:  # (no _Acquire here to check it; the rest are constants)
            _check_args(model, None, 0, None)
        if self._backend is None and service_tier != "priority" and credits == 0.0:
            plain = _plain(
                input_tokens,
                max_tokens,
                cache_read_input_tokens,
                cache_creation_input_tokens,
                expected_output_tokens,
            )
            if plain is not None and (permit := self._admit_plain(model, plain)) is not None:
                return permit
        demand = _demand(
            input_tokens,
            max_tokens,
            cache_read_input_tokens,
            cache_creation_input_tokens,
            expected_output_tokens,
            service_tier,
            credits,
        )
        if self._backend is not None:
            return self._backend.acquire_nowait(model, demand)
        return self._nowait_local(model, demand)

    def _nowait_local(self, model: str, demand: Demand) -> Permit:
        """``acquire_nowait`` on this process's own pools (also the Redis path's fallback)."""
        with self._lock:
            now = self._now()
            rt, draws, credit = self._prepare(model, demand, now)
            wait = rt.pool.wait_time(draws, now)
            if rt.queued or wait > 0.0:
                reason = rt.pool.pause_reason if rt.pool.paused_until > now else ""
                raise WouldBlock(rt.pool.name, wait, reason)
            return self._grant_now(rt, model, draws, credit, now)

    def _prepare(
        self, model: str, demand: Demand, now: float
    ) -> tuple[_PoolRuntime, dict[str, float], float]:
        if type(model) is not str:  # else it fails deep in the presets, naming nothing
            raise TypeError(f"model must be a str, got {type(model).__name__}")
        if self._spend_until is not None:
            self._check_spend(now)
        if self._warmup is not None:
            self._apply_warmup(now)
        if isinstance(demand, _BatchDemand) or model == "count_tokens":
            rt = self._pools[model]
            draws = {"requests": 1.0}
            if isinstance(demand, _BatchDemand):
                draws["queued_requests"] = float(demand.requests)
            rt.pool.check(draws)
            return rt, draws, 0.0
        rt = self._runtime_for(model, now)
        cost = rt.rules.admission_cost(demand)
        draws = _draws(cost)
        try:
            rt.pool.check(draws)
        except CapacityExceeded as exc:
            raise _for_model(model, exc) from None
        credit = cost.credits
        if credit:
            self._check_wallet(credit, now)
        return rt, draws, credit

    def _grant_now(
        self, rt: _PoolRuntime, model: str, draws: dict[str, float], credit: float, now: float
    ) -> Permit:
        rt.pool.take(draws, now)
        if credit and self._wallet is not None:
            self._wallet.charge(credit, now)
        seq = next(self._seq)
        rt.record(now, draws)
        permit = Permit(self, rt, model, draws, credit, seq, now)
        rt.in_flight[seq] = permit
        rt.granted += 1
        if self._on_event is not None:
            self._emit("grant", rt, now, {"waited": 0.0})
        rt.note_grant(permit, now)
        return permit

    def _admit_at_once(
        self, model: str, demand: Demand, priority: int, timeout: float | None
    ) -> Permit | None:
        """``_acquire``'s first step: the permit if nobody waits and the buckets can take it now."""
        with self._lock:
            now = self._now()
            rt, draws, credit = self._prepare(model, demand, now)
            if not rt.queued and rt.pool.wait_time(draws, now) == 0.0:
                rt.waits.add(0.0)
                return self._grant_now(rt, model, draws, credit, now)
        return None

    def _admit_plain(self, model: str, plain: _Plain) -> Permit | None:
        """``_admit_at_once`` for an ordinary request, with no intermediate objects.

        None sends the caller down the general path, which admits, waits or says
        what is wrong: a model not seen yet, a queue, a pause, a short bucket, a
        draw over a limit, a spend limit or warm-up in force, a strange clock.
        """
        lock = self._lock
        lock.acquire()  # not ``with``: this path is measured in nanoseconds, and ``with`` costs ~100
        try:
            rt = self._model_runtime.get(model)
            if rt is None or rt.queued or self._spend_until is not None or self._warmup is not None:
                return None
            clock = self._clock
            if clock is None and (loop := _running_loop()) is not None:
                now = loop.time()
            else:
                now = self._now()
                if not -math.inf < now < math.inf:
                    return None
            input_tokens, max_tokens, cache_read, cache_write, expected = plain
            if rt.cache_reads_count:
                input_tokens += cache_read
            inp = float(input_tokens + cache_write)
            out = float(max_tokens) if rt.reserves_max_tokens else float(min(expected or 0, max_tokens))
            if rt.pool.take_plain(inp, out, now) is None:
                return None
            if inp or out:
                draws = {"requests": 1.0, "input_tokens": inp, "output_tokens": out, "tokens": inp + out}
            else:
                draws = {"requests": 1.0, "input_tokens": inp, "output_tokens": out}
            rt.waits.add(0.0)
            seq = next(self._seq)
            rt.admitted.add_request(now, 1.0, inp, out)  # rt.record(now, draws), unrolled
            permit = Permit(self, rt, model, draws, 0.0, seq, now)
            rt.in_flight[seq] = permit
            rt.granted += 1
            if self._on_event is not None:
                self._emit("grant", rt, now, {"waited": 0.0})
            rt.note_grant(permit, now)
            return permit
        finally:
            lock.release()

    async def _acquire(self, model: str, demand: Demand, priority: int, timeout: float | None) -> Permit:
        if self._backend is not None:
            return await self._backend.acquire(model, demand, priority, timeout)
        with self._lock:
            now = self._now()
            rt, draws, credit = self._prepare(model, demand, now)
            if not rt.queued and rt.pool.wait_time(draws, now) == 0.0:
                rt.waits.add(0.0)
                return self._grant_now(rt, model, draws, credit, now)
            if timeout is not None and timeout <= 0:
                raise AcquireTimeout(rt.pool.name, timeout)
            waiter = self._enqueue(rt, draws, priority, now, credit)
            waiter.permit = None
            self._bind_async(waiter)
            self._dispatch(rt, now)
        deadline = math.inf if timeout is None else now + timeout
        try:
            return await self._wait_async(rt, waiter, model, credit, deadline, timeout)
        except BaseException:
            with self._lock:
                self._abandon(rt, waiter, self._now())
            raise

    def _bind_async(self, waiter: _Waiter) -> None:
        waiter.loop_thread = threading.get_ident()
        if sniffio.current_async_library() == "trio":
            import trio

            waiter.threadsafe = trio.lowlevel.current_trio_token().run_sync_soon
        else:
            import asyncio

            waiter.threadsafe = asyncio.get_running_loop().call_soon_threadsafe

    async def _wait_async(
        self,
        rt: _PoolRuntime,
        waiter: _Waiter,
        model: str,
        credit: float,
        deadline: float,
        timeout: float | None,
    ) -> Permit:
        while True:
            with self._lock:
                now = self._now()
                permit = self._collect(rt, waiter, model, credit, now, deadline, timeout)
                if permit is not None:
                    return permit
                event = anyio.Event()
                waiter.event = event
                until = deadline
                if rt.head() is waiter and rt.next_wake < until:
                    until = rt.next_wake
            if until == math.inf:
                await event.wait()
            else:
                with anyio.move_on_after(max(0.0, until - now)):
                    await event.wait()
            if not event.is_set():
                with self._lock:
                    if waiter.state == _WAITING:
                        self._dispatch(rt, self._now())

    def _collect(
        self,
        rt: _PoolRuntime,
        waiter: _Waiter,
        model: str,
        credit: float,
        now: float,
        deadline: float,
        timeout: float | None,
    ) -> Permit | None:
        """Under the lock: the waiter's permit if granted, an error if failed, None to keep waiting."""
        if waiter.state == _GRANTED:
            permit = Permit(self, rt, model, waiter.draws, credit, waiter.seq, now)
            placeholder = rt.in_flight.pop(waiter.seq, None)
            if placeholder is not None:  # from the grant: its time and its place among our charges
                permit.started_at = placeholder.started_at
                permit._mark = placeholder._mark
                permit._send = placeholder._send
            rt.in_flight[waiter.seq] = permit
            waiter.permit = permit
            return permit
        if waiter.state == _FAILED:
            assert waiter.error is not None
            if isinstance(waiter.error, CapacityExceeded):
                raise _for_model(model, waiter.error)
            raise waiter.error
        if now >= deadline:
            self._abandon(rt, waiter, now)
            raise AcquireTimeout(rt.pool.name, timeout if timeout is not None else 0.0)
        return None

    def _acquire_blocking(self, model: str, demand: Demand, priority: int, timeout: float | None) -> Permit:
        try:
            sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            pass
        else:
            raise ConfigurationError(
                "acquire_sync blocks; in async code use `async with limiter.acquire(...)`"
            )
        try:
            return anyio.from_thread.run(self._acquire, model, demand, priority, timeout)
        except RuntimeError as exc:
            if "not running in a worker thread" not in str(exc).lower() and "event loop" not in str(exc):
                raise
        return self._acquire_thread(model, demand, priority, timeout)

    def _acquire_thread(self, model: str, demand: Demand, priority: int, timeout: float | None) -> Permit:
        if self._backend is not None:
            return self._backend.acquire_thread(model, demand, priority, timeout)
        with self._lock:
            now = self._now()
            rt, draws, credit = self._prepare(model, demand, now)
            if not rt.queued and rt.pool.wait_time(draws, now) == 0.0:
                rt.waits.add(0.0)
                return self._grant_now(rt, model, draws, credit, now)
            waiter = self._enqueue(rt, draws, priority, now, credit)
            waiter.sync_event = threading.Event()
            self._dispatch(rt, now)
        deadline = math.inf if timeout is None else now + timeout
        try:
            while True:
                with self._lock:
                    now = self._now()
                    permit = self._collect(rt, waiter, model, credit, now, deadline, timeout)
                    if permit is not None:
                        return permit
                    waiter.sync_event.clear()
                    until = deadline
                    if rt.head() is waiter and rt.next_wake < until:
                        until = rt.next_wake
                woke = waiter.sync_event.wait(None if until == math.inf else max(0.0, until - now))
                if not woke:
                    with self._lock:
                        if waiter.state == _WAITING:
                            self._dispatch(rt, self._now())
        except BaseException:
            with self._lock:
                self._abandon(rt, waiter, self._now())
            raise

    def _enqueue(
        self, rt: _PoolRuntime, draws: dict[str, float], priority: int, now: float, credit: float = 0.0
    ) -> _Waiter:
        waiter = _Waiter(draws, priority, next(self._seq), now)
        waiter.credit = credit
        dq = rt.queue.get(priority)
        if dq is None:
            dq = rt.queue[priority] = deque()
        dq.append(waiter)
        rt.queued += 1
        return waiter

    def _abandon(self, rt: _PoolRuntime, waiter: _Waiter, now: float) -> None:
        """A waiter leaves (cancelled, timed out, failed): nothing it held stays reserved."""
        if waiter.state == _WAITING:
            waiter.state = _GONE
            rt.queued -= 1
            self._dispatch(rt, now)
        elif waiter.state == _GRANTED:
            permit = waiter.permit
            if permit is None:
                # granted but the task never picked it up: it never left, give it all back
                rt.in_flight.pop(waiter.seq, None)
                rt.pool.give_back(waiter.draws, now)
                rt.granted -= 1
                rt.record(now, waiter.draws, -1.0, counted=False)
                if waiter.credit and self._wallet is not None:
                    self._wallet.give_back(waiter.credit, now)
                waiter.state = _GONE
                self._dispatch(rt, now)
            elif permit._state == _ACTIVE and not permit.sent:
                self._release_locked(permit, now)

    # ------------------------------------------------------------------ scheduling

    def _dispatch(self, rt: _PoolRuntime, now: float) -> None:
        """Grant every waiter that can go now; wake exactly those, plus a new head."""
        if self._warmup is not None:
            self._apply_warmup(now)
        if not rt.queued:  # nobody waits: drop what is left of the cancelled and the granted
            if rt.queue:
                rt.queue.clear()
            rt.next_wake = math.inf
            return
        pool = rt.pool
        old_head = rt.head()
        while True:
            head = rt.head()
            if head is None:
                rt.next_wake = math.inf
                return
            wait = pool.wait_time(head.draws, now)
            if wait > 0.0:
                break
            self._grant_waiter(rt, head, now)
        rt.next_wake = now + wait
        # Every request draws one request token: when even that would delay the head, none can pass.
        if self._window and pool.fits_without_delaying(_ONE_REQUEST, head.draws, wait, now):
            # Look at up to ``window`` live waiters behind the head. The ones granted or gone
            # met on the way are dropped from the queue, so they never use up the window.
            budget = self._window
            for dq in rt.ordered():
                kept: list[_Waiter] = []
                while dq and budget:
                    w = dq.popleft()
                    if w.state != _WAITING:
                        continue
                    if w is not head:
                        budget -= 1
                        if pool.fits_without_delaying(w.draws, head.draws, wait, now):
                            self._grant_waiter(rt, w, now)
                            continue
                    kept.append(w)
                dq.extendleft(reversed(kept))
                if not budget:
                    break
        if head is not old_head or head.event is None or not head.event.is_set():
            head.wake()  # the head re-plans its timer

    def _grant_waiter(self, rt: _PoolRuntime, w: _Waiter, now: float) -> None:
        wallet = self._wallet
        if w.credit and wallet is not None:
            # checked again now: other requests may have drawn on the wallet while this one waited
            balance = wallet.level_at(now)
            if balance < w.credit:
                w.state = _FAILED
                w.error = InsufficientCredits(w.credit, max(balance, 0.0))
                rt.queued -= 1
                w.wake()
                return
            wallet.charge(w.credit, now)
        rt.pool.take(w.draws, now)
        w.state = _GRANTED
        rt.queued -= 1
        rt.granted += 1
        rt.waits.add(now - w.enqueued_at)
        rt.record(now, w.draws)
        w.seq = next(self._seq)  # permits are numbered in the order they are admitted
        # a placeholder so observe() of earlier permits counts this one as in flight
        rt.in_flight[w.seq] = _placeholder(self, rt, w, now)
        self._emit("grant", rt, now, {"waited": now - w.enqueued_at})  # a long wait is said at INFO
        w.wake()

    def _fail_impossible(self, rt: _PoolRuntime) -> None:
        """After a limit went down, the waiters whose cost can no longer ever fit fail at once."""
        for dq in rt.queue.values():
            for w in dq:
                if w.state == _WAITING:
                    try:
                        rt.pool.check(w.draws)
                    except CapacityExceeded as exc:
                        w.state = _FAILED
                        w.error = exc
                        rt.queued -= 1
                        w.wake()

    def _fail_all(self, error_for: Callable[[], BaseException]) -> None:
        for rt in self._pools.values():
            for dq in rt.queue.values():
                for w in dq:
                    if w.state == _WAITING:
                        w.state = _FAILED
                        w.error = error_for()
                        rt.queued -= 1
                        w.wake()
                dq.clear()
            rt.next_wake = math.inf

    # ------------------------------------------------------------------ settlement

    def _settle_observing(
        self, permit: Permit, usage: object, credits: float | None, headers: object
    ) -> Cost:
        """``settle`` with a complete answer's headers: settle, read the headers, then wake."""
        if self._backend is not None:  # the Redis engine reads a report before the settlement
            permit.observe(headers)
            return permit._settle(usage, credits, wake=True)
        cost = permit._settle(usage, credits, wake=False)
        permit.sent = True
        permit.response_status = 200
        self._observe(headers, status=200, body=None, permit=permit, runtime=permit._runtime)
        rt = permit._runtime
        with self._lock:
            self._dispatch(rt, self._now())  # whoever the refund lets in, now that it is read
        return cost

    def _settle(self, permit: Permit, usage: Usage, credits: float | None, *, wake: bool = True) -> Cost:
        if self._backend is not None:
            return self._backend.settle(permit, usage, credits)
        with self._lock:
            now = self._now()
            rt = permit._runtime
            priority = "priority_output_tokens" in permit.reserved  # _draws sets both or neither
            actual = rt.rules.settled_cost(usage, priority=priority, credits=credits)
            new = _draws(actual)
            for dim, amount in permit._charged.items():
                if dim not in _RESYNC_DIMS:  # not usage (a batch's queue slots): stays as charged
                    new[dim] = amount
            diff = _diff(permit._charged, new)
            estimated = permit._charged.get("input_tokens", 0.0)
            if estimated > 0.0:
                rt.shortfalls.append(max(0.0, (new.get("input_tokens", 0.0) - estimated) / estimated))
            rt.pool.give_back(diff, now)
            if diff:
                rt.record(now, diff, -1.0)
                if permit.sent:
                    rt.changes.append((now, diff, *_drawn(permit)))
            if self._wallet is not None and permit.credits and credits is not None:
                self._wallet.give_back(permit.credits - credits, now) if permit.credits >= credits else (
                    self._wallet.charge(credits - permit.credits, now)
                )
            permit._charged = new
            permit._state = _SETTLED
            rt.in_flight.pop(permit.seq, None)
            self._grow_burst(rt, now)
            if wake:
                self._dispatch(rt, now)
            return actual

    def _settle_plain(
        self, permit: Permit, uncached: int, output: int, read: int, write: int, *, wake: bool = True
    ) -> Cost:
        """``_settle`` for a permit of requests and tokens only, without intermediate objects."""
        lock = self._lock
        lock.acquire()  # not ``with``: see _admit_plain
        try:
            if permit._state != _ACTIVE:  # settled or released by another thread meanwhile
                if permit._state == _SETTLED:
                    raise ConfigurationError("this permit is already settled")
                return Cost()
            charged = permit._charged
            rt = permit._runtime
            pool = rt.pool
            inp = float(uncached + write + read) if rt.cache_reads_count else float(uncached + write)
            out = float(output)
            estimated = charged.get("input_tokens", 0.0)
            give_in = estimated - inp
            give_out = charged.get("output_tokens", 0.0) - out
            if estimated > 0.0:
                rt.shortfalls.append(max(0.0, -give_in / estimated))
            if give_in >= 0.0 and give_out >= 0.0 and pool.burst == 1.0 and rt.share == 1.0 and not rt.queued:
                # Only refunds, and nobody to wake: no clock is read. A refund leaves the
                # same level whether it is added before or after the refill since the
                # bucket's last update (both clamp at capacity), so each bucket takes it
                # at its own last time; a charge could not (it must follow the refill).
                now = -math.inf
            else:
                clock = self._clock
                if clock is None and (loop := _running_loop()) is not None:
                    now = loop.time()
                else:
                    now = self._now()
                    if not -math.inf < now < math.inf:
                        now = -math.inf  # a broken clock: no time passes, nothing is lost
            if give_in or give_out:
                pool.give_back_plain(give_in, give_out, now)
                rt.admitted.add_request(now, 0.0, -give_in, -give_out)  # rt.record(now, diff, -1.0)
                if permit.sent:  # for replaying after a report (see _resync): when it happened
                    at = now if now > -math.inf else self._now()
                    change = {
                        "input_tokens": give_in,
                        "output_tokens": give_out,
                        "tokens": give_in + give_out,
                    }
                    rt.changes.append((at, change, *_drawn(permit)))
            if inp or out:
                permit._charged = {
                    "requests": 1.0,
                    "input_tokens": inp,
                    "output_tokens": out,
                    "tokens": inp + out,
                }
            else:
                permit._charged = {"requests": 1.0, "input_tokens": inp, "output_tokens": out}
            permit._state = _SETTLED
            del rt.in_flight[permit.seq]
            if now > -math.inf:
                if pool.burst < 1.0 or rt.share < 1.0:
                    self._grow_burst(rt, now)
                if wake and (rt.queued or rt.queue or self._warmup is not None):
                    self._dispatch(rt, now)
            elif wake and rt.queue:
                rt.queue.clear()  # what _dispatch does when nobody waits: drop the cancelled
            return request_cost(inp, out)
        finally:
            lock.release()

    def _grow_burst(self, rt: _PoolRuntime, now: float) -> None:
        """Traffic flows cleanly: after ``burst_recovery`` seconds without a 429 the burst grows back."""
        if rt.share < 1.0 and now - rt.share_since >= SHARE_STEP_EVERY:
            rt.share = min(1.0, rt.share + SHARE_STEP)
            rt.share_since = now
            rt.pool.scale_rates(self._warm_scale(now) * rt.share, now)
            self._emit("share_change", rt, now, {"share": rt.share})
        if self._adaptive and rt.pool.burst < 1.0:
            old = rt.pool.burst
            if rt.pool.grow_burst(now, clean_for=self._burst_recovery) != old:
                self._emit("burst_change", rt, now, {"burst": rt.pool.burst})

    def _progress(self, permit: Permit, output: float) -> None:
        if permit._state != _ACTIVE:
            return
        if self._backend is not None:
            return self._backend.progress(permit, output)
        with self._lock:
            charged = permit._charged.get("output_tokens", 0.0)
            extra = output - charged
            if extra <= 0.0:
                return
            now = self._now()
            rt = permit._runtime
            more = {"output_tokens": extra, "tokens": extra}
            if "priority_output_tokens" in permit._charged:
                more["priority_output_tokens"] = extra
            rt.pool.take(more, now)
            rt.record(now, more)
            rt.changes.append((now, {d: -a for d, a in more.items()}, math.inf, math.inf))
            for dim, amount in more.items():
                permit._charged[dim] = permit._charged.get(dim, 0.0) + amount

    def _release(self, permit: Permit) -> None:
        if self._backend is not None:
            return self._backend.release(permit)
        with self._lock:
            if permit._state == _ACTIVE:
                self._release_locked(permit, self._now())

    def _release_locked(self, permit: Permit, now: float) -> None:
        rt = permit._runtime
        charged = permit._charged
        if not permit.sent:
            refund = dict(charged)
        elif permit.response_status is not None and permit.response_status >= 400:
            refund = {k: v for k, v in charged.items() if k != "requests"}
        else:
            refund = {}
        if refund:
            rt.pool.give_back(refund, now)
            rt.record(now, refund, -1.0, counted=False)
            if permit._send is not None:  # refused (or never sent): it drew nothing but the request
                drew = permit._send[2]
                for dim in refund:
                    drew.pop(dim, None)
        if self._wallet is not None and permit.credits and (not permit.sent or refund):
            self._wallet.give_back(permit.credits, now)
        permit._state = _RELEASED
        rt.in_flight.pop(permit.seq, None)
        self._dispatch(rt, now)

    # ------------------------------------------------------------------ feedback

    def observe(
        self, headers: object, *, model: str | None = None, status: int = 200, body: object = None
    ) -> RateLimitSnapshot:
        """Feed a response that no permit covers (another client's, a probe...).

        Without ``model`` the headers can only pause or fail (429, spend limit,
        subscription status); with it they also resync that model's pool,
        counting all of this limiter's in-flight requests as unseen by the server.
        """
        if type(status) is not int:
            _check_status(status)
        runtime = None
        if model is not None:
            with self._lock:
                runtime = self._runtime_for(model, self._now())
        return self._observe(headers, status=status, body=body, permit=None, runtime=runtime)

    def _observe(
        self,
        headers: object,
        *,
        status: int,
        body: object,
        permit: Permit | None,
        runtime: _PoolRuntime | None,
    ) -> RateLimitSnapshot:
        if self._backend is not None:
            return self._backend.observe(headers, status=status, body=body, permit=permit, runtime=runtime)
        snap = parse_headers(headers, received_at=_dt.datetime.now(_dt.UTC))  # type: ignore[arg-type]
        error_type, error_code, message = error_fields(body)
        with self._lock:
            now = self._now()
            skew = snap.clock_skew or 0.0
            if error_code == "enforced_spend_limit_reached":
                self._spend_limit(snap, now, message)
            if runtime is not None:
                fitted = self._resync(runtime, snap, permit, now)
                if status == 429 and error_code != "enforced_spend_limit_reached":
                    self._on_429(runtime, snap, permit, now, fitted)
                elif status == 529 or error_type == "overloaded_error":
                    self._on_529(runtime, snap, now)
                elif status < 400:
                    runtime.overload_backoff = 0.0
                    self._grow_burst(runtime, now)
            if snap.unified is not None:
                self._on_unified(snap, now, skew, status, runtime)
            if snap.quota is not None:
                self._on_quota(snap, permit, now)
            if status == 402 and self._wallet is not None:
                # the proxy refused: the wallet holds less than this reservation
                held = permit.credits if permit is not None else 0.0
                self._wallet.resync(max(0.0, held - 1.0), now)
        return snap

    def _resync(self, rt: _PoolRuntime, snap: RateLimitSnapshot, permit: Permit | None, now: float) -> bool:
        """Correct the pool from a response's headers; True if they showed a smaller burst."""
        limits = snap.limits()
        if not limits:
            return False
        pool = rt.pool
        changed = False
        # The server's bucket size, from "-reset is when the bucket is full again":
        # capacity = remaining + rate * (reset - date). The smallest upper bound over
        # the dimensions tells a shorter enforcement interval before any 429 does.
        date = snap.server_date
        upper = math.inf
        burst_floor = 0.0
        unseen: dict[str, float] = {}
        # What the model had drawn and the server had not counted when the request reached it
        # (``early``), and now (``unsent``). A request sent within ``transit`` of a moment may
        # or may not have reached the server by then: what was granted before this request
        # (``early_maybe``) or after it (``late_maybe``), and what may be on its way now
        # (``unsent_maybe``). Corrections count each the safe way, the evidence of the moment
        # as a blur either way.
        early: dict[str, float] = {}
        early_maybe: dict[str, float] = {}
        late_maybe: dict[str, float] = {}
        unsent: dict[str, float] = {}
        unsent_maybe: dict[str, float] = {}
        replay: list[tuple[float, Mapping[str, float]]] | None = None
        refused = False
        counted_since: dict[str, float] = {}
        if permit is not None:
            refused = permit.response_status is not None and permit.response_status >= 400
            if refused:
                # refused: the server never took its tokens, and release() will give them back
                for dim, amount in permit._charged.items():
                    if dim != "requests":
                        early[dim] = early.get(dim, 0.0) + amount
                        unsent[dim] = unsent.get(dim, 0.0) + amount
            # a report taken as its answer left counts every request sent a round trip before
            # now, and a round trip is no longer than the quickest answer took
            sent_at = permit.sent_at
            if sent_at == sent_at:
                rt.fastest = min(rt.fastest, now - sent_at)
            else:
                sent_at = permit.started_at
            transit = min(rt.fastest, MAX_TRANSIT)
            admitted, seq = sent_at, permit.seq
            for other in rt.in_flight.values():
                if not other.sent:
                    _add(unsent, other._charged)
                    if other.seq < seq:  # drawn in the model before this request, never sent
                        _add(early, other._charged)
            oldest = min(admitted, now) - transit
            floor = oldest - _GRANT_TO_SEND
            for t, other_seq, charged, granted in reversed(rt.sends):
                if granted < floor:
                    break
                if t < oldest or other_seq == seq:  # most of them: tested before a look-up
                    continue
                held = rt.in_flight.get(other_seq)
                if held is not None and not held.sent:
                    continue
                if t > now - transit:
                    _add(unsent_maybe, charged)
                if abs(t - admitted) <= transit:
                    _add(early_maybe if other_seq < seq else late_maybe, charged)
                elif t > admitted and other_seq < seq:  # reached the server after this request
                    _add(early, charged)
            replay = rt.changes_since(admitted, seq)
            # everything we charged (or refunded) since this request was granted, in flight or
            # done; what was given back since without the server ever counting it stays in
            # (if admitted before this request, the server never had it; if after, counting it
            # lowers more than needed: safe)
            unseen = rt.spent_since(permit._mark)
            counted_since = rt.admitted.since(permit._mark[0])
            if refused:  # did it cost an RPM token? unknown: earlier and later values do not compare
                rt.moment.restart(now)
        else:
            for other in rt.in_flight.values():  # a response of unknown age: all in flight is unseen
                _add(unseen, other._charged)
        stale = False  # a bucket full again before the answer was sent: not a report of then
        # First the bucket's shape: the limits the headers give, and its size from "-reset is
        # when the bucket is full again" (capacity = remaining + rate * (reset - date)); the
        # smallest upper bound over the dimensions tells a shorter enforcement interval
        # before any 429 does. The levels below are then read against that shape.
        for dim in _RESYNC_DIMS:
            info = limits.get(dim)
            if info is None:
                continue
            if info.limit is not None and info.limit > 0 and self._learn:
                if dim == "tokens":
                    combined = pool.limits.get("input_tokens", 0.0) + pool.limits.get("output_tokens", 0.0)
                    learn = dim in pool.limits or info.limit < combined
                else:
                    learn = dim in pool.limits or dim.startswith("priority")
                scale = self._warm_scale(now) * rt.share
                if learn and pool.set_limit(dim, float(info.limit), now, rate_scale=scale):
                    changed = True
                    self._fail_impossible(rt)
                    self._emit("limit_change", rt, now, {dim: info.limit})
            if info.remaining is not None and dim in pool.limits and pool.buckets[dim].rate > 0.0:
                lowest = info.remaining - (0.0 if dim == "requests" else ROUNDING_MARGIN)
                # the server's bucket holds at least what it reports left
                burst_floor = max(burst_floor, lowest / pool.limits[dim])
                if permit is not None and info.reset is not None and date is not None:
                    # (a response of unknown age bounds nothing)
                    age = max(0.0, now - permit.started_at)
                    upper = min(upper, burst_bound(info.remaining, info.reset, date, dim, pool, age))
                    if not stale and (date - info.reset).total_seconds() > _RESET_ROUNDING:
                        stale = True
        if stale and not (
            permit is not None and permit.response_status is not None and permit.response_status >= 400
        ):
            rt.moment.reset_before_date()
        fitted = False
        upper = fitted_burst(upper, burst_floor)
        if self._adaptive and upper < 1.0 and pool.fit_burst(upper, now):
            fitted = changed = True
            rt.shrink_seq = next(self._seq)
            self._emit("burst_change", rt, now, {"burst": pool.burst, "from": "headers"})
        elif self._adaptive and pool.widen_burst(burst_floor, now):
            changed = True
            self._emit("burst_change", rt, now, {"burst": pool.burst, "from": "headers"})
        if permit is not None:
            self._check_room(rt, permit, now)
        for dim in _RESYNC_DIMS:
            info = limits.get(dim)
            if info is None:
                continue
            if info.remaining is not None and dim in pool.limits:
                margin = 0.0 if dim == "requests" else ROUNDING_MARGIN
                # the report's lowest reading, always: keeping a level anywhere in the rounding
                # band could admit up to twice the rounding more than the server has left
                lowest = info.remaining - margin
                bucket = pool.buckets[dim]
                level = bucket.level_at(now)
                if permit is not None:  # the report's age is known: see _feedback
                    since = unseen.get(dim, 0.0)
                    then = early.get(dim, 0.0)
                    then_maybe = early_maybe.get(dim, 0.0)
                    # (what was sent within a round trip before this request may reach the server
                    # after it: requests sent together arrive in any order)
                    if replay is not None:
                        admission = admission_estimate(
                            lowest - then_maybe,
                            admitted,
                            now,
                            # at one instant, what gives back first: a bucket full then throws
                            # it away, as the server's may have (the other order could mint)
                            sorted(((t, c.get(dim, 0.0)) for t, c in replay), key=_gives_back_first),
                            rate=bucket.rate,
                            capacity=bucket.capacity,
                            pending=unsent.get(dim, 0.0),
                        )
                    else:  # the rings do not reach back to the admission: all refill first, the safe side
                        admission = (
                            min(lowest + bucket.rate * max(0.0, now - admitted), bucket.capacity)
                            - since
                            - then
                            - then_maybe
                        )
                    now_maybe = unsent_maybe.get(dim, 0.0)
                    response = response_estimate(lowest, unsent.get(dim, 0.0) + now_maybe)
                    if (
                        dim in _EVIDENCE_DIMS
                        and (dim == "requests" or rt.reserves_max_tokens)
                        and not refused  # taken as it arrived: either reading fits it
                    ):
                        limit = pool.limits[dim]
                        after_maybe = late_maybe.get(dim, 0.0)
                        rt.moment.note(
                            dim,
                            lowest - then + (after_maybe - then_maybe) / 2,
                            response + now_maybe / 2,
                            admission_blur=(then_maybe + after_maybe) / 2,
                            response_blur=now_maybe / 2,
                            admitted_at=admitted,
                            now=now,
                            # what the server counted of ours: refusals and unsent given back
                            spent=rt.counted_total(dim),
                            spent_since=counted_since.get(dim, 0.0),
                            rate=limit / 60.0,
                            tolerance=_EVIDENCE_TOLERANCE[dim],
                            ceiling=limit,
                        )
                    # a refusal is answered as it arrives: its report is of then, either way
                    order = float(seq)
                    moments = ((admitted, order), (admitted, order) if refused else (now, order))
                else:
                    # a response of unknown age: the report less everything that could be
                    # missing from it, under either reading; it lifts nothing
                    admission = response = lowest - unseen.get(dim, 0.0)
                    moments = NO_READINGS.moments
                readings = rt.readings.get(dim, NO_READINGS)
                target, readings = correction(
                    level,
                    bucket.capacity,
                    (admission, response),
                    moments,
                    rt.moment.belief,
                    readings,
                    latest=None if permit is not None else ((now, math.inf), (now, math.inf)),
                )
                if target > level and (
                    (dim in _PRODUCED and not rt.reserves_max_tokens)
                    or (dim in _ESTIMATED and permit is not None and permit._state == _ACTIVE)
                ):
                    # Not lifted: output charged as it is produced is still to come (requests under
                    # way will draw it, and no report shows that yet); and a report read before
                    # its own request settles already counts that request's real input, which
                    # the settlement will give back again as our estimate's excess (a stream's
                    # report, at its first byte: its max_tokens reservation is the server's too).
                    target = level
                if target > level:  # a reading refuted: what it took off comes back
                    delta = bucket.resync(target, now, allow_increase=True)
                else:
                    delta = pool.resync(dim, target, now)
                after = level + delta
                if after != target:  # clamped (debt, capacity): the readings stay where they were
                    shift = target - after
                    readings = Readings(
                        (readings.offsets[0] + shift, readings.offsets[1] + shift), readings.moments
                    )
                rt.readings[dim] = readings
                if delta != 0.0:
                    changed = True
                    if delta < 0.0:
                        rt.resyncs += 1
                    else:
                        rt.raised += 1
                    self._emit("resync", rt, now, {"dimension": dim, "delta": delta})
        if changed:
            self._dispatch(rt, now)
        return fitted

    def _check_room(self, rt: _PoolRuntime, permit: Permit, now: float) -> None:
        """Say once per dimension when the server's bucket is smaller than a request reserves."""
        for dim, amount in permit.reserved.items():
            bucket = rt.pool.buckets.get(dim)
            if bucket is None or amount <= bucket.capacity or dim in rt.too_small:
                continue
            rt.too_small.add(dim)
            detail = {"dimension": dim, "capacity": bucket.capacity, "reserved": amount}
            self._emit("bucket_too_small", rt, now, detail)

    def _on_429(
        self, rt: _PoolRuntime, snap: RateLimitSnapshot, permit: Permit | None, now: float, fitted: bool
    ) -> None:
        rt.rate_limited += 1
        pool = rt.pool
        # Predicted: the server's bucket is as large as ours (else ``fitted``: the headers
        # showed a shorter enforcement interval and the burst was just resized to it) and
        # its remaining shows a dimension this request doesn't fit in, so the refusal is
        # explained by usage we now know about. Otherwise the server enforces a shorter
        # interval than our burst assumes, in a way the headers did not show: halve it.
        predicted = permit is not None and not fitted and explained_by_remaining(snap, permit.reserved)
        if predicted:
            rt.rate_limited_predicted += 1
            if self._adaptive and (permit is None or permit.seq > rt.share_seq):
                # others draw on the pool too: count on less of each refill (once per event:
                # the 429s of requests admitted before the last cut are old news)
                rt.share_seq = next(self._seq)
                rt.share = max(MIN_SHARE, rt.share * SHARE_DECREASE)
                rt.share_since = now
                pool.scale_rates(self._warm_scale(now) * rt.share, now)
                self._emit("share_change", rt, now, {"share": rt.share})
        elif self._adaptive and not fitted and (permit is None or permit.seq > rt.shrink_seq):
            # once per event: the 429s of requests admitted before the last shrink are old news
            burst = pool.shrink_burst(now)
            rt.shrink_seq = next(self._seq)
            self._emit("burst_change", rt, now, {"burst": burst})
        retry = snap.retry_after
        retry = 1.0 if retry is None else capped_pause(retry, "a 429's retry-after")
        if pool.pause(now + retry, "429 rate_limit_error"):
            self._emit("pause", rt, now, {"seconds": retry, "reason": "429"})
        self._emit("rate_limited", rt, now, {"predicted": predicted, "retry_after": retry})
        self._dispatch(rt, now)

    def _on_529(self, rt: _PoolRuntime, snap: RateLimitSnapshot, now: float) -> None:
        rt.overloaded += 1
        backoff = min(8.0, max(0.5, rt.overload_backoff * 2.0))
        rt.overload_backoff = backoff
        wait = (
            capped_pause(snap.retry_after, "a 529's retry-after") if snap.retry_after is not None else backoff
        )
        if rt.pool.pause(now + wait, "529 overloaded"):
            self._emit("pause", rt, now, {"seconds": wait, "reason": "529"})
        self._emit("overloaded", rt, now, {"backoff": wait})
        self._dispatch(rt, now)

    def _on_unified(
        self,
        snap: RateLimitSnapshot,
        now: float,
        skew: float,
        status: int,
        runtime: _PoolRuntime | None,
    ) -> None:
        unified = snap.unified
        assert unified is not None
        if unified.status == "rejected" or (status == 429 and unified.status is not None):
            wait = unified_wait(snap, skew)
            claim = unified.representative_claim
            if len(self._unified_holds) >= MAX_REMEMBERED:  # server-sent claims: keep the live ones
                self._unified_holds = {c: u for c, u in self._unified_holds.items() if u > now}
                if len(self._unified_holds) >= MAX_REMEMBERED:
                    self._unified_holds.clear()
            self._unified_holds[claim] = max(self._unified_holds.get(claim, -math.inf), now + wait)
            targets = _unified_targets(claim, self._pools, runtime)
            for rt in targets:
                if rt.pool.pause(now + wait, f"subscription limit ({unified.representative_claim})"):
                    self._emit("pause", rt, now, {"seconds": wait, "reason": "unified rejected"})
                self._dispatch(rt, now)
        elif unified.status == "allowed_warning":
            key = (unified.representative_claim, unified.reset.isoformat() if unified.reset else None)
            if key not in self._unified_warned:
                if len(self._unified_warned) >= MAX_REMEMBERED:  # server-sent: bounded
                    self._unified_warned.clear()
                self._unified_warned.add(key)
                name = runtime.pool.name if runtime is not None else "*"
                log.warning(
                    "subscription usage warning: %s window, resets %s",
                    unified.representative_claim,
                    unified.reset,
                )
                detail = {"claim": unified.representative_claim, "reset": unified.reset}
                self._hook(LimiterEvent("unified_warning", name, now, detail))

    def _on_quota(self, snap: RateLimitSnapshot, permit: Permit | None, now: float) -> None:
        quota = snap.quota
        assert quota is not None
        balance = quota.balance if quota.balance is not None else quota.balance_reserved
        if balance is None:
            return
        if self._wallet is None:
            self._wallet = _wallet_bucket(max(balance, 0.0))
            self._wallet.set_level(balance, now)
        since = permit.seq if permit is not None else -1
        unseen = sum(
            p.credits
            for rt in self._pools.values()
            for p in rt.in_flight.values()
            if p.seq > since and p.active
        )
        wallet = self._wallet
        if balance > wallet.capacity:
            wallet.set_limits(now, capacity=balance)
        wallet.resync(balance - unseen, now, allow_increase=True)
        if permit is not None:
            # The reported balance already holds this request: settle() must not move it again
            # by our own estimate, only from the proxy's reservation (on a stream) to the charge.
            if quota.balance is not None:
                permit.credits = 0.0
            elif quota.credits_reserved is not None:
                permit.credits = quota.credits_reserved

    def _check_wallet(self, credit: float, now: float) -> None:
        wallet = self._wallet
        if wallet is not None and wallet.level_at(now) < credit:
            raise InsufficientCredits(credit, max(wallet.level_at(now), 0.0))

    def _spend_limit(self, snap: RateLimitSnapshot, now: float, message: str) -> None:
        base = snap.server_date or _dt.datetime.now(_dt.UTC)
        resets = first_of_next_month(base)
        self._spend_resets_at = resets
        self._spend_until = now + (resets - base).total_seconds()
        log.error("monthly spend limit reached; usage resumes at %s", resets.isoformat())
        self._hook(LimiterEvent("spend_limit", "*", now, {"resets_at": resets}))
        self._fail_all(lambda: SpendLimitReached(resets, message))

    def _check_spend(self, now: float) -> None:
        if self._spend_until is not None:
            if now < self._spend_until:
                assert self._spend_resets_at is not None
                raise SpendLimitReached(self._spend_resets_at)
            self._spend_until = None

    def _emit(self, kind: str, rt: _PoolRuntime, now: float, detail: Mapping[str, Any]) -> None:
        """Every event of both engines passes here: to the log (``_events.EventLog``) and the hook."""
        self._events_log.record(kind, rt.pool.name, now, detail)
        if kind != "grant" and kind != "resync":  # those two are counted already
            seen = rt.events.get(kind)
            rt.events[kind] = (now, 1 if seen is None else seen[1] + 1, dict(detail))
        if self._on_event is not None:
            self._hook(LimiterEvent(kind, rt.pool.name, now, dict(detail)))

    def _hook(self, event: LimiterEvent) -> None:
        if self._hook_lock is not None:
            self._hook_lock.post(event)  # run once the lock is let go

    def _call_hook(self, event: LimiterEvent) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a broken hook must not break admission
                log.exception("on_event hook raised")

    # ------------------------------------------------------------------ special endpoints

    def acquire_count_tokens(self, rpm: float | None = None, *, timeout: float | None = None) -> _Acquire:
        """Gate a ``count_tokens`` call by its own RPM (the preset's, or ``rpm``)."""
        with self._lock:
            if "count_tokens" not in self._pools:
                limit = rpm or count_tokens_rpm(self._preset or _DEFAULT_PRESET) or 100
                self._special_pool("count_tokens", {"requests": float(limit)}, self._now())
        return _Acquire(self, ("count_tokens", Demand(), 0, timeout))

    def acquire_batch(self, requests: int, *, timeout: float | None = None) -> _Acquire:
        """Gate a Message Batches create call: the batch RPM and the queued-requests cap.

        The permit's ``queued_requests`` stay taken after the block until
        ``batch_finished(requests)`` is called for the batch's end.
        ``acquire_batch(0)`` gates the other batch endpoints by the RPM alone.
        """
        with self._lock:
            if "batches" not in self._pools:
                bl = batch_limits(self._preset or _DEFAULT_PRESET)
                self._special_pool("batches", {"requests": float(bl.rpm)}, self._now())
                self._pools["batches"].pool.buckets["queued_requests"] = TokenBucket(
                    float(bl.max_queued_requests), 0.0, now=self._now(), debt_limit=0.0
                )
                self._pools["batches"].pool.limits["queued_requests"] = float(bl.max_queued_requests)
        return _Acquire(self, ("batches", _BatchDemand(requests), 0, timeout))

    def batch_finished(self, requests: int) -> None:
        """A batch ended (or was cancelled): its requests leave the processing queue."""
        with self._lock:
            rt = self._pools.get("batches")
            if rt is None:
                return
            now = self._now()
            rt.pool.give_back({"queued_requests": float(requests)}, now)
            if self._backend is not None:
                self._backend.give_back(rt, {"queued_requests": float(requests)})
            else:
                self._dispatch(rt, now)

    # ------------------------------------------------------------------ introspection

    def statistics(self) -> LimiterStatistics:
        """A frozen snapshot of every pool: limits, levels, queue, waits, 429s, utilization."""
        with self._lock:
            now = self._now()
            taken_at = _dt.datetime.now(_dt.UTC)
            pools = {}
            for name, rt in self._pools.items():
                pool = rt.pool
                admitted = rt.admitted.totals(now)
                levels = pool.levels(now)
                used = {d: max(0.0, admitted.get(d, 0.0)) for d, lim in pool.limits.items() if lim > 0}
                paused_for = max(0.0, pool.paused_until - now)
                pools[name] = PoolStatistics(
                    name=name,
                    limits=dict(pool.limits),
                    levels=levels,
                    capacity={d: b.capacity for d, b in pool.buckets.items()},
                    burst=pool.burst,
                    in_flight=sum(1 for p in rt.in_flight.values() if p.active),
                    queue_depth=rt.queued,
                    granted=rt.granted,
                    wait_p50=rt.waits.quantile(0.5),
                    wait_p99=rt.waits.quantile(0.99),
                    rate_limited=rt.rate_limited,
                    rate_limited_predicted=rt.rate_limited_predicted,
                    overloaded=rt.overloaded,
                    resyncs=rt.resyncs,
                    paused_for=paused_for,
                    pause_reason=pool.pause_reason if pool.paused_until > now else "",
                    utilization={d: _offered_share(u, levels.get(d, 0.0)) for d, u in used.items()},
                    share=rt.share,
                    used=used,
                    paused_until=_wall(taken_at, paused_for) if paused_for > 0.0 else None,
                    events={
                        kind: EventSummary(kind, count, now - t, _wall(taken_at, t - now), detail)
                        for kind, (t, count, detail) in rt.events.items()
                    },
                    raised=rt.raised,
                    report_moment=rt.moment.belief,
                )
            wallet = self._wallet.level_at(now) if self._wallet is not None else None
            return LimiterStatistics(
                time=now,
                pools=pools,
                wallet_balance=wallet,
                spend_limited=self._spend_until is not None and now < self._spend_until,
                taken_at=taken_at,
            )

    def __repr__(self) -> str:
        with self._lock:
            pools = ", ".join(
                f"{name}: {rt.queued} waiting, {len(rt.in_flight)} in flight"
                for name, rt in self._pools.items()
            )
        return f"<Limiter preset={self._preset!r} {pools or 'no pools yet'}>"


# ---------------------------------------------------------------------- helpers


def _offered_share(used: float, level: float) -> float:
    """Of what a bucket offered over the window (what it admitted plus what it holds), the share used."""
    offered = used + max(level, 0.0)
    return min(1.0, used / offered) if offered > 0.0 else 0.0


def _wall(at: _dt.datetime, seconds: float) -> _dt.datetime:
    """``at`` moved by ``seconds`` (to the calendar's end or start if it falls beyond)."""
    try:
        return at + _dt.timedelta(seconds=seconds)
    except OverflowError:
        return (_dt.datetime.max if seconds > 0 else _dt.datetime.min).replace(tzinfo=_dt.UTC)


def _check_status(status: object) -> None:
    """Raise unless ``status`` is an HTTP status code (an int: "429" would fail deep, naming nothing)."""
    if not isinstance(status, int) or isinstance(status, bool):
        raise TypeError(f"status must be an int HTTP status code, got {type(status).__name__} {status!r:.20}")


def _check_args(model: object, demand: object, priority: object, timeout: object) -> None:
    """Raise for an ``acquire`` argument of the wrong type (or a NaN timeout), naming it."""
    if not isinstance(model, str):
        raise TypeError(f"model must be a str, got {type(model).__name__}")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise TypeError(f"priority must be an int, got {type(priority).__name__}")
    if timeout is not None:
        if not isinstance(timeout, int | float) or isinstance(timeout, bool):
            raise TypeError(f"timeout must be a number of seconds or None, got {type(timeout).__name__}")
        if timeout != timeout:  # NaN: no deadline ever passes, the wait would spin
            raise ValueError("timeout must be a number of seconds or None, got nan")


def _demand(
    input_tokens: int,
    max_tokens: int,
    cache_read_input_tokens: int,
    cache_creation_input_tokens: int,
    expected_output_tokens: int | None,
    service_tier: str | None,
    credits: float,
) -> Demand:
    """The ``Demand`` behind ``acquire``'s and ``acquire_nowait``'s keyword arguments."""
    return Demand(
        input_tokens=input_tokens,
        max_tokens=max_tokens,
        cache_read_input_tokens=cache_read_input_tokens,
        cache_creation_input_tokens=cache_creation_input_tokens,
        expected_output_tokens=expected_output_tokens,
        priority=service_tier == "priority",
        credits=credits,
    )


class _BatchDemand:
    """Marker demand for batch creation: 1 request and ``requests`` queue slots."""

    __slots__ = ("requests",)

    def __init__(self, requests: int) -> None:
        # 0: the other batch endpoints (retrieve, list, results, cancel), gated by the RPM only
        if requests < 0 or requests > 100_000:
            raise ConfigurationError(f"a batch holds 1 to 100,000 requests, got {requests!r}")
        self.requests = requests


def _plain(
    input_tokens: object, max_tokens: object, cache_read: object, cache_write: object, expected: object
) -> _Plain | None:
    """The fast path's demand if the counts are plain non-negative ints (else ``Demand`` checks them)."""
    if (
        type(input_tokens) is int
        and type(max_tokens) is int
        and type(cache_read) is int
        and type(cache_write) is int
        # 0 iff all are non-negative and below 2**53 (a float holds them; 10**400 would not)
        and (input_tokens | max_tokens | cache_read | cache_write) >> 53 == 0
        and (expected is None or (type(expected) is int and 0 <= expected <= _MAX_COUNT))
    ):
        return (input_tokens, max_tokens, cache_read, cache_write, expected)
    return None


def _usage_counts(usage: object) -> tuple[int, int, int, int] | None:
    """Uncached input, output, cache reads, cache writes: for ``Usage``, the SDK's or a mapping.

    None for anything ``Usage.from_any`` should look at (it says what is wrong).
    """
    if type(usage) is Usage:
        return (
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_input_tokens,
            usage.cache_creation_input_tokens,
        )
    if isinstance(usage, Mapping):
        get = usage.get
        counts = (
            get("input_tokens"),
            get("output_tokens"),
            get("cache_read_input_tokens") or 0,
            get("cache_creation_input_tokens") or 0,
        )
    else:
        counts = (
            getattr(usage, "input_tokens", None),
            getattr(usage, "output_tokens", None),
            getattr(usage, "cache_read_input_tokens", None) or 0,
            getattr(usage, "cache_creation_input_tokens", None) or 0,
        )
    for n in counts:
        if type(n) is not int or not 0 <= n <= _MAX_COUNT:  # 10**400 would overflow a float
            return None
    return counts  # type: ignore[return-value]


def _for_model(model: str, exc: CapacityExceeded) -> CapacityExceeded:
    """The same error, naming the model the caller asked for as well as its pool."""
    error = CapacityExceeded(f"{model} ({exc.pool} pool)", exc.dimension, exc.cost, exc.capacity)
    error.pool = exc.pool
    return error


def _gives_back_first(event: tuple[float, float]) -> tuple[float, float]:
    return event[0], -event[1]


def _drawn(permit: Permit) -> tuple[float, float]:
    """When and in which order ``permit`` drew on the server, as its ``sends`` entry says."""
    send = permit._send
    return (send[0], float(permit.seq)) if send is not None else (permit.started_at, float(permit.seq))


def _server_side(change: Mapping[str, float], reserves_max_tokens: bool) -> Mapping[str, float]:
    """What of a settlement the server itself makes, for a request it counted on its own.

    Output reserved as ``max_tokens`` the server gives back too; input it counted itself
    (our estimate's error is ours), and so output estimated under the real-time rule.
    """
    out = {d: a for d, a in change.items() if d not in ("input_tokens", "tokens")}
    if not reserves_max_tokens:
        out.pop("output_tokens", None)
    elif "tokens" in change:
        out["tokens"] = change.get("output_tokens", 0.0)
    return out


def _add(totals: dict[str, float], amounts: Mapping[str, float]) -> None:
    for dim, amount in amounts.items():
        totals[dim] = totals.get(dim, 0.0) + amount


def _placeholder(limiter: Limiter, rt: _PoolRuntime, w: _Waiter, now: float) -> Permit:
    permit = Permit(limiter, rt, "", w.draws, w.credit, w.seq, now)
    rt.note_grant(permit, now)
    return permit


def _rules_with(rules: AccountingRules, cache_reads_count: bool) -> AccountingRules:
    if rules.cache_reads_count == cache_reads_count:
        return rules
    import attrs

    return attrs.evolve(rules, cache_reads_count=cache_reads_count)


def _wallet_bucket(balance: float) -> TokenBucket:
    if not balance >= 0:
        raise ConfigurationError(f"wallet_balance must be a non-negative number, got {balance!r}")
    # a wallet does not refill: rate 0, and it may not go into debt
    return TokenBucket(max(balance, 1.0), 0.0, level=balance, debt_limit=0.0)


def _unified_targets(
    claim: str | None, pools: Mapping[str, _PoolRuntime], runtime: _PoolRuntime | None
) -> list[_PoolRuntime]:
    """The pools a subscription rejection holds: model-specific claims hold only that family."""
    if claim in ("seven_day_opus", "seven_day_sonnet"):
        family = claim.rsplit("_", 1)[1]
        chosen = [rt for name, rt in pools.items() if name.startswith(family)]
    else:
        chosen = [rt for name, rt in pools.items() if name not in ("count_tokens", "batches")]
    if runtime is not None and runtime not in chosen:
        chosen.append(runtime)
    return chosen
