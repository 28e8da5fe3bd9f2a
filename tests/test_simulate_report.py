"""What ``ratekeeper simulate`` reports says what it means (issue 15): the JSON, the table, the plot."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest

import ratekeeper.simulate as sim
from ratekeeper.cli._main import main
from ratekeeper.emulator import RequestRecord
from ratekeeper.errors import RateKeeperError
from ratekeeper.simulate import Scenario, SimulationResult, Workload, simulate
from ratekeeper.simulate._metrics import Attempt, Outcome, summarize
from ratekeeper.simulate._plot import LEVEL_FLOOR, figure
from ratekeeper.simulate._report import findings, render_text, twins
from ratekeeper.simulate._run import concurrency_to_reach

#: One minute of Tier 1 at the default 8 workers: RPM never binds, so rpm-only repeats sdk.
MINUTE = Scenario(minutes=1.0, strategies=("sdk", "ratekeeper", "rpm-only"))


@pytest.fixture(scope="module")
def minute() -> SimulationResult:
    return simulate(MINUTE)


@pytest.fixture(scope="module")
def json_rows() -> list[dict[str, Any]]:
    argv = [
        "simulate",
        "--minutes",
        "1",
        "--strategies",
        "sdk,ratekeeper,rpm-only",
        "--json",
        "--no-progress",
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--no-progress", "--seed", "3", "--prompt-tokens", "1800", "--stream"]) == 0
    return [json.loads(line) for line in out.getvalue().strip().splitlines()]


# ---------------------------------------------------------------------- --json


def test_json_carries_the_workload_so_runs_can_be_told_apart(json_rows: list[dict[str, Any]]) -> None:
    for row in json_rows:
        assert row["workload"] == {
            "concurrency": 8,
            "arrival_rate": 0.0,
            "prompt_tokens": 1800,
            "prompt_spread": 0.5,
            "max_tokens": 1024,
            "output_ratio": 0.5,
            "output_spread": 0.25,
            "cache_hit_ratio": 0.0,
            "stream": True,
            "seed": 3,
        }
        assert row["strategies"] == ["sdk", "ratekeeper", "rpm-only"]
        assert (row["preset"], row["report_moment"], row["max_retries"]) == ("tier-1", "admission", 2)


def test_json_counts_agree_with_each_other(json_rows: list[dict[str, Any]]) -> None:
    for row in json_rows:
        assert row["requests_ok"] == row["used"]["requests"]
        assert row["requests_started"] == (
            row["requests_ok"]
            + row["requests_failed"]
            + row["requests_after_end"]
            + row["requests_unfinished"]
        )
        assert row["attempts"] == row["successes"] + row["rate_limited"] + row["other_errors"]
    assert [row["identical_to"] for row in json_rows] == [None, None, "sdk"]


def test_counts_agree_in_a_run_of_every_strategy(minute: SimulationResult) -> None:
    for r in minute.results:
        assert r.requests_ok == r.used["requests"], r.strategy
        assert r.attempts == r.successes + r.rate_limited + r.other_errors, r.strategy


# ---------------------------------------------------------------------- the table


def _record(arrival: float, status: int) -> RequestRecord:
    return RequestRecord(
        request_id=f"r{arrival}",
        endpoint="messages",
        pool="sonnet-4.x",
        model="claude-sonnet-4-5",
        arrival=arrival,
        status=status,
        max_tokens=100,
        admitted={"requests": 1.0, "input_tokens": 10.0, "output_tokens": 100.0} if status == 200 else {},
        output_tokens=50 if status == 200 else 0,
        settled_at=arrival + 1.0 if status == 200 else None,
    )


def test_wait_is_per_request_failed_ones_included() -> None:
    # request 0 succeeds at once; request 1 is refused at 0, 4 and 10 s, and the SDK gives up
    attempts = [Attempt(0, 0.0, 200, "a"), Attempt(1, 0.0, 429, None)]
    attempts += [Attempt(1, 4.0, 429, None), Attempt(1, 10.0, 429, None)]
    records = [_record(0.0, 200), _record(0.0, 429), _record(4.0, 429), _record(10.0, 429)]
    r = summarize(
        "sdk",
        records=records,
        attempts=attempts,
        outcomes=[Outcome(0, 0.0, True), Outcome(1, 0.0, False, "429 RateLimitError")],
        unfinished=0,
        duration=60.0,
        limits={"requests": 50.0, "input_tokens": 30_000.0, "output_tokens": 8_000.0},
        allowed={"requests": 100.0, "input_tokens": 60_000.0, "output_tokens": 16_000.0},
        output_rule="max_tokens",
    )
    assert (r.requests_ok, r.requests_failed, r.rate_limited, r.attempts, r.successes) == (1, 1, 3, 4, 1)
    assert (r.wait_p50_s, r.wait_p99_s) == (0.0, 10.0)


def test_a_row_identical_to_another_is_said_to_be(minute: SimulationResult) -> None:
    assert twins(minute) == {"rpm-only": "sdk"}
    text = render_text(minute)
    assert "\nrpm-only (= sdk) " in text
    rpm = minute["rpm-only"].utilization["requests"]
    assert (
        "note: rpm-only = sdk: the same requests at the same moments; it never held one back "
        f"(RPM, the only limit it keeps, was at {rpm:.0%} of what the server allowed)"
    ) in text.splitlines()


def test_a_workload_that_does_not_reach_the_limit_is_said_not_to() -> None:
    result = simulate(Scenario(preset="tier-4", minutes=1.0, strategies=("ratekeeper",)))
    (line,) = findings(result)
    assert line.startswith("the workload did not reach the limit: at most ")
    assert line.endswith(
        "of what tier-4 allowed in OTPM, its busiest dimension; 8 workers ask for too little for the "
        "strategies to differ; --concurrency 236 would ask for about twice the limit"
    )


def test_the_default_concurrency_scales_with_the_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [concurrency_to_reach(p, Workload()) for p in ("tier-1", "tier-2", "tier-4")] == [8, 53, 236]
    # a heavier request needs fewer workers to reach the same limit
    assert concurrency_to_reach("tier-4", Workload(prompt_tokens=8000)) < 236
    seen: list[Scenario] = []

    def capture(scenario: Scenario, **_: object) -> SimulationResult:
        seen.append(scenario)
        raise RateKeeperError("stop here")

    monkeypatch.setattr(sim, "simulate", capture)
    assert main(["simulate", "--preset", "tier-4", "--no-progress"]) == 1
    assert main(["simulate", "--preset", "tier-4", "--concurrency", "12", "--no-progress"]) == 1
    assert [s.workload.concurrency for s in seen] == [236, 12]


# ---------------------------------------------------------------------- --plot


def test_plot_every_series_visible_legends_headline_and_sane_axes(minute: SimulationResult) -> None:
    fig = figure(minute)
    level, rate, refused = fig.axes
    title = fig.get_suptitle()
    assert title.endswith(
        "\nsdk {0} 429s, {1} failed · ratekeeper 0 429s, 0 failed · rpm-only {0} 429s, {1} failed".format(
            minute["sdk"].rate_limited, minute["sdk"].requests_failed
        )
    )
    for ax in (level, rate, refused):
        assert ax.get_legend() is not None
    # the repeat is dashed over a thicker original, in every panel
    for ax in (level, rate, refused):
        lines = {line.get_label().split(" ")[0].rstrip(":"): line for line in ax.get_lines()}
        assert lines["rpm-only"].get_linestyle() == "--"
        assert lines["sdk"].get_linewidth() > lines["rpm-only"].get_linewidth()
    # no line of zeros hidden under another: strategies without 429s are named instead
    assert "ratekeeper" not in {line.get_label().split(":")[0] for line in refused.get_lines()}
    assert any(t.get_text() == "no 429s:\nratekeeper" for t in refused.texts)
    assert any("full at the start" in t.get_text() for t in level.texts)
    assert any("the full bucket" in t.get_text() for t in rate.texts)
    assert level.get_ylim()[0] >= LEVEL_FLOOR - 5.0
    assert rate.get_ylim()[0] == 0.0


def test_plot_clips_a_bucket_in_deep_debt_and_says_so() -> None:
    scenario = Scenario(minutes=0.5, enforcement_interval=1.0, output_rule="actual", strategies=("sdk",))
    fig = figure(simulate(scenario))
    level = fig.axes[0]
    assert level.get_ylim() == (LEVEL_FLOOR - 5.0, 105.0)
    assert level.get_title(loc="left").startswith("clipped at -100%: the bucket went down to ")
