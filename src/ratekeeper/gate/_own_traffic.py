"""What a report cannot hold of this client's own traffic, and what the traffic shows of its moment.

``own_traffic`` gathers, for one report, what this client drew that the server may not
have counted at either moment the report may describe (``OwnTraffic``); ``note_evidence``
hands the parts known exactly to the pool's ``MomentEvidence``. ``PoolFeedback`` reads
the report with them (``gate/_resync.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final, final

from ratekeeper.core._reading import ROUNDING_MARGIN
from ratekeeper.gate._state import _ACTIVE, Permit, PoolRuntime

__all__ = [
    "EVIDENCE_DIMS",
    "MAX_LEARNED_TRANSIT",
    "MAX_TRANSIT",
    "OwnTraffic",
    "add",
    "note_evidence",
    "own_traffic",
    "still_to_come",
    "transit_cap",
]

#: The longest a request is taken to travel to the server (in case no answer came quickly):
#: one the server may not have received yet is not counted in a report taken at its response.
MAX_TRANSIT: Final = 0.25
#: How long a request can be taken to travel once refusals showed MAX_TRANSIT is too short (a
#: slow network, a sender stalled between its send and the wire): doubled on each such event.
MAX_LEARNED_TRANSIT: Final = 4.0
#: A learned transit is at most this share of the pool's bucket (in seconds of refill): where
#: buckets are short, the refusals are the bucket's (the burst answers them), and a transit near
#: the bucket's length would leave most of each report's refill uncounted.
TRANSIT_SHARE_OF_BUCKET: Final = 0.05
#: The dimensions our own draws on are estimates until settled (the server counts the real input).
_ESTIMATED: Final = frozenset({"input_tokens", "tokens", "priority_input_tokens"})
#: The dimensions output draws on.
_PRODUCED: Final = frozenset({"output_tokens", "tokens", "priority_output_tokens"})
#: The dimensions whose reports show which moment they describe: the client's own traffic is
#: known exactly there (a request is one request; a max_tokens reservation is what the server
#: reserves too), so only the reports' rounding blurs them. Input is estimated: it would not.
EVIDENCE_DIMS: Final = frozenset({"requests", "output_tokens"})
_EVIDENCE_TOLERANCE: Final = {"requests": 1.01, "output_tokens": 2 * ROUNDING_MARGIN + 1.0}


@final
class OwnTraffic:
    """This client's own traffic a report may not hold, per dimension, from ``own_traffic``.

    ``early``: drawn in the model and not counted by the server when the request reached
    it; ``unsent``: drawn and not sent now. Sent within ``transit`` of the admission, before
    the request (``early_maybe``) or after it (``late_maybe``), and within ``transit`` of now
    (``unsent_maybe``): may or may not be counted. ``since``: spent since the grant;
    ``counted_since``: what the server counted of it; ``replay``: the changes to replay on
    the report (``None``: the rings do not reach back that far). ``early_unmarked``: the
    part of ``early`` (as ``unsent`` is all) from permits never marked sent, which a client
    that does not call ``mark_sent`` may well have sent: the corrections count them the safe
    way, the evidence of the moment as a blur.
    """

    __slots__ = (
        "admitted",
        "bounded",
        "counted_since",
        "early",
        "early_maybe",
        "early_unmarked",
        "late_maybe",
        "refused",
        "replay",
        "seq",
        "since",
        "taken_by",
        "transit",
        "unsent",
        "unsent_maybe",
    )

    def __init__(self, since: dict[str, float]) -> None:
        self.since = since
        self.counted_since: dict[str, float] = {}
        self.early: dict[str, float] = {}
        self.early_maybe: dict[str, float] = {}
        self.early_unmarked: dict[str, float] = {}
        self.late_maybe: dict[str, float] = {}
        self.unsent: dict[str, float] = {}
        self.unsent_maybe: dict[str, float] = {}
        self.replay: list[tuple[float, Mapping[str, float]]] | None = None
        self.refused = False
        self.admitted = 0.0
        self.seq = -1
        self.transit = 0.0
        self.taken_by: float | None = None
        self.bounded = -math.inf


def own_traffic(runtime: PoolRuntime, permit: Permit, now: float, *, replay: bool = True) -> OwnTraffic:
    """What a report of ``permit``'s request cannot hold of this client's own traffic.

    A request sent within ``transit`` of a moment may or may not have reached the
    server by then: those are kept apart (``*_maybe``) so each reading counts them the
    safe way and the evidence of the moment as a blur either way.
    """
    # (what the server counted of ours since the grant, read once, serves ``since`` and ``counted_since``)
    counted_since = runtime.admitted.since(permit._mark[0])
    own = OwnTraffic(since=runtime.spent_since(permit._mark, counted_since))
    own.refused = permit.response_status is not None and permit.response_status >= 400
    if own.refused:
        # refused: the server never took its tokens, and release() will give them back
        for dim, amount in permit._charged.items():
            if dim != "requests":
                own.early[dim] = own.early.get(dim, 0.0) + amount
                own.unsent[dim] = own.unsent.get(dim, 0.0) + amount
    # a report taken as its answer left counts every request sent a round trip before
    # now, and a round trip is no longer than the quickest answer took
    sent_at = permit.sent_at
    if sent_at == sent_at:
        runtime.fastest = min(runtime.fastest, now - sent_at)
    else:
        sent_at = permit.started_at
    own.transit = transit = max(min(runtime.fastest, MAX_TRANSIT), min(runtime.transit, transit_cap(runtime)))
    own.admitted = admitted = sent_at
    own.seq = seq = permit.seq
    order = _order(permit)
    for other in runtime.in_flight.values():
        if not other.sent:
            add(own.unsent, other._charged)
            if _order(other) < order:  # drawn in the model before this request, never sent
                add(own.early, other._charged)
                add(own.early_unmarked, other._charged)
    oldest = min(admitted, now) - transit
    floor = oldest - runtime.look_back()
    for t, other_seq, charged, granted, other_order in reversed(runtime.sends):
        if granted < floor:
            break
        if t < oldest or other_seq == seq:  # most of them: tested before a look-up
            continue
        held = runtime.in_flight.get(other_seq)
        if held is not None and not held.sent:
            continue
        if t > now - transit:
            add(own.unsent_maybe, charged)
        if abs(t - admitted) <= transit:
            add(own.early_maybe if other_order < order else own.late_maybe, charged)
        elif t > admitted and other_order < order:  # reached the server after this request
            add(own.early, charged)
    if replay:
        own.replay = runtime.changes_since(admitted, seq)
    # ``since`` is everything we charged (or refunded) since this request was granted, in
    # flight or done; what was given back since without the server ever counting it stays
    # in (if admitted before this request, the server never had it; if after, counting it
    # lowers more than needed: safe)
    own.counted_since = counted_since
    if own.refused:  # did it cost an RPM token? unknown: earlier and later values do not compare
        runtime.moment.restart(now)
    return own


def _order(permit: Permit) -> Any:
    """Where ``permit``'s grant stands among the others (see ``PoolRuntime.sends``)."""
    send = permit._send
    return permit.seq if send is None else send[4]


def note_evidence(
    runtime: PoolRuntime, dim: str, lowest: float, response: float, own: OwnTraffic, now: float
) -> None:
    """Note what a report shows of the moment it describes, where our own traffic is known exactly.

    (Requests always; output only where its max_tokens reservation is the server's too.
    Not for a refusal: it is answered as it arrives, and either reading fits it.)
    """
    if own.refused or not (dim == "requests" or runtime.reserves_max_tokens):
        return
    moment = runtime.moment
    if moment.refuted_admission and moment.refuted_response:
        # both readings refuted: the belief is "mixed" for good (refutations are never taken
        # back), and a note could change nothing but the evidence's own counts
        return
    then = own.early.get(dim, 0.0)
    then_maybe = own.early_maybe.get(dim, 0.0)
    # permits never marked sent: only the client knows whether it sent them (a client of
    # acquire and settle alone never says), so either way they are a blur here; read as
    # unsent, a report after one of them settled looks like the server gained what it had
    # counted all along, and refutes the right reading
    then_maybe += own.early_unmarked.get(dim, 0.0)
    now_maybe = own.unsent_maybe.get(dim, 0.0) + own.unsent.get(dim, 0.0)
    limit = runtime.pool.limits[dim]
    after_maybe = own.late_maybe.get(dim, 0.0)
    moment.note(
        dim,
        lowest - then + own.early_unmarked.get(dim, 0.0) + (after_maybe - then_maybe) / 2,
        response + now_maybe / 2,
        admission_blur=(then_maybe + after_maybe) / 2,
        response_blur=now_maybe / 2,
        admitted_at=own.admitted,
        now=now,
        # what the server counted of ours: refusals and unsent given back
        spent=runtime.counted_total(dim),
        spent_since=own.counted_since.get(dim, 0.0),
        rate=limit / 60.0,
        tolerance=_EVIDENCE_TOLERANCE[dim],
        ceiling=limit,
    )


def still_to_come(runtime: PoolRuntime, dim: str, permit: Permit | None) -> tuple[float, float]:
    """The most ``dim`` may still lose that neither the report nor the model holds yet.

    In two parts: what the requests under way may still produce (the model charges it as
    it learns of it, so it is owed only until then), and what ``permit``'s settlement may
    give back that the report already counts (owed by every reading of this report).
    """
    produced = settled = 0.0
    if dim in _PRODUCED and not runtime.reserves_max_tokens:
        most = runtime.most_output
        for other in runtime.in_flight.values():
            produced += max(0.0, most - other._charged.get("output_tokens", 0.0))
    if dim in _ESTIMATED and permit is not None and permit._state == _ACTIVE:
        estimated = "priority_input_tokens" if dim.startswith("priority") else "input_tokens"
        settled = permit._charged.get(estimated, 0.0)
    return produced, settled


def transit_cap(runtime: PoolRuntime) -> float:
    """The longest transit a pool may learn: MAX_LEARNED_TRANSIT, less on a short bucket."""
    return min(MAX_LEARNED_TRANSIT, TRANSIT_SHARE_OF_BUCKET * 60.0 * runtime.pool.burst)


def add(totals: dict[str, float], amounts: Mapping[str, float]) -> None:
    for dim, amount in amounts.items():
        totals[dim] = totals.get(dim, 0.0) + amount
