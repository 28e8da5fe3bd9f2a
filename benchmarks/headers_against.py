"""``parse_headers`` of this checkout against another version of ``core/_headers.py``, in one process.

    git show 1c4ae0f:src/ratekeeper/core/_headers.py > /tmp/headers_before.py
    python benchmarks/headers_against.py /tmp/headers_before.py

Up to the split into ``_headers``, ``_snapshot`` and ``_header_values`` the module
was self-contained (the standard library and attrs), so such a version is loaded
from its file beside this one; a later ``_headers.py`` loaded this way takes its
converters and types from this checkout, so only its own code is compared.
Batches of the baseline (``{k.lower(): v}`` of the same headers), the other
version and this one alternate; each figure is the fastest batch, in CPU
microseconds a call, so that other processes on the machine weigh on all three
alike.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).parent))

from test_bench_headers import (
    API_HEADERS,
    API_HTTPX_HEADERS,
    HEADERS,
    HTTPX_HEADERS,
    RECEIVED,
)

from ratekeeper.core import _headers as current

CASES: dict[str, Mapping[str, str]] = {
    "48 headers, dict": HEADERS,
    "48 headers, httpx2.Headers": HTTPX_HEADERS,
    "a Messages response, dict": API_HEADERS,
    "a Messages response, httpx2.Headers": API_HTTPX_HEADERS,
}


def _load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("headers_against_other", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # attrs looks the module up by name
    spec.loader.exec_module(module)
    return module


def _batch(call: Callable[[], object], n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        call()
    return (time.process_time() - start) / n * 1e6


def main(other_path: str, rounds: int = 80, per_batch: int = 200) -> None:
    other = _load(other_path)
    print("| header set | `{k.lower(): v}` (us) | other (us) | ratio | this (us) | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, headers in CASES.items():
        best = dict.fromkeys(("baseline", "other", "this"), float("inf"))
        for _ in range(rounds):
            for key, call in _calls(headers, other).items():
                best[key] = min(best[key], _batch(call, per_batch))
        base, before, after = best["baseline"], best["other"], best["this"]
        ratios = f"{before:.2f} | {before / base:.1f}x | {after:.2f} | {after / base:.1f}x"
        print(f"| {name} | {base:.2f} | {ratios} |")


def _calls(headers: Mapping[str, str], other: ModuleType) -> dict[str, Callable[[], object]]:
    items = headers.items
    return {
        "baseline": lambda: {k.lower(): v for k, v in items()},
        "other": lambda: other.parse_headers(headers, received_at=RECEIVED),
        "this": lambda: current.parse_headers(headers, received_at=RECEIVED),
    }


if __name__ == "__main__":
    main(sys.argv[1])
