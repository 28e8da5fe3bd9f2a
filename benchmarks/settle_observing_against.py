"""The limiter's step per response, this checkout against another tree's, in one process.

    git archive main src | tar -x -C /tmp/base
    python benchmarks/settle_observing_against.py /tmp/base/src [rounds]

What the middleware asks of the limiter for one non-streamed answer, without the SDK: a
permit (``acquire_sync``), ``mark_sent``, ``parse_headers`` of the answer's httpx2 headers
(``test_bench_sdk_overhead.py``'s), and ``settle`` with the usage and those headers (the
settlement, then the observe: ``_resync`` and the rest). The other tree's package is
copied in as ``ratekeeper_other``, as ``sdk_overhead_against.py`` does, and the two
trees' rounds of 200 steps alternate. Each side's figure is the median and the fastest
round, µs a step.
"""

from __future__ import annotations

import datetime as dt
import importlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import httpx2
from sdk_overhead_against import _other
from test_bench_sdk_overhead import MODEL, USAGE, _headers

import ratekeeper

STEPS = 200


def _step(package: Any) -> Callable[[httpx2.Headers], None]:
    parse_headers = importlib.import_module(package.__name__ + ".core._headers").parse_headers
    limiter = package.Limiter("tier-4")

    def step(headers: httpx2.Headers) -> None:
        with limiter.acquire_sync(MODEL, input_tokens=1100, max_tokens=1024) as permit:
            permit.mark_sent()
            snapshot = parse_headers(headers, received_at=dt.datetime.now(dt.UTC))
            permit.settle(dict(USAGE), headers=snapshot)

    return step


def main(src: Path, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as into:
        other, _ = _other(src, Path(into))
        steps = {"other": _step(other), "this": _step(ratekeeper)}
        answers = [httpx2.Headers(_headers()) for _ in range(STEPS // 4)]
        for step in steps.values():
            for headers in answers:
                step(headers)
        times: dict[str, list[float]] = {side: [] for side in steps}
        for r in range(rounds):
            for side in list(steps) if r % 2 == 0 else list(steps)[::-1]:
                step = steps[side]
                start = time.process_time()
                for _ in range(4):
                    for headers in answers:
                        step(headers)
                times[side].append((time.process_time() - start) / STEPS * 1e6)
        print("| | other, median; fastest (µs) | this, median; fastest (µs) | this over other |")
        print("|---|---:|---:|---:|")
        o_med, o_min = statistics.median(times["other"]), min(times["other"])
        t_med, t_min = statistics.median(times["this"]), min(times["this"])
        print(
            f"| acquire, parse, settle with headers | {o_med:.1f}; {o_min:.1f} | {t_med:.1f}; {t_min:.1f} "
            f"| {t_med / o_med:.2f}x; {t_min / o_min:.2f}x |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 30)
