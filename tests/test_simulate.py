"""``ratekeeper simulate``: short scenarios on virtual time, and the invariants they must keep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import anyio
import pytest
import trio
from trio.testing import MockClock

import ratekeeper.simulate as sim
from ratekeeper.cli._main import main
from ratekeeper.emulator import EmulatedServer, EmulatorConfig, EmulatorRequest
from ratekeeper.errors import ConfigurationError
from ratekeeper.simulate import Scenario, SimulationResult, Workload, WorkloadGenerator, simulate
from ratekeeper.simulate._metrics import quantile
from ratekeeper.simulate._strategies import FixedWindow, LeakyBucket

#: Two simulated minutes of the default workload: every strategy, about a second of wall time.
SHORT = Scenario(minutes=2.0)
#: ratekeeper's goodput on SHORT: 0.77 to 0.87 while resync lowered the buckets to each stale
#: report; 0.92 since it lowers by how far the model was ahead at the request's grant (two
#: minutes weigh start-up heavily; ten give 0.99). The floor is below that, above the old.
RATEKEEPER_GOODPUT_FLOOR = 0.88
REQUIRED_KEYS = {"strategy", "requests_ok", "rate_limited", "goodput_fraction", "wait_p50_s", "wait_p99_s"}


@pytest.fixture(scope="module")
def short() -> SimulationResult:
    return simulate(SHORT)


# ---------------------------------------------------------------------- invariants of a run


def test_ratekeeper_meets_no_429_at_full_minute_enforcement(short: SimulationResult) -> None:
    r = short["ratekeeper"]
    assert r.rate_limited == 0
    assert r.requests_failed == 0
    assert r.goodput_fraction >= RATEKEEPER_GOODPUT_FLOOR


@pytest.mark.parametrize("moment", ["admission", "response", "mixed"])
def test_the_whole_limit_whatever_moment_the_headers_describe(moment: str) -> None:
    """Tier 2 exactly, 64 workers, max_tokens 1,024, one minute: the issue's second row.

    With headers taken when the answer is sent, the first answer after the opening burst
    used to lower the output bucket by the 63 reservations admitted meanwhile (counted
    twice), and nothing gave them back: 62.4% of what the server could admit, against the
    SDK alone's 91.4%. Measured since: 91.6% (admission), 91.0% (response), 89.0% (mixed).
    (``opening=60``: that burst of 64 at once, a full bucket from the start; the default
    paces the first wave until the first report, see the feedback matrix.)
    """
    scenario = Scenario(
        opening=60,
        preset="tier-2",
        minutes=1.0,
        report_moment=moment,
        strategies=("sdk", "ratekeeper"),
        workload=Workload(concurrency=64, max_tokens=1024),
    )
    result = simulate(scenario)
    sdk, rk = result["sdk"], result["ratekeeper"]
    assert rk.requests_failed == 0
    assert rk.rate_limited <= 1
    assert rk.goodput_fraction >= 0.96 * sdk.goodput_fraction


@pytest.mark.parametrize("moment", ["admission", "response", "mixed"])
def test_no_429_when_requests_reach_the_server_late(moment: str) -> None:
    """Tier 2, 64 workers, two minutes, each request held up to 0.25 s on its way to the server.

    A report read as taken at the request's send, when the server admitted it later,
    counted the refill between the two twice: measured before the refill was counted
    from the latest moment the admission can have been (send + 0.25 s at most), 1 429
    under "mixed" at this uplink (1-3 per moment with 0.5-1 s). Since: 0 under every
    moment, 93.6-94.2% of the limit. Beyond 0.25 s the first refusal teaches a longer
    transit: see the transit tests in test_limiter_server.py.
    """
    scenario = Scenario(
        preset="tier-2",
        minutes=2.0,
        report_moment=moment,
        uplink=0.25,
        strategies="ratekeeper",
        workload=Workload(concurrency=64, max_tokens=1024),
    )
    r = simulate(scenario)["ratekeeper"]
    assert r.requests_failed == 0
    assert r.rate_limited == 0
    assert r.goodput_fraction >= 0.9


def test_one_second_enforcement_meets_429s_in_the_first_wave_and_rarely_after() -> None:
    """Tier 2, "450,000 ITPM enforced per second": 16 workers of 6,000-token prompts, 5 minutes.

    Measured: 72.4% of the limit with 21 429s, 15 of them in the first wave (before any
    response told the limiter the bucket's size). Before the burst and resync work: 27.8%,
    85 429s and 6 requests failed.
    """
    scenario = Scenario(
        preset="tier-2",
        minutes=5.0,
        enforcement_interval=1.0,
        strategies="ratekeeper",
        workload=Workload(concurrency=16, prompt_tokens=6000),
    )
    r = simulate(scenario)["ratekeeper"]
    assert r.requests_failed == 0
    assert r.rate_limited <= 25
    assert r.goodput_fraction >= 0.65


@pytest.mark.parametrize(
    ("interval", "concurrency", "stream", "share"),
    [(1.0, 16, False, 0.02), (5.0, 32, True, 0.01)],
    ids=["1s", "5s-streamed"],
)
def test_short_buckets_meet_no_429_wave_before_the_first_report(
    interval: float, concurrency: int, stream: bool, share: float
) -> None:
    """Issue 12's short-bucket rows, one minute of Tier 2: the bucket's size is unknown until
    the first answer. With a full bucket from the start the first wave met 15 429s of 96
    requests (1 s) and 25 of 150 (5 s, streamed); paced at one second of the limit until a
    report shows more, 1 of 99 and none: within the issue's 2% and 1%."""
    scenario = Scenario(
        preset="tier-2",
        minutes=1.0,
        enforcement_interval=interval,
        report_moment="admission",
        strategies="ratekeeper",
        workload=Workload(concurrency=concurrency, max_tokens=1024, stream=stream),
    )
    r = simulate(scenario)["ratekeeper"]
    assert r.requests_failed == 0
    assert r.rate_limited <= share * r.requests_ok


def test_the_sdk_alone_meets_429s(short: SimulationResult) -> None:
    assert short["sdk"].rate_limited > 10 * max(1, short["ratekeeper"].rate_limited)


def test_every_strategy_stays_within_what_the_server_allowed(short: SimulationResult) -> None:
    # the server never lets more through than capacity + rate x time (up to one request's overshoot)
    for r in short.results:
        for dim, used in r.used.items():
            assert used <= r.allowed[dim] * 1.05, (r.strategy, dim)
        assert r.attempts >= r.requests_ok + r.rate_limited // 3
        assert 0.0 <= r.wait_p50_s <= r.wait_p99_s


def test_the_binding_dimension_is_common_and_highest(short: SimulationResult) -> None:
    binding = short.binding_dimension
    assert binding == "input_tokens"
    for r in short.results:
        assert r.binding_dimension == binding
        assert r.goodput_fraction == r.utilization[binding]


def test_a_run_is_repeatable() -> None:
    scenario = Scenario(minutes=1.0, strategies=("sdk", "ratekeeper"))
    first, second = simulate(scenario), simulate(scenario)
    for a, b in zip(first.results, second.results, strict=True):
        assert (a.requests_ok, a.rate_limited, a.used, a.wait_p99_s) == (
            b.requests_ok,
            b.rate_limited,
            b.used,
            b.wait_p99_s,
        )


def test_progress_is_reported_per_strategy_up_to_the_end() -> None:
    seen: dict[str, float] = {}
    simulate(
        Scenario(minutes=0.5, strategies="rpm-only"), progress=lambda s, done, total: seen.update({s: done})
    )
    assert seen == {"rpm-only": 30.0}


def test_foreign_traffic_and_open_loop_arrivals() -> None:
    scenario = Scenario(
        minutes=1.0,
        foreign_traffic=0.3,
        strategies="ratekeeper",
        workload=Workload(concurrency=0, arrival_rate=12.0, prompt_tokens=1500, max_tokens=300),
    )
    r = simulate(scenario)["ratekeeper"]
    assert 6 <= r.requests_ok + r.requests_failed <= 20  # Poisson arrivals at 12/min for a minute
    assert r.goodput_fraction < 0.7 + 0.05  # others use 30% of every limit


def test_a_limiter_told_a_lower_tier_learns_the_servers_limits() -> None:
    """Told Tier 1 on a Tier 2 server: its OTPM alone would be 8,000 of the server's 90,000."""
    scenario = Scenario(
        preset="tier-2",
        limiter_preset="tier-1",
        minutes=1.0,
        strategies="ratekeeper",
        workload=Workload(concurrency=32, max_tokens=1024),
    )
    r = simulate(scenario)["ratekeeper"]
    assert r.requests_failed == 0
    assert r.rate_limited == 0
    assert r.goodput_fraction > 0.5  # told limits alone: at most (8,000 + 8,000) / (90,000 + 90,000)
    with pytest.raises(ConfigurationError, match="tier-9"):
        Scenario(preset="tier-2", limiter_preset="tier-9")


# ---------------------------------------------------------------------- the workload


def test_prompts_hit_their_size_under_the_emulators_tokenizer() -> None:
    gen = WorkloadGenerator(Workload(prompt_tokens=3000, prompt_spread=0.0, max_tokens=500, seed=4))
    server = EmulatedServer(EmulatorConfig(preset="tier-4"))
    for i in range(5):
        plan = gen.request(i)
        assert abs(plan.input_tokens - 3000) <= 4
        reply = server.handle(EmulatorRequest.post("/v1/messages", plan.body, plan.headers()), now=float(i))
        assert reply.status == 200
        assert server.log[-1].input_tokens == plan.input_tokens
        assert server.log[-1].planned_output_tokens == plan.output_tokens


def test_the_same_seed_gives_the_same_requests_and_spreads_hold() -> None:
    w = Workload(prompt_tokens=2000, prompt_spread=0.5, max_tokens=1000, output_ratio=0.4, seed=9)
    a, b = WorkloadGenerator(w), WorkloadGenerator(w)
    plans = [a.request(i) for i in range(200)]
    assert [p.body for p in plans[:3]] == [b.request(i).body for i in range(3)]
    sizes = [p.input_tokens for p in plans]
    outputs = [p.output_tokens for p in plans]
    assert min(sizes) >= 1000
    assert max(sizes) <= 3000
    assert abs(sum(sizes) / len(sizes) - 2000) < 100
    assert all(300 <= o <= 500 for o in outputs)


def test_a_cached_prefix_is_read_from_the_cache_once_written() -> None:
    gen = WorkloadGenerator(Workload(prompt_tokens=5000, cache_hit_ratio=0.8, max_tokens=100))
    server = EmulatedServer(EmulatorConfig(preset="tier-4"))
    first = gen.request(0)
    server.handle(EmulatorRequest.post("/v1/messages", first.body, first.headers()), now=0.0)
    assert server.log[0].cache_creation_input_tokens == first.prefix_tokens == 4000
    later = gen.request(1)
    server.handle(EmulatorRequest.post("/v1/messages", later.body, later.headers()), now=30.0)
    assert server.log[1].cache_read_input_tokens == 4000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"concurrency": 0}, r"^the workload sends nothing: give concurrency > 0 or arrival_rate > 0$"),
        ({"output_ratio": 0.0}, r"^output_ratio must be in \(0, 1\], got 0\.0$"),
        (
            {"prompt_tokens": 1000, "cache_hit_ratio": 0.5},
            r"^a cache_hit_ratio of 0\.5 of 1000 prompt tokens is a 500-token prefix, below "
            r"claude-sonnet-4-5's minimum cacheable 1024; raise prompt_tokens or cache_hit_ratio$",
        ),
    ],
)
def test_impossible_workloads_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Workload(**kwargs)  # type: ignore[arg-type]


def test_impossible_scenarios_are_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"^unknown strategy 'aiolimiter'; choose from: sdk, "):
        Scenario(strategies="sdk,aiolimiter")
    with pytest.raises(ConfigurationError, match=r"^foreign_traffic must be in \[0, 1\), got 1\.0$"):
        Scenario(foreign_traffic=1.0)


# ---------------------------------------------------------------------- the simple strategies


def test_leaky_bucket_lets_a_burst_through_then_paces() -> None:
    async def run() -> list[float]:
        bucket = LeakyBucket(3, 60.0)
        times = []
        for _ in range(5):
            await bucket.acquire()
            times.append(anyio.current_time())
        return times

    assert trio.run(run, clock=MockClock(autojump_threshold=0)) == pytest.approx([0, 0, 0, 20, 40])


def test_fixed_window_waits_for_the_next_minute_and_corrects_estimates() -> None:
    async def run() -> list[tuple[int, float]]:
        window = FixedWindow(rpm=10, itpm=1000, otpm=500)
        out = []
        for cost in (600.0, 300.0, 300.0):
            w = await window.admit(cost, 100.0)
            out.append((w, anyio.current_time()))
        window.correct(out[-1][0], -250.0, 0.0)  # the last one used 250 fewer input tokens
        w = await window.admit(200.0, 100.0)
        out.append((w, anyio.current_time()))
        return out

    result = trio.run(run, clock=MockClock(autojump_threshold=0))
    assert result == [(0, 0.0), (0, 0.0), (1, 60.0), (1, 60.0)]


def test_quantile_is_nearest_rank() -> None:
    assert quantile([], 0.5) != quantile([], 0.5)  # NaN
    assert quantile([5.0], 0.99) == 5.0
    assert quantile([float(i) for i in range(1, 101)], 0.99) == 99.0


# ---------------------------------------------------------------------- the command


def test_cli_json_has_one_line_per_strategy_with_the_required_keys(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["simulate", "--minutes", "1", "--strategies", "ratekeeper,sdk", "--json", "--no-progress"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["strategy"] for r in rows] == ["ratekeeper", "sdk"]
    for row in rows:
        assert row.keys() >= REQUIRED_KEYS
        assert not math.isnan(row["goodput_fraction"])


def test_cli_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "run.png"
    code = main(["simulate", "--minutes", "1", "--strategies", "ratekeeper,fixed-window", "--plot", str(png)])
    assert code == 0
    out = capsys.readouterr().out
    for word in ("ratekeeper", "fixed-window", "goodput"):
        assert word in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_bad_arguments_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--strategies", "nope"]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--output-ratio", "1.5"])
    assert exc.value.code == 2


def test_plain_text_table(short: SimulationResult) -> None:
    text = sim.render_text(short)
    assert "binding: ITPM" in text
    assert all(name in text for name in ("sdk", "ratekeeper", "rpm-only", "fixed-window"))


def test_public_names() -> None:
    assert set(sim.__all__) == {
        "DEFAULT_STRATEGIES",
        "STRATEGIES",
        "RequestPlan",
        "Scenario",
        "Series",
        "SimulationResult",
        "StrategyResult",
        "Workload",
        "WorkloadGenerator",
        "json_lines",
        "plot",
        "render_text",
        "simulate",
    }
    for name in sim.__all__:
        assert getattr(sim, name) is not None
