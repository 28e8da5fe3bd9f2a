"""``parse_headers`` of this checkout against another tree's, in one process.

    git archive main src | tar -x -C /tmp/base
    python benchmarks/headers_against.py /tmp/base/src [rounds]

The header sets of ``test_bench_headers.py`` (48 headers of every family, as a dict and
as an ``httpx2.Headers``; a Messages response's 16, likewise), each timed in turn for:
the baseline (a ``{k.lower(): v}`` dict of the same headers), the other tree's
``parse_headers`` and this one's. Each figure is the fastest round, per call; the
ratios are over the baseline of the same round set, so other load weighs on all alike.
"""

from __future__ import annotations

import sys
import tempfile
import timeit
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from sdk_overhead_against import _other
from test_bench_headers import API_HEADERS, API_HTTPX_HEADERS, HEADERS, HTTPX_HEADERS, RECEIVED

import ratekeeper

PER_ROUND = 2_000


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def main() -> None:
    """Measure, then print one table row per header set."""
    other_src = Path(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    with tempfile.TemporaryDirectory() as tmp:
        other, _ = _other(other_src, Path(tmp))
        sets = {
            "48 headers, dict": HEADERS,
            "48 headers, httpx2.Headers": HTTPX_HEADERS,
            "16 headers, dict": API_HEADERS,
            "16 headers, httpx2.Headers": API_HTTPX_HEADERS,
        }
        calls: dict[tuple[str, str], Callable[[], object]] = {}
        for name, headers in sets.items():
            calls[name, "baseline"] = partial(_lowered, headers)
            calls[name, "other"] = partial(other.parse_headers, headers, received_at=RECEIVED)
            calls[name, "this"] = partial(ratekeeper.parse_headers, headers, received_at=RECEIVED)
        best = dict.fromkeys(calls, float("inf"))
        for _ in range(rounds):
            for key, call in calls.items():
                best[key] = min(best[key], timeit.timeit(call, number=PER_ROUND) / PER_ROUND * 1e6)
    print(f"{rounds} rounds of {PER_ROUND}; the other tree: {other_src}")
    print("| headers | baseline µs | other µs | over baseline | this µs | over baseline |")
    print("|---|---|---|---|---|---|")
    for name in sets:
        base, was, now = best[name, "baseline"], best[name, "other"], best[name, "this"]
        print(f"| {name} | {base:.2f} | {was:.2f} | {was / base:.2f}x | {now:.2f} | {now / base:.2f}x |")


if __name__ == "__main__":
    main()
