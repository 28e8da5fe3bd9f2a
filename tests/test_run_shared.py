"""Two ``ratekeeper run`` processes sharing one organization's limit through a real Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_run import lines_of, request, start_run, write_requests

from ratekeeper import limits_for
from ratekeeper.emulator import EmulatedServer, EmulatorConfig, LatencyModel, serve

MODEL = "claude-sonnet-4-5"
#: Each process alone would fit Tier 1's burst of 50 requests; the two together do not.
EACH = 28


@pytest.fixture
def tier1_server() -> Iterator[tuple[EmulatedServer, str]]:
    server = EmulatedServer(
        EmulatorConfig(preset="tier-1", latency=LatencyModel(ttft=0.05, tokens_per_second=2000, jitter=0.0))
    )
    with serve(server, port=0) as http:
        yield server, http.url


def test_two_processes_share_one_limit_through_redis(
    tier1_server: tuple[EmulatedServer, str], redis_server: Any, tmp_path: Path
) -> None:
    server, url = tier1_server
    rpm = limits_for("tier-1", MODEL).rpm
    assert 2 * EACH > rpm > EACH  # the limit binds only if the two really share it
    # max_tokens 50 and about 210 input tokens each: RPM binds, not ITPM or OTPM
    files = {
        name: write_requests(
            tmp_path / f"{name}.jsonl",
            [{**request(i, max_tokens=50), "custom_id": f"{name}{i}"} for i in range(EACH)],
        )
        for name in ("a", "b")
    }
    shared = ("--preset", "tier-1", "--redis", redis_server.url, "--org", "shared-run", "--json")
    procs = {name: start_run(src, tmp_path / f"{name}.out", url, *shared) for name, src in files.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        summary = json.loads(stdout)
        assert (summary["succeeded"], summary["errored"], summary["rate_limited"]) == (EACH, 0, 0)
        rows = lines_of(tmp_path / f"{name}.out")
        assert sorted(r["custom_id"] for r in rows) == sorted(f"{name}{i}" for i in range(EACH))
        assert all(r["attempts"] == 1 for r in rows)

    assert [r.status for r in server.log].count(200) == len(server.log) == 2 * EACH  # not one 429
    # within the limit at every moment: at most the burst plus the refill since the first
    arrivals = sorted(r.arrival for r in server.log)
    for n, t in enumerate(arrivals, start=1):
        assert n <= rpm + rpm * (t - arrivals[0]) / 60 + 1e-6, (n, t - arrivals[0])
    # (the server admitting every one says as much; this says it in the limit's own terms)
    assert arrivals[-1] - arrivals[0] >= (2 * EACH - rpm) * 60 / rpm - 1e-6
