"""The gate's state: waiters in line, permits in flight, and each pool's ``PoolRuntime``.

They refer to one another (a waiter ends as a permit, a permit belongs to a pool's
runtime, which holds its waiters and permits in flight), so they live together;
what a permit needs of its limiter and engine is the two protocols below, which
``Limiter`` and every ``Engine`` meet.
"""

from __future__ import annotations

import enum
import math
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol, final

import anyio
import sniffio

from ratekeeper.core._accounting import AccountingRules, Cost, OutputRule, Usage
from ratekeeper.core._feedback import MomentEvidence, Readings
from ratekeeper.core._pool import Pool
from ratekeeper.core._snapshot import LimitInfo, RateLimitSnapshot
from ratekeeper.core._stats import AdmittedWindow, Mark, WaitSamples, with_tokens
from ratekeeper.errors import ConfigurationError
from ratekeeper.gate._demand import _MAX_COUNT, _check_status, _usage_counts
from ratekeeper.gate._queue import WaiterState, WaitQueue

__all__ = ["Permit", "PermitEngine", "PermitOwner", "PermitState", "PoolRuntime", "Waiter", "WaiterState"]


class PermitEngine(Protocol):
    """What a permit calls on its engine (``gate._engine.Engine`` has all of it)."""

    def progress(self, permit: Permit, output: float) -> None: ...

    def observe(
        self,
        headers: object,
        *,
        status: int,
        body: object,
        permit: Permit | None,
        runtime: PoolRuntime | None,
    ) -> RateLimitSnapshot: ...

    def settle(self, permit: Permit, usage: Usage, credits: float | None, *, wake: bool = True) -> Cost: ...

    def settle_plain(
        self, permit: Permit, uncached: int, output: int, read: int, write: int, *, wake: bool = True
    ) -> Cost: ...

    def settle_observing(
        self, permit: Permit, usage: object, credits: float | None, headers: object
    ) -> Cost: ...

    def release(self, permit: Permit) -> None: ...


class PermitOwner(Protocol):
    """What a permit needs of its limiter: the engine to report to and the gate's clock."""

    @property
    def _engine(self) -> PermitEngine: ...

    @property
    def _now(self) -> Callable[[], float]: ...


_WAITING, _GRANTED, _FAILED, _GONE, _FALLBACK = (
    WaiterState.WAITING,
    WaiterState.GRANTED,
    WaiterState.FAILED,
    WaiterState.GONE,
    WaiterState.FALLBACK,
)


class Waiter:
    """One request waiting in a pool's queue: what it draws, its place, how to wake it.

    Parking and waking is the waiter's own business (an ``anyio.Event`` for a task,
    a ``threading.Event`` for a thread); the queue only orders waiters.
    """

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
        self.state = WaiterState.WAITING
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


def bind_async(waiter: Waiter) -> None:
    """Let ``waiter`` be woken from any thread: through its event loop's thread-safe call."""
    waiter.loop_thread = threading.get_ident()
    if sniffio.current_async_library() == "trio":
        import trio

        waiter.threadsafe = trio.lowlevel.current_trio_token().run_sync_soon
    else:
        import asyncio

        waiter.threadsafe = asyncio.get_running_loop().call_soon_threadsafe


#: How many recent sends a pool remembers for that (more than MAX_TRANSIT's worth at any rate
#: a client reaches: 256 in a quarter second is over 60,000 requests a minute).
_SENDS_KEPT: Final = 256
_SHORTFALLS_KEPT: Final = 64
#: Over the worst shortfall seen lately, what an unsettled input estimate may still fall short by.
_SHORTFALL_SLACK: Final = 0.05
#: How long after its grant a request is taken to be sent, at the most, when looking back.
_GRANT_TO_SEND: Final = 5.0


class PoolRuntime:
    """A pool, its queue and its counters: the gate's state for one shared limit.

    ``pool`` is the pure bucket model; the rest is what the gate and the feedback
    need around it (waiters, permits in flight, the recent sends and settlements a
    report is read against, what has been inferred of the server).
    """

    __slots__ = (
        "admitted",
        "cache_reads_count",
        "changes",
        "events",
        "fastest",
        "granted",
        "in_flight",
        "moment",
        "most_output",
        "next_wake",
        "on_sent",
        "overload_backoff",
        "overloaded",
        "pool",
        "queue",
        "queued",
        "raised",
        "rate_limited",
        "rate_limited_predicted",
        "readings",
        "reported",
        "reserves_max_tokens",
        "resyncs",
        "rules",
        "send_delay",
        "sends",
        "share",
        "share_seq",
        "share_since",
        "shortfalls",
        "shrink_seq",
        "too_small",
        "transit",
        "transit_seq",
        "uncounted",
        "waits",
    )

    def __init__(self, pool: Pool, rules: AccountingRules, created: float = math.nan) -> None:
        self.pool = pool
        self.rules = rules
        self.cache_reads_count = rules.cache_reads_count
        self.reserves_max_tokens = rules.output_rule is OutputRule.MAX_TOKENS
        self.most_output = 0.0  # the largest max_tokens asked under the real-time output rule
        # by priority, FIFO within one; those that left are dropped when met (see WaitQueue)
        self.queue: WaitQueue[Waiter] = WaitQueue()
        self.queued = 0
        self.in_flight: dict[int, Permit] = {}
        self.next_wake = math.inf
        self.granted = self.rate_limited = self.rate_limited_predicted = self.overloaded = 0
        self.overload_backoff = 0.0
        self.resyncs = self.raised = 0
        # the quickest answer seen from sending to its headers: no request travels longer
        self.fastest = math.inf
        # the longest shown to reach the server (0: none; grown on unforeseen 429s), and its grant order
        self.transit, self.transit_seq = 0.0, -1
        # the dimensions whose bucket was found smaller than a request's reservation (said once)
        self.too_small: set[str] = set()
        # [sent at (= granted at until sent), seq, charges, granted at, grant order] of the latest
        # grants: what reached the server after a report's moment, and what may not yet; bounded
        self.sends: deque[list[Any]] = deque(maxlen=_SENDS_KEPT)
        self.send_delay = 0.0  # the longest grant-to-send seen: how far back look_back() goes
        # (time, {dim: change}, granted at, order) of what settlements (and output charged as it is
        # produced) did to the server's buckets lately, replayed after a report (see _feedback)
        self.changes: deque[tuple[float, Mapping[str, float], float, float]] = deque(maxlen=_SENDS_KEPT)
        # by how much (a fraction) the input estimates settled lately fell short of the usage
        self.shortfalls: deque[float] = deque(maxlen=_SHORTFALLS_KEPT)
        # what the reports have shown of the moment they describe (see _feedback)
        self.moment = MomentEvidence()
        # per dimension: what each reading of the reports says, relative to the model
        self.readings: dict[str, Readings] = {}
        # per dimension: the remaining the latest report that gave one said (the server's word)
        self.reported: dict[str, float] = {}
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
        # the share of each refill counted on: others may draw too (lowered by unforeseen 429s)
        self.share = 1.0
        self.share_seq, self.share_since = -1, -math.inf
        # the engine's, if it must hear of each send (remote mode: Redis counts what was sent)
        self.on_sent: Callable[[Permit], None] | None = None
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

    def note_grant(self, permit: Permit, now: float, order: object = None) -> None:
        """Remember a grant in ``sends`` (its send time is its grant's until ``mark_sent``).

        ``order``: where the grant stands among the others (default: its seq; in remote mode
        (Redis seq, place within a prefetch), as a prefetched request's local seq does not
        compare with Redis's).
        """
        entry = [now, permit.seq, dict(permit._charged), now, permit.seq if order is None else order]
        permit._send = entry
        self.sends.append(entry)

    def look_back(self) -> float:
        """How long before a moment a request sent after it can have been granted, at the most."""
        return min(_GRANT_TO_SEND, self.send_delay)

    def changes_since(self, t0: float, seq: int) -> list[tuple[float, Mapping[str, float]]] | None:
        """This client's own changes to the server's buckets after ``t0``: requests reaching it
        (drawing) and settlements; ``None`` if the remembered ones do not reach back that far.
        ``seq`` is the reported request, sent at ``t0``: its send and those before it are in
        the report. Requests not sent yet are left out (the caller counts them at the end)."""
        out: list[tuple[float, Mapping[str, float]]] = []
        sends, changes = self.sends, self.changes
        in_flight = self.in_flight
        under = math.nan  # (the shortfalls' max, read at the first send that needs it)
        oldest = t0 - self.look_back()
        reached = len(sends) < _SENDS_KEPT
        for t, other, charged, granted, _ in reversed(sends):
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
            if held is not None and under != under:
                under = max(self.shortfalls, default=0.0) + _SHORTFALL_SLACK
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
            if t < t0:
                reached = True
                break
            if t == t0 and not (drawn_at == t0 and drawn_seq > seq):
                # (at the report's instant, only the settlement of a request granted after it
                # is certainly after it; any other may be in the report already)
                continue
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

    def spent_since(
        self, mark: tuple[Mark, Mapping[str, float]], admitted: dict[str, float] | None = None
    ) -> dict[str, float]:
        """What this client charged (or refunded) on the pool since ``mark``.

        Spent is everything charged, net of the settlements the server makes
        too; a request the server never counted keeps its charge when it is
        given back. A resync subtracts what was spent since a response's
        request was admitted: the server could not have seen it yet.
        ``admitted``: ``self.admitted.since(mark[0])`` when the caller has it already
        (copied, not changed).
        """
        admitted_then, uncounted_then = mark
        out = self.admitted.since(admitted_then) if admitted is None else dict(admitted)
        uncounted = self.uncounted
        if uncounted is not uncounted_then:
            for dim, amount in uncounted.items():
                if dim != "tokens":
                    out[dim] = out.get(dim, 0.0) + amount - uncounted_then.get(dim, 0.0)
            with_tokens(out)
        return out

    def note_reported(self, limits: Mapping[str, LimitInfo]) -> None:
        """Keep what a report says remains, per dimension, for ``statistics()``."""
        for dim, info in limits.items():
            if info.remaining is not None:
                self.reported[dim] = float(info.remaining)

    def head(self) -> Waiter | None:
        """The next waiter in this pool's line, or ``None``."""
        return self.queue.head()


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


class PermitState(enum.Enum):
    """A permit is active from its grant until settled (usage applied) or released (given back)."""

    ACTIVE = "active"
    SETTLED = "settled"
    RELEASED = "released"


_ACTIVE, _SETTLED, _RELEASED = PermitState.ACTIVE, PermitState.SETTLED, PermitState.RELEASED


@final
class Permit:
    """The right to send one request, held from admission until it is settled.

    Use it inside ``async with limiter.acquire(...) as permit:``. After the
    response, ``observe`` its headers and ``settle`` its usage; leaving the
    block without settling releases what was reserved (see ``release``).
    """

    __slots__ = (
        "_charged",
        "_engine",
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
        limiter: PermitOwner,
        runtime: PoolRuntime,
        model: str,
        draws: dict[str, float],
        credits: float,
        seq: int,
        now: float,
    ) -> None:
        self._limiter = limiter
        self._engine = limiter._engine
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
        first = not self.sent
        self.sent = True
        self.sent_at = now = self._limiter._now()
        send = self._send
        if send is not None:
            send[0] = now
            runtime = self._runtime
            if now - send[3] > runtime.send_delay:
                runtime.send_delay = now - send[3]
        on_sent = self._runtime.on_sent
        if on_sent is not None and first:  # (once: Redis adds up the sends)
            on_sent(self)

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
        self._engine.progress(self, float(output_tokens))

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
        return self._engine.observe(headers, status=status, body=body, permit=self, runtime=self._runtime)

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
        if self._state == _ACTIVE:
            if headers is not None:
                return self._engine.settle_observing(self, usage, credits, headers)
            if type(usage) is Usage and self._plain and credits is None:  # _settle's fast case, sooner
                return self._engine.settle_plain(
                    self,
                    usage.input_tokens,
                    usage.output_tokens,
                    usage.cache_read_input_tokens,
                    usage.cache_creation_input_tokens,
                )
        return self._settle(usage, credits, wake=True)

    def _settle(self, usage: object, credits: float | None, *, wake: bool) -> Cost:
        engine = self._engine
        if self._state == _ACTIVE and self._plain and credits is None:
            counts = _usage_counts(usage)
            if counts is not None:
                return engine.settle_plain(self, *counts, wake=wake)
        if self._state == _SETTLED:
            raise ConfigurationError("this permit is already settled")
        if self._state == _RELEASED:
            return Cost()
        return engine.settle(self, _settled_usage(usage, self.reserved), credits, wake=wake)

    def release(self) -> None:
        """Give back what the request did not use, without a usage report.

        A request that never left gives everything back. One that reached the
        server keeps its RPM token; after an error response its tokens are given
        back (the server refused it); after a successful response with no usage
        settled, the reservation stands (the server charged it).
        """
        if self._state == _ACTIVE:
            self._engine.release(self)

    def __repr__(self) -> str:
        state = self._state.value
        return f"<Permit {self.pool} #{self.seq} {state} reserved={dict(self.reserved)}>"


def _settled_usage(usage: object, reserved: Mapping[str, float]) -> Usage:
    """``usage`` as a ``Usage`` for a settlement of a permit that ``reserved`` that much.

    A mapping with neither count, for a permit that reserved tokens, is a mistake (``{}`` or
    a message as a dict: read as zero usage, it would refund the whole reservation); a
    batch's or count_tokens' permit, which reserved none, settles with ``{}``.
    """
    if (
        isinstance(usage, Mapping)
        and "input_tokens" not in usage
        and "output_tokens" not in usage
        and (reserved.get("input_tokens") or reserved.get("output_tokens"))
    ):
        keys = ", ".join(sorted(map(str, usage))[:8]) or "none"
        raise TypeError(
            "a usage mapping needs input_tokens or output_tokens (such as message['usage']),"
            f" got a mapping with keys: {keys}"
        )
    return Usage.from_any(usage)


def _drawn(permit: Permit) -> tuple[float, float]:
    """When and in which order ``permit`` drew on the server, as its ``sends`` entry says."""
    send = permit._send
    return (send[0], float(permit.seq)) if send is not None else (permit.started_at, float(permit.seq))


def _placeholder(limiter: PermitOwner, runtime: PoolRuntime, w: Waiter, now: float) -> Permit:
    permit = Permit(limiter, runtime, "", w.draws, w.credit, w.seq, now)
    runtime.note_grant(permit, now)
    return permit
