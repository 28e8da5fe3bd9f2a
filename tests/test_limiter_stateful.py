"""A hypothesis state machine drives one limiter against two models.

Rules: admit now (``acquire_nowait``), queue a waiter, pick up a granted
waiter, cancel one, time one out, respond (2xx, 5xx or a 429 with
``retry-after``, each with rate-limit headers), settle, release, traffic from
another client that the limiter only learns of through later headers, a
response of unknown age, and time passing.

Waiters go through the limiter's own queue functions (``_enqueue``,
``_dispatch``, ``_collect``, ``_abandon``), in the order ``_acquire_thread``
calls them, so the machine stays synchronous and exact at the instants of a
``FakeClock``.

Invariants, after every step:

* the limiter's levels equal a plain model's: one token bucket per dimension
  taking every grant, refund and extra charge, so no capacity is leaked or
  counted twice (a report moves the model as it moved the limiter: whether
  that correction is safe is the next invariant's job); once everything is
  settled and a minute has passed, every bucket is full;
* every grant was admissible in that model (and not during a pause), every
  ``WouldBlock`` was not;
* the limiter never believes it has more than the modelled server (one
  bucket per dimension holding a minute, fed our requests and the other
  client's), except for the other client's use it has not been told of yet.
  Hence it never admits what the server would refuse, and the cost admitted
  over any 60 s window stays within capacity + rate x 60 (checked on the
  exact request counts).

The modelled server reports its buckets as they were just after the request's
admission, or as they are when the answer is sent (``moment``), or either.
It takes a request's cost when it is granted (sent at once)
and gives back what the client gives back, when the client does: a settled
request's difference, an unsent one's everything, a failed one's tokens at
``release()``. A request it has no room for (the other client's use, not yet
reported) it refuses at once with a 429 whose headers leave it out, and the
client releases it at once: had the client held it while its bucket refilled
to capacity, giving it back later would credit refill the server never lost,
which no client can know. Nor does the modelled server go below zero
(headers cannot say how far it went).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, rule
from limiter_support import POOL, RATE_LIMIT_BODY, SONNET, FakeClock, headers

from ratekeeper import AcquireTimeout, Demand, Limiter, Permit, WouldBlock
from ratekeeper.gate._local import LocalEngine
from ratekeeper.gate._state import Waiter, WaiterState

LIMITS = {"requests": 50.0, "input_tokens": 30_000.0, "output_tokens": 8_000.0}
DIMS = tuple(LIMITS)
#: The server's time at the machine's clock 0 (its ``date`` and ``-reset`` headers).
EPOCH = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
RESET_HEADERS = {
    "requests": "anthropic-ratelimit-requests-reset",
    "input_tokens": "anthropic-ratelimit-input-tokens-reset",
    "output_tokens": "anthropic-ratelimit-output-tokens-reset",
}
EPS = 1e-6


class Bucket:
    """The model's token bucket: refills at limit/60 per second up to the limit, owes up to the limit."""

    def __init__(self, limit: float, now: float) -> None:
        self.cap = limit
        self.rate = limit / 60.0
        self.level = limit
        self.t = now

    def at(self, now: float) -> float:
        return self.level if now <= self.t else min(self.cap, self.level + (now - self.t) * self.rate)

    def _go(self, now: float) -> None:
        self.level, self.t = self.at(now), max(self.t, now)

    def take(self, amount: float, now: float) -> None:
        self._go(now)
        self.level = max(self.level - amount, -self.cap)

    def refund(self, amount: float, now: float) -> None:
        self._go(now)
        self.level = min(self.level + amount, self.cap)


def cost_of(demand: Demand) -> dict[str, float]:
    """What Tier 1 Sonnet is charged at admission (the 2025 max_tokens rule; cache reads are free)."""
    return {
        "requests": 1.0,
        "input_tokens": float(demand.input_tokens + demand.cache_creation_input_tokens),
        "output_tokens": float(demand.max_tokens),
    }


@dataclass
class Held:
    """A granted permit as the model sees it."""

    permit: Permit
    charged: dict[str, float]
    snapshot: dict[str, float]  # the server's levels right after its grant
    step: int  # when it was granted
    refused: bool  # the server has no room for it (we had not heard of the other client yet): a 429
    server_held: dict[str, float]  # what the modelled server holds for it
    status: int | None = None
    at: float = math.nan  # when it was granted (and reached the server)


@dataclass
class Waiting:
    waiter: Waiter
    demand: Demand
    cost: dict[str, float]
    granted_seen: bool = False


@dataclass
class Foreign:
    step: int
    amounts: dict[str, float] = field(default_factory=dict)


demands = st.builds(
    Demand,
    input_tokens=st.integers(0, 12_000),
    max_tokens=st.integers(0, 4_000),
    cache_read_input_tokens=st.sampled_from([0, 0, 5_000]),
    cache_creation_input_tokens=st.sampled_from([0, 0, 1_000]),
)


@settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
class LimiterMachine(RuleBasedStateMachine):
    permits = Bundle("permits")
    waiters = Bundle("waiters")
    #: The moment the modelled server's reports describe: its buckets just after the request's
    #: admission, when the answer is sent, or either (``mixed``, drawn per response).
    moment = "admission"

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(1_000.0)
        # a full bucket from the start: the model below is the server's full-minute bucket
        self.limiter = Limiter("tier-1", clock=self.clock, adaptive_burst=False, opening=60)
        # the machine drives the local engine's queue directly (a waiter without a task)
        engine = self.limiter._engine
        assert isinstance(engine, LocalEngine)
        self.engine = engine
        self.rt = self.limiter._pools[self.limiter.pool_of(SONNET)]
        now = self.clock()
        self.model = {d: Bucket(v, now) for d, v in LIMITS.items()}
        self.server = {d: Bucket(v, now) for d, v in LIMITS.items()}
        self.paused_until = -math.inf
        self.step = 0
        self.held: dict[int, Held] = {}  # by id(permit)
        self.waiting: list[Waiting] = []
        self.foreign: list[Foreign] = []
        self.reported_step = -1  # foreign use before this step has been reported in headers
        self.request_log: list[tuple[float, float]] = []  # (time, +1 grant / -1 unsent refund)

    # ------------------------------------------------------------ model bookkeeping

    def now(self) -> float:
        return self.clock()

    def _charge(self, amounts: Mapping[str, float], sign: float, *, server: bool = True) -> None:
        """Charge (or refund) our model and (unless ``server=False``) the server's."""
        now = self.now()
        for dim, amount in amounts.items():
            if dim not in self.model or amount == 0:
                continue
            for bucket in (self.model[dim], *((self.server[dim],) if server else ())):
                if sign > 0:
                    bucket.take(amount, now)
                else:
                    bucket.refund(amount, now)

    def _admit(self, permit: Permit, cost: dict[str, float]) -> None:
        now = self.now()
        assert now >= self.paused_until, "granted during a pause"
        for dim, amount in cost.items():
            need = min(amount, self.model[dim].cap)
            if need > 0:  # a dimension the request does not draw on may be in debt
                assert self.model[dim].at(now) >= need - EPS * max(1.0, need), f"{dim} over-admitted"
        # the other client's use we had not heard of can leave the server without room: a 429,
        # whose headers show the server without it
        refused = any(
            self.server[d].at(now) < min(a, self.server[d].cap) - EPS * max(1.0, a)
            for d, a in cost.items()
            if a > 0
        )
        server_held = {} if refused else dict(cost)
        self._charge(cost, +1, server=False)
        self._server(server_held, +1)
        snapshot = {d: b.at(now) for d, b in self.server.items()}
        self.request_log.append((now, 1.0))
        self.held[id(permit)] = Held(
            permit,
            dict(cost),
            snapshot=snapshot,
            step=self.step,
            refused=refused,
            server_held=server_held,
            at=now,
        )

    def _server(self, amounts: Mapping[str, float], sign: float) -> None:
        now = self.now()
        for dim, amount in amounts.items():
            if sign > 0:
                self.server[dim].take(amount, now)
            else:
                self.server[dim].refund(amount, now)

    def _collect_grants(self) -> None:
        """Waiters the limiter granted during the last call, in the order it granted them."""
        fresh = [w for w in self.waiting if w.waiter.state == WaiterState.GRANTED and not w.granted_seen]
        for w in sorted(fresh, key=lambda w: w.waiter.seq):
            w.granted_seen = True
            self._admit(self.rt.in_flight[w.waiter.seq], w.cost)

    def _refund_all(self, held: Held) -> None:
        self._charge(held.charged, -1, server=False)
        self._server(held.server_held, -1)

    def _after(self) -> None:
        """Take note of the grants the last call made; refused requests get their 429 at once."""
        while True:
            self._collect_grants()
            refused = [h for h in self.held.values() if h.refused and h.status is None]
            if not refused:
                return
            held = min(refused, key=lambda h: h.permit.seq)
            waiting = [w for w in self.waiting if w.granted_seen and w.waiter.seq == held.permit.seq]
            if waiting:  # still to be picked up by its task
                self._pick_up(waiting[0])
            self._respond(held, 429, retry=1)
            self._release(held, sent=True)

    def _pick_up(self, w: Waiting) -> Permit | None:
        engine = self.engine
        with engine.lock:
            permit = engine.collect(self.rt, w.waiter, SONNET, 0.0, engine.now(), math.inf, None)
        if permit is None:
            return None
        self.waiting.remove(w)
        (held,) = [h for h in self.held.values() if h.permit.seq == permit.seq and h.permit is not permit]
        del self.held[id(held.permit)]
        held.permit = permit  # the placeholder's record, now for the real permit
        self.held[id(permit)] = held
        return permit

    def _respond(self, held: Held, status: int, retry: int, late: bool = False, dated: bool = False) -> None:
        # a refusal is answered at once: its report is of its admission either way
        at_response = status != 429 and (self.moment == "response" or (self.moment == "mixed" and late))
        snap = {d: b.at(self.now()) for d, b in self.server.items()} if at_response else held.snapshot
        hdrs = headers(
            requests=(50, max(0, math.floor(snap["requests"] + EPS))),
            input_tokens=(30_000, max(0, round_thousand(snap["input_tokens"]))),
            output_tokens=(8_000, max(0, round_thousand(snap["output_tokens"]))),
            retry_after=retry if status == 429 else None,
        )
        if dated:  # the answer's date and each bucket's reset, seen from the report's moment
            taken = self.now() if at_response else held.at
            hdrs["date"] = http_date(self.now())
            for dim, name in RESET_HEADERS.items():
                full = taken + max(0.0, LIMITS[dim] - snap[dim]) / self.server[dim].rate
                hdrs[name] = rfc3339(full)
        held.status = status
        held.permit.observe(hdrs, status=status, body=RATE_LIMIT_BODY if status == 429 else None)
        self.reported_step = max(self.reported_step, self.step if at_response else held.step)
        self._adopt()
        if status == 429:
            self.paused_until = max(self.paused_until, self.now() + retry)

    def _release(self, held: Held, *, sent: bool) -> None:
        permit = held.permit
        if sent and held.status is None:
            permit.mark_sent()
        permit.release()
        del self.held[id(permit)]
        if held.status is not None and held.status >= 400:  # the tokens come back, the request stays spent
            tokens = {d: a for d, a in held.charged.items() if d != "requests"}
            self._charge(tokens, -1, server=False)
            self._server({d: a for d, a in held.server_held.items() if d != "requests"}, -1)
        elif held.status is None and not sent:  # never left
            self._refund_all(held)
            self.request_log.append((self.now(), -1.0))

    # ------------------------------------------------------------ rules

    @rule(target=permits, demand=demands)
    def admit_now(self, demand: Demand) -> Permit | object:
        self.step += 1
        cost = cost_of(demand)
        now = self.now()
        clearly_fits = now >= self.paused_until and all(
            self.model[d].at(now) >= min(a, self.model[d].cap) + EPS * max(1.0, a)
            for d, a in cost.items()
            if a > 0
        )
        try:
            permit = self.limiter.acquire_nowait(
                SONNET,
                input_tokens=demand.input_tokens,
                max_tokens=demand.max_tokens,
                cache_read_input_tokens=demand.cache_read_input_tokens,
                cache_creation_input_tokens=demand.cache_creation_input_tokens,
            )
        except WouldBlock:
            queued = any(w.waiter.state == WaiterState.WAITING for w in self.waiting)
            assert queued or not clearly_fits, "refused a request the buckets could admit"
            return multiple()  # nothing for the bundle
        self._admit(permit, cost)
        self._after()
        return permit

    @rule(target=waiters, demand=demands, priority=st.integers(-1, 1))
    def queue(self, demand: Demand, priority: int) -> Waiting | object:
        self.step += 1
        engine = self.engine
        record: Waiting | None = None
        with engine.lock:  # _acquire_thread, up to its wait
            now = engine.now()
            rt, draws, credit = engine.prepare(SONNET, demand, now)
            if not rt.queued and rt.pool.wait_time(draws, now) == 0.0:
                permit = engine.grant_now(rt, SONNET, draws, credit, now)
                self._admit(permit, cost_of(demand))
            else:
                waiter = engine.enqueue(rt, draws, priority, now, credit)
                waiter.sync_event = threading.Event()
                record = Waiting(waiter, demand, cost_of(demand))
                self.waiting.append(record)
                engine.dispatch(rt, now)
        self._after()
        return multiple() if record is None else record

    @rule(target=permits, w=waiters)
    def pick_up(self, w: Waiting) -> Permit | object:
        """The waiter's task runs again: it takes its permit if granted, else keeps waiting."""
        if w not in self.waiting:
            return multiple()
        self.step += 1
        permit = self._pick_up(w)
        return multiple() if permit is None else permit

    def _cancel(self, w: Waiting) -> None:
        if w not in self.waiting:  # picked up meanwhile (a refused one, to take its 429)
            return
        engine = self.engine
        was_granted = w.waiter.state == WaiterState.GRANTED
        with engine.lock:
            engine.abandon(self.rt, w.waiter, engine.now())
        self.waiting.remove(w)
        if was_granted:  # granted, never picked up: it never left
            seq = w.waiter.seq
            (held,) = [h for h in self.held.values() if h.permit.seq == seq]
            del self.held[id(held.permit)]
            self._refund_all(held)
            self.request_log.append((self.now(), -1.0))
        self._after()

    @rule(w=waiters)
    def cancel(self, w: Waiting) -> None:
        if w not in self.waiting:
            return
        self.step += 1
        self._cancel(w)

    @rule(w=waiters)
    def time_out(self, w: Waiting) -> None:
        if w not in self.waiting:
            return
        self.step += 1
        engine = self.engine
        if w.waiter.state == WaiterState.GRANTED:  # a grant beats the deadline: it goes on as a permit
            self._cancel(w)
            return
        with engine.lock:
            now = engine.now()
            with pytest.raises(AcquireTimeout):
                engine.collect(self.rt, w.waiter, SONNET, 0.0, now, now, 0.0)
        self.waiting.remove(w)
        self._after()

    @rule(
        permit=permits,
        status=st.sampled_from([200, 200, 200, 500, 429]),
        retry=st.integers(1, 30),
        late=st.booleans(),
        dated=st.booleans(),
    )
    def respond(self, permit: Permit, status: int, retry: int, late: bool, dated: bool) -> None:
        """The response to an earlier request, with headers as the server had it at the moment
        this machine's server reports (``moment``; for ``mixed``, at the response if ``late``),
        ``dated``: with the answer's date and the buckets' resets (to the second, cut down)."""
        held = self.held.get(id(permit))
        if held is None or held.status is not None or not permit.active:
            return
        self.step += 1
        self._respond(held, status, retry, late, dated)
        self._after()

    def _adopt(self) -> None:
        """A report with a permit: the model takes the limiter's correction as it is.

        Which correction is right depends on the moment the report describes
        and on what the limiter has inferred of it (``ratekeeper.core._feedback``);
        that it is safe is what ``never_more_than_the_server_has`` checks,
        under the reading this machine's server uses.
        """
        now = self.now()
        levels = dict(self.limiter.statistics()[POOL].levels)
        # a correction that lifted the levels let waiters in within the same call: the levels
        # read are after their grants, which ``_collect_grants`` is still to charge and check
        for w in self.waiting:
            if w.waiter.state == WaiterState.GRANTED and not w.granted_seen:
                for dim, amount in w.cost.items():
                    if dim in levels:
                        levels[dim] += amount
        for dim in DIMS:
            bucket = self.model[dim]
            bucket.level, bucket.t = levels[dim], max(bucket.t, now)

    @rule(
        permit=consumes(permits),
        extra_input=st.integers(-12_000, 2_000),
        output_share=st.floats(0, 1),
    )
    def settle(self, permit: Permit, extra_input: int, output_share: float) -> None:
        held = self.held.get(id(permit))
        if held is None or not permit.active or (held.status or 0) >= 400:
            return  # an error response is released, not settled
        self.step += 1
        if held.status is None:
            permit.observe({}, status=200)
            held.status = 200
        # more input than reserved, but never more than the server has: its headers can't go below 0
        room = max(0, math.floor(self.server["input_tokens"].at(self.now())))
        actual_in = max(0, int(held.charged["input_tokens"]) + min(extra_input, room))
        actual_out = int(held.charged["output_tokens"] * output_share)
        permit.settle({"input_tokens": actual_in, "output_tokens": actual_out})
        diff = {
            "input_tokens": held.charged["input_tokens"] - actual_in,
            "output_tokens": held.charged["output_tokens"] - actual_out,
        }
        for dim, amount in diff.items():
            if amount > 0:
                self._charge({dim: amount}, -1)
            elif amount < 0:
                self._charge({dim: -amount}, +1)
        del self.held[id(permit)]
        self._after()

    @rule(permit=consumes(permits), sent=st.booleans())
    def release(self, permit: Permit, sent: bool) -> None:
        held = self.held.get(id(permit))
        if held is None or not permit.active:
            return
        self.step += 1
        self._release(held, sent=sent)
        self._after()

    @rule(
        requests=st.integers(0, 20),
        input_tokens=st.integers(0, 20_000),
        output_tokens=st.integers(0, 6_000),
    )
    def another_client(self, requests: int, input_tokens: int, output_tokens: int) -> None:
        """Traffic from elsewhere: the server takes what it has; we hear of it only from headers."""
        self.step += 1
        now = self.now()
        used = Foreign(self.step)
        for dim, amount in (
            ("requests", requests),
            ("input_tokens", input_tokens),
            ("output_tokens", output_tokens),
        ):
            take = min(float(amount), max(0.0, math.floor(self.server[dim].at(now))))
            self.server[dim].take(take, now)
            used.amounts[dim] = take
        self.foreign.append(used)

    @rule()
    def response_of_unknown_age(self) -> None:
        """Headers with no permit (``Limiter.observe``): current; all our in-flight work counts as unseen."""
        self.step += 1
        now = self.now()
        snap = {d: b.at(now) for d, b in self.server.items()}
        self.limiter.observe(
            headers(
                requests=(50, max(0, math.floor(snap["requests"] + EPS))),
                input_tokens=(30_000, max(0, round_thousand(snap["input_tokens"]))),
                output_tokens=(8_000, max(0, round_thousand(snap["output_tokens"]))),
            ),
            model=SONNET,
        )
        self.reported_step = self.step
        self._adopt()
        self._after()

    @rule(seconds=st.sampled_from([0.05, 0.5, 1.2, 3.0, 7.5, 20.0, 61.0]))
    def time_passes(self, seconds: float) -> None:
        self.step += 1
        self.clock.advance(seconds)
        engine = self.engine
        with engine.lock:  # what the head's timer does when it fires
            engine.dispatch(self.rt, engine.now())
        self._after()

    # ------------------------------------------------------------ invariants

    @invariant()
    def levels_match_the_model(self) -> None:
        now = self.now()
        stats = self.limiter.statistics()[POOL]
        for dim in DIMS:
            assert stats.levels[dim] == pytest.approx(self.model[dim].at(now), abs=1e-6), dim
        waiting = sum(w.waiter.state == WaiterState.WAITING for w in self.waiting)
        assert stats.queue_depth == waiting
        assert stats.in_flight == sum(h.permit.active for h in self.held.values())

    @invariant()
    def never_more_than_the_server_has(self) -> None:
        now = self.now()
        unreported = {d: 0.0 for d in DIMS}
        for used in self.foreign:
            if used.step > self.reported_step:
                for dim, amount in used.amounts.items():
                    unreported[dim] += amount
        levels = self.limiter.statistics()[POOL].levels
        for dim in DIMS:
            assert levels[dim] <= self.server[dim].at(now) + unreported[dim] + 1e-6, dim

    @invariant()
    def requests_per_window_within_capacity_plus_rate(self) -> None:
        log = self.request_log
        if not log:
            return
        rate = LIMITS["requests"] / 60.0
        for i, (start, _) in enumerate(log):
            total = 0.0
            for t, n in log[i:]:
                if t - start > 60.0:
                    break
                total += n
                assert total <= LIMITS["requests"] + rate * (t - start) + 1e-6

    def teardown(self) -> None:
        """Settle everything: waiters leave, permits give back; a minute later every bucket is full."""
        while self.waiting:
            self._cancel(self.waiting[0])
        for held in list(self.held.values()):
            if held.permit.active:
                held.permit.release()
        self.clock.advance(121)  # long enough to pay back a whole minute of debt
        stats = self.limiter.statistics()[POOL]
        assert (stats.queue_depth, stats.in_flight) == (0, 0)
        assert stats.levels == pytest.approx(LIMITS)
        assert not self.rt.in_flight


def http_date(t: float) -> str:
    """``t`` on the machine's clock as an HTTP date, cut down to the second, as servers send it."""
    return email.utils.format_datetime(EPOCH + dt.timedelta(seconds=math.floor(t)), usegmt=True)


def rfc3339(t: float) -> str:
    """``t`` as an RFC 3339 ``-reset``, cut down to the second (the earliest it can read)."""
    return (EPOCH + dt.timedelta(seconds=math.floor(t))).strftime("%Y-%m-%dT%H:%M:%SZ")


def round_thousand(x: float) -> int:
    """The server's rounding of token counts: to the nearest thousand."""
    return math.floor(x / 1000.0 + 0.5) * 1000


class ResponseMomentMachine(LimiterMachine):
    moment = "response"


class MixedMomentMachine(LimiterMachine):
    moment = "mixed"


TestLimiterMachine = LimiterMachine.TestCase
TestResponseMomentMachine = ResponseMomentMachine.TestCase
TestMixedMomentMachine = MixedMomentMachine.TestCase


def test_permits_never_marked_sent_do_not_refute_the_right_reading() -> None:
    """A sequence the response-moment machine found: the limiter's levels went above the server's.

    This client never calls ``mark_sent``; its server counts each request at admission. Read
    as unsent, the requests in flight made a report after one of them settled look as if the
    server had gained what it had counted all along: two dimensions "refuted" the response
    reading at once, the limiter took the reports as of the admission, and lifted input to
    a full bucket while another client had just drawn 501 tokens from the server's.
    """

    def demand(max_tokens: int = 0) -> Demand:
        return Demand(
            input_tokens=0, max_tokens=max_tokens, cache_read_input_tokens=0, cache_creation_input_tokens=0
        )

    m = ResponseMomentMachine()

    def check() -> None:
        m.levels_match_the_model()
        m.never_more_than_the_server_has()
        m.requests_per_window_within_capacity_plus_rate()

    def nobody_else() -> None:
        m.another_client(input_tokens=0, output_tokens=0, requests=0)

    permits: list[Any] = []  # (admit_now returns a permit, or hypothesis' empty bundle)
    steps: list[Callable[[], object]] = [
        lambda: m.time_passes(seconds=0.05),
        lambda: permits.append(m.admit_now(demand=demand())),
        nobody_else,
        lambda: m.time_passes(seconds=0.05),
        lambda: permits.append(m.admit_now(demand=demand())),
        lambda: permits.append(m.admit_now(demand=demand())),
        nobody_else,
        lambda: m.time_passes(seconds=0.05),
        lambda: permits.append(m.admit_now(demand=demand(1067))),
        nobody_else,
        lambda: m.time_passes(seconds=3.0),
        lambda: m.queue(demand=demand(834), priority=0),
        lambda: m.respond(permit=permits[1], status=200, retry=1, late=False, dated=False),
        lambda: m.settle(permit=permits[3], extra_input=0, output_share=0.0),
        *[lambda: m.time_passes(seconds=0.05)] * 6,
        lambda: m.respond(permit=permits[0], status=200, retry=1, late=False, dated=False),
        lambda: m.queue(demand=demand(), priority=0),
        lambda: permits.append(m.admit_now(demand=demand())),
        lambda: m.another_client(input_tokens=501, output_tokens=0, requests=0),
        lambda: m.settle(permit=permits[4], extra_input=0, output_share=0.0),
        lambda: m.respond(permit=permits[2], status=200, retry=1, late=False, dated=False),
    ]
    check()
    for step in steps:
        step()
        check()
    m.teardown()


def test_a_report_of_an_admission_does_not_lift_past_a_later_answer() -> None:
    """A sequence the mixed-moment machine found (one run in about 9,000): two requests at one instant.

    Another client draws 501 output tokens; the first request's report is of its answer
    (it saw that draw), the second's of its admission (before the draw). Read one reading
    at a time, the second report is the newer under both, and it lifted output 1 token past
    what the server has. While the moment is not known, the first report's answer may be
    the latest moment of the two (it is no earlier than the second's admission), so it
    bounds the lift.
    """

    def nothing() -> Demand:
        return Demand(input_tokens=0, max_tokens=0, cache_read_input_tokens=0, cache_creation_input_tokens=0)

    m = MixedMomentMachine()

    def check() -> None:
        m.levels_match_the_model()
        m.never_more_than_the_server_has()
        m.requests_per_window_within_capacity_plus_rate()

    check()
    first = m.admit_now(demand=nothing())
    check()
    m.queue(demand=nothing(), priority=0)
    check()
    second = m.admit_now(demand=nothing())
    check()
    m.another_client(input_tokens=0, output_tokens=501, requests=0)
    check()
    m.respond(permit=first, status=200, retry=1, late=True, dated=False)  # of its answer
    check()
    m.respond(permit=second, status=200, retry=1, late=False, dated=False)  # of its admission
    check()
    m.teardown()
