"""The numbers a simulation reports, computed from the emulator's request log.

Definitions (``T`` is the simulated duration; only requests that reached the
server in ``[0, T)`` count, so what a strategy sends while draining does not):

- *used* in a dimension: for every request the server answered 200, what it
  charged in that dimension once settled: 1 request; its ITPM charge (uncached
  input plus cache writes, plus cache reads for the models whose reads count);
  its actual output tokens.
- *allowed* in a dimension: what the server's bucket could let through over
  the run, ``capacity + rate * T`` (the bucket starts full;
  ``capacity = limit * enforcement_interval / 60``, ``rate = limit / 60``).
- *utilization* of a dimension: used / allowed. The *binding* dimension is
  the one the workload fills first (highest utilization summed over every
  strategy of the run); *goodput* is the utilization of the binding dimension.
- *idle reserve* (``max_tokens`` OTPM rule only): output capacity held by
  reservations beyond what the requests produced, ``sum((max_tokens - output)
  * (settled_at - arrival)) / T``, as a fraction of the OTPM limit.
- *ok* / *failed*: the simulated requests whose last attempt reached the server
  in ``[0, T)`` (so ``ok`` is ``used["requests"]``), by how they ended for the
  program; requests whose last attempt came later, while draining, are
  ``after_end``; those still running when the drain ended, ``unfinished``.
- *wait*: per simulated request, ok or failed, from when the program wanted
  to send it to when its last attempt reached the server: for a success the
  attempt that succeeded, for a failure the last refused one, after which the
  SDK gave up (gate waits, refused attempts and the SDK's retry sleeps all count).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, final

import attrs

from ratekeeper.emulator import RequestRecord

__all__ = [
    "DIMENSIONS",
    "Attempt",
    "Outcome",
    "Series",
    "StrategyResult",
    "bind",
    "quantile",
    "summarize",
]

#: The server's dimensions, in the order they are shown.
DIMENSIONS: Final = ("requests", "input_tokens", "output_tokens")
#: Width of the bins of the series (admitted traffic, 429s), in seconds.
BIN_SECONDS: Final = 5.0


@final
@attrs.frozen
class Attempt:
    """One HTTP attempt as the transport saw it: which request, when it reached the server, the answer."""

    index: int
    sent_at: float
    status: int
    request_id: str | None


@final
@attrs.frozen
class Outcome:
    """How one simulated request ended for the program: ``ok``, or the error the SDK raised."""

    index: int
    wanted_at: float
    ok: bool
    error: str | None = None


@final
@attrs.frozen
class Series:
    """Time series for plots, on simulated seconds from the start.

    ``levels`` are bucket levels sampled every ``step`` seconds as fractions of
    capacity. Every ``BIN_SECONDS``, ending at ``bin_times``: ``admitted`` is
    what successful requests were charged (by arrival) over the minute before,
    to read against the per-minute limit; ``rate_limited`` the 429s in the bin.
    """

    step: float
    level_times: tuple[float, ...]
    levels: Mapping[str, tuple[float, ...]]
    bin_times: tuple[float, ...]
    admitted: Mapping[str, tuple[float, ...]]
    rate_limited: tuple[int, ...]


@final
@attrs.frozen(kw_only=True)
class StrategyResult:
    """One strategy's run: counts, utilization per dimension, goodput, waits, and the series.

    The counts agree: ``requests_ok + requests_failed + requests_after_end +
    requests_unfinished`` is ``requests_started``; ``requests_ok`` is
    ``used["requests"]``; ``attempts`` is ``successes + rate_limited +
    other_errors`` (``successes``: 200s, the drain's included).

    ``goodput_fraction`` and ``binding_dimension`` are filled in once every
    strategy of the run is known (the binding dimension is common to all).
    """

    strategy: str
    duration_s: float
    requests_ok: int
    requests_failed: int
    requests_unfinished: int
    requests_after_end: int
    successes: int
    rate_limited: int
    other_errors: int
    attempts: int
    used: Mapping[str, float]
    allowed: Mapping[str, float]
    idle_reserve_fraction: float
    wait_p50_s: float
    wait_p99_s: float
    wall_s: float
    series: Series
    binding_dimension: str = ""
    goodput_fraction: float = math.nan

    @property
    def requests_started(self) -> int:
        """Simulated requests the program began, however they ended."""
        return self.requests_ok + self.requests_failed + self.requests_after_end + self.requests_unfinished

    @property
    def utilization(self) -> dict[str, float]:
        """Used / allowed, per dimension."""
        return {d: self.used[d] / self.allowed[d] if self.allowed[d] else 0.0 for d in DIMENSIONS}

    def as_dict(self) -> dict[str, object]:
        """The JSON line for ``--json``."""
        return {
            "strategy": self.strategy,
            "requests_started": self.requests_started,
            "requests_ok": self.requests_ok,
            "requests_failed": self.requests_failed,
            "requests_after_end": self.requests_after_end,
            "requests_unfinished": self.requests_unfinished,
            "attempts": self.attempts,
            "successes": self.successes,
            "rate_limited": self.rate_limited,
            "other_errors": self.other_errors,
            "goodput_fraction": round(self.goodput_fraction, 6),
            "binding_dimension": self.binding_dimension,
            "utilization": {d: round(u, 6) for d, u in self.utilization.items()},
            "used": {d: round(v, 3) for d, v in self.used.items()},
            "allowed": {d: round(v, 3) for d, v in self.allowed.items()},
            "idle_reserve_fraction": round(self.idle_reserve_fraction, 6),
            "wait_p50_s": round(self.wait_p50_s, 6),
            "wait_p99_s": round(self.wait_p99_s, 6),
            "duration_s": self.duration_s,
            "wall_s": round(self.wall_s, 3),
        }


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; NaN when empty.

    >>> quantile([3.0, 1.0, 2.0], 0.5), quantile([1.0, 2.0, 3.0, 4.0], 0.99)
    (2.0, 4.0)
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def _charges(rec: RequestRecord) -> dict[str, float]:
    return {
        "requests": 1.0,
        "input_tokens": rec.admitted.get("input_tokens", 0.0),
        "output_tokens": float(rec.output_tokens),
    }


def _last_attempts(attempts: Iterable[Attempt]) -> dict[int, float]:
    """Per simulated request, when its last attempt reached the server."""
    last: dict[int, float] = {}
    for a in attempts:
        last[a.index] = max(a.sent_at, last.get(a.index, -math.inf))
    return last


def _series(
    records: Sequence[RequestRecord],
    duration: float,
    level_times: Sequence[float],
    levels: Mapping[str, Sequence[float]],
    step: float,
) -> Series:
    n_bins = max(1, math.ceil(duration / BIN_SECONDS))
    per_bin = {d: [0.0] * n_bins for d in DIMENSIONS}
    refused = [0] * n_bins
    for rec in records:
        i = int(rec.arrival // BIN_SECONDS)
        if not 0 <= i < n_bins:
            continue
        if rec.status == 429:
            refused[i] += 1
        elif rec.ok:
            for d, v in _charges(rec).items():
                per_bin[d][i] += v
    # what was admitted over the minute before each bin's end, to read against the per-minute limit
    window = round(60.0 / BIN_SECONDS)
    admitted = {
        d: tuple(math.fsum(v[max(0, i + 1 - window) : i + 1]) for i in range(n_bins))
        for d, v in per_bin.items()
    }
    return Series(
        step=step,
        level_times=tuple(level_times),
        levels={d: tuple(v) for d, v in levels.items()},
        bin_times=tuple((i + 1) * BIN_SECONDS for i in range(n_bins)),
        admitted=admitted,
        rate_limited=tuple(refused),
    )


def summarize(
    strategy: str,
    *,
    records: Sequence[RequestRecord],
    attempts: Sequence[Attempt],
    outcomes: Sequence[Outcome],
    unfinished: int,
    duration: float,
    limits: Mapping[str, float],
    allowed: Mapping[str, float],
    output_rule: str,
    level_times: Sequence[float] = (),
    levels: Mapping[str, Sequence[float]] | None = None,
    step: float = 1.0,
    wall_s: float = 0.0,
) -> StrategyResult:
    """Compute one strategy's ``StrategyResult`` from the emulator's log and the client's outcomes."""
    messages = [r for r in records if r.endpoint == "messages"]
    in_run = [r for r in messages if r.arrival < duration]
    used = dict.fromkeys(DIMENSIONS, 0.0)
    idle = 0.0
    for rec in in_run:
        if not rec.ok:
            continue
        for d, v in _charges(rec).items():
            used[d] += v
        if output_rule == "max_tokens" and rec.settled_at is not None:
            idle += (rec.max_tokens - rec.output_tokens) * (rec.settled_at - rec.arrival)
    otpm = limits.get("output_tokens", 0.0)
    last = _last_attempts(attempts)
    # a request counts in the run when its last attempt reached the server before T, as `used`
    # counts the 200s that arrived before T: the two then agree
    ended = [(o, last.get(o.index, o.wanted_at)) for o in outcomes]
    in_run_outcomes = [(o, at) for o, at in ended if at < duration]
    waits = [at - o.wanted_at for o, at in in_run_outcomes if o.index in last]
    return StrategyResult(
        strategy=strategy,
        duration_s=duration,
        requests_ok=sum(1 for o, _ in in_run_outcomes if o.ok),
        requests_failed=sum(1 for o, _ in in_run_outcomes if not o.ok),
        requests_unfinished=unfinished,
        requests_after_end=len(ended) - len(in_run_outcomes),
        successes=sum(1 for a in attempts if a.status == 200),
        rate_limited=sum(1 for r in messages if r.status == 429),
        other_errors=sum(1 for r in messages if r.status not in (200, 429)),
        attempts=len(attempts),
        used=used,
        allowed=dict(allowed),
        idle_reserve_fraction=idle / duration / otpm if otpm and duration else 0.0,
        wait_p50_s=quantile(waits, 0.5),
        wait_p99_s=quantile(waits, 0.99),
        wall_s=wall_s,
        series=_series(messages, duration, level_times, levels or {}, step),
    )


def bind(results: Sequence[StrategyResult]) -> tuple[StrategyResult, ...]:
    """Pick the binding dimension over all ``results`` and fill in each one's goodput."""
    if not results:
        return ()
    totals = {d: sum(r.utilization[d] for r in results) for d in DIMENSIONS}
    binding = max(DIMENSIONS, key=lambda d: totals[d])
    return tuple(
        attrs.evolve(r, binding_dimension=binding, goodput_fraction=r.utilization[binding]) for r in results
    )
