"""The uncontended grant and settlement of an ordinary request, each in one step.

``LocalEngine.admit_plain`` admits a request of one request, input and output tokens
(no credits, no priority or batch draws) that fits at once; once the pool has taken
it, ``grant_plain`` does what ``grant_now``, ``Permit.__init__`` and ``note_grant`` do
for it, in one frame: on this path the calls between them were most of a grant's
cost. ``settle_plain_amounts`` is the same for ``LocalSettlement.settle_plain``'s
refunds and charges. ``tests/test_fast_path.py`` holds both to the general path.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ratekeeper.gate._state import _ACTIVE, Permit, PermitOwner, PoolRuntime

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["grant_plain", "settle_plain_amounts"]

_new_permit: Callable[[type[Permit]], Permit] = object.__new__


def grant_plain(
    limiter: PermitOwner, runtime: PoolRuntime, model: str, inp: float, out: float, seq: int, now: float
) -> Permit:
    """Under the lock, once ``runtime.pool`` took the request: its permit, counted and in flight.

    The draws dict is the permit's alone: it serves as ``reserved``, the charge and the
    send entry's charges, none of which is changed in place (they are replaced).
    """
    if inp or out:
        draws = {"requests": 1.0, "input_tokens": inp, "output_tokens": out, "tokens": inp + out}
    else:
        draws = {"requests": 1.0, "input_tokens": inp, "output_tokens": out}
    runtime.waits.add(0.0)
    admitted = runtime.admitted  # runtime.record(now, draws), unrolled
    if now >= admitted.next_snapshot:
        admitted.snapshot(now)
    admitted.requests += 1.0
    admitted.input_tokens += inp
    admitted.output_tokens += out
    # Permit(limiter, runtime, model, draws, 0.0, seq, now), its mark taken after the charge
    permit = _new_permit(Permit)
    permit._mark = (
        (admitted.requests, admitted.input_tokens, admitted.output_tokens, admitted.other),
        runtime.uncounted,
    )
    permit._limiter = limiter
    permit._engine = limiter._engine
    permit._runtime = runtime
    permit.pool = runtime.pool.name
    permit.model = model
    permit.reserved = permit._charged = draws
    permit._plain = True
    permit.credits = 0.0
    permit.seq = seq
    permit.started_at = now
    permit._state = _ACTIVE
    permit.sent = False
    permit.sent_at = math.nan
    permit.response_status = None
    permit._send = entry = [now, seq, draws, now, seq]  # runtime.note_grant(permit, now)
    runtime.sends.append(entry)
    runtime.in_flight[seq] = permit
    runtime.granted += 1
    return permit


def settle_plain_amounts(
    permit: Permit, inp: float, out: float, give_in: float, give_out: float, now: float
) -> None:
    """Under the lock: a plain permit used ``inp`` and ``out``, ``give_in`` and ``give_out``
    less than it holds (negative: more): ``pool.give_back_plain``, then ``runtime.record`` of
    the difference and the new charge, without the mappings. ``now`` may be ``-inf`` for refunds only
    (see ``settle_plain``): each bucket then takes them at its own last time.
    """
    runtime = permit._runtime
    if give_in or give_out:
        runtime.pool.give_back_plain(give_in, give_out, now)
        admitted = runtime.admitted
        if now >= admitted.next_snapshot:
            admitted.snapshot(now)
        admitted.input_tokens -= give_in
        admitted.output_tokens -= give_out
    if inp or out:
        permit._charged = {"requests": 1.0, "input_tokens": inp, "output_tokens": out, "tokens": inp + out}
    else:
        permit._charged = {"requests": 1.0, "input_tokens": inp, "output_tokens": out}
