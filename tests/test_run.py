"""``run_requests`` and ``ratekeeper run``: the real SDK, wrapped, against the emulator."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import anyio
import httpx2
import pytest
from anthropic_support import FAST, POOL, in_flight

from ratekeeper import ConfigurationError, Limiter, run_requests
from ratekeeper.cli._main import main
from ratekeeper.emulator import EmulatedServer, EmulatorConfig, EmulatorTransport, LatencyModel, serve
from ratekeeper.run import BadLine, BatchRequest, Previous, RequestResult, ResultsFile, read_requests

MODEL = "claude-sonnet-4-5"
SRC = Path(__file__).resolve().parents[1] / "src"


def request(i: int, max_tokens: int = 200, model: str = MODEL) -> dict[str, Any]:
    content = f"request {i}: " + "word " * 200
    return {
        "custom_id": f"r{i}",
        "params": {
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}],
        },
    }


def write_requests(path: Path, items: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return path


def lines_of(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def inprocess_client(server: EmulatedServer) -> anthropic.AsyncAnthropic:
    http = httpx2.AsyncClient(transport=EmulatorTransport(server))
    return anthropic.AsyncAnthropic(api_key="test", http_client=http, base_url="http://emulator")


# ---------------------------------------------------------------------- the input format


def test_bad_lines_are_named_by_number_and_duplicates_by_both_lines() -> None:
    good = json.dumps(request(1))
    items = list(
        read_requests(
            [
                good,
                "",
                "{not json",
                json.dumps({"custom_id": "x y", "params": {}}),
                json.dumps({"custom_id": "r2", "params": {"model": MODEL, "max_tokens": 0, "messages": []}}),
                json.dumps({"custom_id": "r3"}),
                good,
                json.dumps({"custom_id": "r4", "params": {**request(4)["params"], "stream": True}}),
            ]
        )
    )
    assert isinstance(items[0], BatchRequest)
    assert items[0].line == 1
    assert items[1:] == [
        BadLine(3, "not JSON: Expecting property name enclosed in double quotes at column 2"),
        BadLine(4, "custom_id 'x y' must be 1 to 64 letters, digits, '_' or '-' (as the Batches API asks)"),
        BadLine(5, "r2: params.max_tokens must be a positive integer, got 0"),
        BadLine(6, "r3: params must be an object, got nothing"),
        BadLine(7, "custom_id 'r1' is already on line 1", duplicate=True),
        BadLine(8, "r4: params.stream is not allowed (the Batches API refuses it too)"),
    ]


def test_a_torn_last_line_is_cut_off_and_a_foreign_line_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    whole = json.dumps({"custom_id": "a", "result": {"type": "succeeded", "message": {}}})
    errored = json.dumps({"custom_id": "b", "result": {"type": "errored", "error": {}}})
    out.write_text(f"{whole}\n{errored}\n" + '{"custom_id": "c", "res')
    previous = Previous.read(out)
    assert previous.succeeded == {"a"}
    assert previous.errored == {"b"}
    assert previous.torn_bytes == len('{"custom_id": "c", "res')
    assert out.read_text() == f"{whole}\n{errored}\n"
    out.write_text(f"{whole}\nhello\n")
    with pytest.raises(
        ConfigurationError, match=r"out\.jsonl: line 2 is not JSON; not a results file to resume$"
    ):
        Previous.read(out)


def test_results_file_drops_the_lines_it_is_told_to_retry(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    a = {"custom_id": "a", "result": {"type": "succeeded", "message": {}}}
    b = {"custom_id": "b", "result": {"type": "errored", "error": {}}}
    out.write_text(json.dumps(a) + "\n" + json.dumps(b) + "\n")
    with ResultsFile(out, drop={"b"}) as f:
        f.write(RequestResult("b", {"type": "succeeded", "message": {}}, 1, 0.0, 0.5))
    rows = lines_of(out)
    assert [r["custom_id"] for r in rows] == ["a", "b"]
    assert rows[1] == {
        "custom_id": "b",
        "result": {"type": "succeeded", "message": {}},
        "attempts": 1,
        "timing": {"started_at": "1970-01-01T00:00:00.000Z", "seconds": 0.5},
    }


# ---------------------------------------------------------------------- the library, in process


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"], indirect=True)
async def test_every_request_is_answered_once_within_the_limit(anyio_backend: object) -> None:
    server = EmulatedServer(
        EmulatorConfig(preset="tier-1", latency=LatencyModel(ttft=0.5, tokens_per_second=60))
    )
    limiter = Limiter("tier-1")
    results: list[RequestResult] = []
    async with contextlib.aclosing(
        run_requests(inprocess_client(server), [request(i) for i in range(150)], limiter=limiter)
    ) as it:
        async for result in it:
            results.append(result)
    assert sorted(r.custom_id for r in results) == sorted(f"r{i}" for i in range(150))
    assert all(r.succeeded and r.attempts == 1 for r in results)
    assert len(server.log) == 150
    assert all(record.status == 200 for record in server.log)
    stats = limiter.statistics().pools[POOL]
    assert stats.rate_limited == 0
    assert in_flight(limiter) == 0


@pytest.mark.anyio
async def test_api_errors_are_errored_results_with_the_attempts_they_took(anyio_backend: object) -> None:
    server = EmulatedServer(EmulatorConfig(latency=FAST, overload_probability=1.0))
    limiter = Limiter("tier-1")
    client = inprocess_client(server).with_options(max_retries=1)
    async with contextlib.aclosing(
        run_requests(client, [request(0), request(1, model="claude-nope-9")], limiter=limiter)
    ) as it:
        results = {r.custom_id: r async for r in it}
    overloaded = results["r0"]
    assert overloaded.result["type"] == "errored"
    assert overloaded.result["error"]["error"]["type"] == "overloaded_error"
    assert overloaded.attempts == 2  # the SDK's retry, counted
    unknown = results["r1"]
    assert unknown.attempts == 0  # refused before sending: the preset has no limits for it
    assert unknown.result["error"]["error"]["type"] == "invalid_request_error"
    assert unknown.result["error"]["error"]["message"].startswith("ratekeeper: unknown model 'claude-nope-9'")
    assert in_flight(limiter) == 0


@pytest.mark.anyio
async def test_a_repeated_custom_id_or_a_malformed_request_raises(anyio_backend: object) -> None:
    server = EmulatedServer(EmulatorConfig(latency=FAST))
    for requests, message in [
        ([request(0), request(0)], r"^request 1: custom_id 'r0' is repeated$"),
        ([request(0), {"custom_id": "r1"}], r"^request 1: r1: params must be an object, got nothing$"),
    ]:
        limiter = Limiter("tier-4")

        async def drain(requests: list[dict[str, Any]] = requests, limiter: Limiter = limiter) -> None:
            it = run_requests(inprocess_client(server), requests, limiter=limiter)
            async with contextlib.aclosing(it):
                async for _ in it:
                    pass

        with pytest.raises(ConfigurationError, match=message):
            await drain()
        assert in_flight(limiter) == 0


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"], indirect=True)
async def test_cancelling_mid_run_loses_no_answer_and_a_resume_finishes(
    anyio_backend: object, tmp_path: Path
) -> None:
    server = EmulatedServer(
        EmulatorConfig(preset="tier-1", latency=LatencyModel(ttft=0.5, tokens_per_second=60))
    )
    out = tmp_path / "out.jsonl"
    requests = [request(i) for i in range(120)]
    limiter = Limiter("tier-1")
    with anyio.CancelScope() as scope, ResultsFile(out) as f:
        async with contextlib.aclosing(
            run_requests(inprocess_client(server), requests, limiter=limiter)
        ) as it:
            async for result in it:
                f.write(result)
                if len(lines_of(out)) == 40:
                    scope.cancel()
    assert in_flight(limiter) == 0
    first = lines_of(out)
    assert len(first) == 40
    answered = {r.request_id for r in server.log if r.status == 200}
    assert len(answered) >= 40  # some were answered by the server while the run was cancelled
    done = Previous.read(out).succeeded
    limiter = Limiter("tier-1")
    with ResultsFile(out) as f:
        todo = [r for r in requests if r["custom_id"] not in done]
        async with contextlib.aclosing(run_requests(inprocess_client(server), todo, limiter=limiter)) as it:
            async for result in it:
                f.write(result)
    ids = [row["custom_id"] for row in lines_of(out)]
    assert sorted(ids) == sorted(r["custom_id"] for r in requests)  # each exactly once
    assert in_flight(limiter) == 0


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"], indirect=True)
async def test_stop_withdraws_the_waiting_and_lets_the_sent_finish(anyio_backend: object) -> None:
    server = EmulatedServer(
        EmulatorConfig(preset="tier-1", latency=LatencyModel(ttft=2.0, tokens_per_second=20))
    )
    limiter = Limiter("tier-1")
    stop = anyio.Event()
    results: list[RequestResult] = []
    async with contextlib.aclosing(
        run_requests(inprocess_client(server), [request(i) for i in range(200)], limiter=limiter, stop=stop)
    ) as it:
        async for result in it:
            results.append(result)
            if len(results) == 10:
                stop.set()
    sent = {r.request_id for r in server.log}
    assert len(results) == len(sent) > 10  # what was sent finished; nothing else was sent
    assert len(results) < 200
    assert all(r.succeeded for r in results)
    assert in_flight(limiter) == 0
    assert limiter.statistics().pools[POOL].queue_depth == 0


# ---------------------------------------------------------------------- the command, over HTTP


@pytest.fixture
def emulator_url() -> Iterator[str]:
    server = EmulatedServer(
        EmulatorConfig(preset="tier-4", latency=LatencyModel(ttft=0.01, tokens_per_second=4000))
    )
    with serve(server, port=0) as http:
        yield http.url


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test")
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)


def test_cli_runs_a_file_and_resumes(
    emulator_url: str, api_key: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_requests(
        tmp_path / "req.jsonl", [request(i) for i in range(30)] + ["oops", request(30, model="claude-nope-9")]
    )
    out = tmp_path / "out.jsonl"
    args = ["run", str(src), "--out", str(out), "--preset", "tier-4", "--base-url", emulator_url]
    assert main(args) == 1  # one errored
    err = capsys.readouterr().err
    assert f"ratekeeper run: {src}: line 31: not JSON: Expecting value at column 1\n" in err
    assert "31 done · 30 ok · 1 errored" in err
    rows = lines_of(out)
    assert sorted(r["custom_id"] for r in rows) == sorted(f"r{i}" for i in range(31))
    assert {r["result"]["type"] for r in rows if r["custom_id"] != "r30"} == {"succeeded"}
    first_ok = next(r for r in rows if r["custom_id"] != "r30")  # r30 may finish first: it fails at once
    assert first_ok["result"]["message"]["usage"]["output_tokens"] > 0

    assert main([*args, "--json"]) == 0  # nothing left but the errored one, not retried
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert (summary["already_done"], summary["done"], summary["remaining"]) == (31, 0, 0)
    assert "31 request(s) already in" in captured.err
    assert "(1 errored; --retry-errors resends them)" in captured.err
    assert len(lines_of(out)) == 31

    assert main([*args, "--retry-errors", "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert (summary["already_done"], summary["done"], summary["errored"]) == (30, 1, 1)
    ids = [r["custom_id"] for r in lines_of(out)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(31))  # the old errored line replaced, not added to


def test_cli_strict_and_duplicates_send_nothing(
    emulator_url: str, api_key: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.jsonl"
    src = write_requests(tmp_path / "req.jsonl", [request(0), "[1]", request(1)])
    assert main(["run", str(src), "--out", str(out), "--strict", "--base-url", emulator_url]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"ratekeeper run: {src}: line 2: a request is an object with custom_id and params, got list\n"
        "ratekeeper run: 1 bad line(s); nothing sent (--strict)\n"
    )
    src = write_requests(tmp_path / "dup.jsonl", [request(0), request(1), request(0)])
    assert main(["run", str(src), "--out", str(out), "--base-url", emulator_url]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"ratekeeper run: {src}: line 3: custom_id 'r0' is already on line 1\n"
        "ratekeeper run: results are keyed by custom_id: make them unique\n"
    )
    assert not out.exists()


# ---------------------------------------------------------------------- interrupts, in a real process

SLOW = LatencyModel(ttft=0.3, tokens_per_second=100.0, jitter=0.0)


def start_run(src: Path, out: Path, url: str, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "ANTHROPIC_API_KEY": "test", "PYTHONUNBUFFERED": "1"}
    env.pop("ANTHROPIC_BASE_URL", None)
    args = [sys.executable, "-m", "ratekeeper", "run", str(src), "--out", str(out), "--base-url", url, *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_lines(out: Path, n: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} results before the run ended or 60 s passed")


@pytest.fixture
def slow_server() -> Iterator[tuple[EmulatedServer, str]]:
    server = EmulatedServer(EmulatorConfig(preset="tier-4", latency=SLOW))
    with serve(server, port=0) as http:
        yield server, http.url


def test_first_interrupt_stops_admitting_and_lets_the_sent_finish(
    slow_server: tuple[EmulatedServer, str], tmp_path: Path
) -> None:
    server, url = slow_server
    src = write_requests(tmp_path / "req.jsonl", [request(i, max_tokens=60) for i in range(200)])
    out = tmp_path / "out.jsonl"
    proc = start_run(src, out, url, "--max-concurrency", "8", "--json")
    wait_for_lines(out, 8, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "stopping: no new requests; waiting for those sent" in stderr
    rows = lines_of(out)
    summary = json.loads(stdout)
    assert summary["interrupted"] is True
    assert summary["done"] == len(rows) < 200
    assert summary["remaining"] == 200 - len(rows)
    assert f"{200 - len(rows)} remaining (run again to resume)" in stderr
    # every request the server received was answered and written: none cut off
    assert len(server.log) == len(rows)
    assert all(r["result"]["type"] == "succeeded" for r in rows)


def test_second_interrupt_cancels_and_a_kill_then_a_resume_answers_each_once(
    slow_server: tuple[EmulatedServer, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = slow_server
    # 2.3 s each: still in flight when the second signal comes
    requests = [request(i, max_tokens=200) for i in range(120)]
    src = write_requests(tmp_path / "req.jsonl", requests)
    out = tmp_path / "out.jsonl"
    proc = start_run(src, out, url, "--max-concurrency", "8")
    wait_for_lines(out, 4, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    first = proc.stderr.readline() + proc.stderr.readline()  # a blank line, then the message
    assert "stopping: no new requests" in first  # two signals at once would count as one
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "cancelling the requests in flight" in stderr
    after_cancel = len(lines_of(out))
    assert after_cancel < len(requests)

    proc = start_run(src, out, url, "--max-concurrency", "8")
    wait_for_lines(out, after_cancel + 8, proc)
    proc.kill()  # SIGKILL: no chance to tidy up
    proc.communicate(timeout=60)
    killed = len(lines_of_tolerant(out))
    assert after_cancel + 8 <= killed < len(requests)

    monkeypatch.setenv("ANTHROPIC_API_KEY", "test")
    assert main(["run", str(src), "--out", str(out), "--base-url", url, "--preset", "tier-4"]) == 0
    ids = [row["custom_id"] for row in lines_of(out)]
    assert sorted(ids) == sorted(r["custom_id"] for r in requests)  # each exactly once


def lines_of_tolerant(path: Path) -> list[str]:
    """The whole lines of ``path`` (a killed writer may leave a torn last one)."""
    return [line for line in path.read_text().split("\n")[:-1]]


# ---------------------------------------------------------------------- dry run, streaming


def test_dry_run_names_the_binding_dimension_and_sends_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = [request(i, max_tokens=1000) for i in range(100)] + [request(100, model="claude-haiku-4-5")]
    src = write_requests(tmp_path / "req.jsonl", items)
    assert main(["run", str(src), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "101 requests at tier-1 (input estimated; output counted at max_tokens)"
    assert out[1].startswith("sonnet-4.x: 100 requests / 50 RPM = 2.0 min · ")
    assert out[1].endswith(" · 100,000 output tokens / 8,000 OTPM = 12.5 min")
    assert out[2] == "  binding: OTPM"
    assert out[3].startswith("haiku-4.5: 1 requests / 50 RPM = 0.0 min")
    assert out[-1] == "time at the limit: at most 12m30s (the pools run side by side)"
    assert main(["run", str(src), "--dry-run", "--json", "--preset", "tier-2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    sonnet = summary["pools"][0]
    assert (sonnet["pool"], sonnet["binding"], sonnet["limits"]["otpm"]) == (
        "sonnet-4.x",
        "output_tokens",
        90_000,
    )
    assert sonnet["input_tokens"] > 100 * 200  # 200 words each, estimated
    assert summary["minutes"] == round(100_000 / 90_000, 3)


@pytest.mark.anyio
async def test_a_long_max_tokens_is_streamed(anyio_backend: object) -> None:
    server = EmulatedServer(EmulatorConfig(preset="tier-4", latency=FAST))
    limiter = Limiter("tier-4")
    items = [request(0, max_tokens=100), request(1, max_tokens=8192)]
    async with contextlib.aclosing(run_requests(inprocess_client(server), items, limiter=limiter)) as it:
        results = {r.custom_id: r async for r in it}
    assert [record.stream for record in sorted(server.log, key=lambda r: r.max_tokens)] == [False, True]
    message = results["r1"].result["message"]
    assert message["type"] == "message"
    assert message["usage"]["output_tokens"] > 0
    assert in_flight(limiter) == 0


@pytest.mark.anyio
async def test_leaving_the_loop_early_cancels_the_rest_and_strands_no_permit(anyio_backend: object) -> None:
    server = EmulatedServer(EmulatorConfig(preset="tier-1", latency=FAST))
    limiter = Limiter("tier-1")
    seen = 0
    results = run_requests(inprocess_client(server), [request(i) for i in range(100)], limiter=limiter)
    async with contextlib.aclosing(results):
        async for _ in results:
            seen += 1
            if seen == 5:
                break
    stats = limiter.statistics().pools[POOL]
    assert (stats.in_flight, stats.queue_depth) == (0, 0)
    assert seen == 5 < len(server.log) < 100


def test_cli_with_redis_shares_the_limit(
    emulator_url: str, api_key: None, redis_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_requests(tmp_path / "req.jsonl", [request(i) for i in range(20)])
    out = tmp_path / "out.jsonl"
    args = ["run", str(src), "--out", str(out), "--preset", "tier-4", "--base-url", emulator_url]
    assert main([*args, "--redis", redis_server.url, "--org", "test-run", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["succeeded"], summary["rate_limited"]) == (20, 0)
    import redis

    keys = redis.Redis.from_url(redis_server.url).keys("*test-run*")
    assert keys  # the pool lives in Redis, where other processes find it


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"], indirect=True)
async def test_workers_grow_while_the_limiter_admits_all_up_to_the_bound(anyio_backend: object) -> None:
    # 2 s per request, a limit far above the load: only the bound can hold the run back
    server = EmulatedServer(
        EmulatorConfig(preset="tier-4", latency=LatencyModel(ttft=2.0, tokens_per_second=20_000, jitter=0.0))
    )
    limiter = Limiter("tier-4")
    items = [request(i, max_tokens=50) for i in range(200)]
    results = run_requests(inprocess_client(server), items, limiter=limiter, max_concurrency=50)
    async with contextlib.aclosing(results):
        n = len([r async for r in results])
    assert n == 200
    # 4 workers would take 100 s; 50 at once at most, so at least 4 rounds of 2 s
    assert 8.0 <= anyio.current_time() < 12.0
    arrivals = sorted(r.arrival for r in server.log)
    assert max(sum(1 for a in arrivals if t <= a < t + 2.0) for t in arrivals) == 50


def test_cli_without_an_api_key_says_so_and_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    src = write_requests(tmp_path / "req.jsonl", [request(0)])
    out = tmp_path / "out.jsonl"
    assert main(["run", str(src), "--out", str(out), "--base-url", "http://127.0.0.1:9"]) == 2
    assert (
        capsys.readouterr().err
        == "ratekeeper run: no API key: set ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN)\n"
    )
    assert not out.exists()


def test_without_the_sdk_the_command_names_the_extra(tmp_path: Path) -> None:
    src = write_requests(tmp_path / "req.jsonl", [request(0)])
    code = (
        "import sys; sys.modules['anthropic'] = None\n"
        "import ratekeeper\n"  # run_requests is there without the SDK; it needs it only when called
        "from ratekeeper.cli._main import main\n"
        f"raise SystemExit(main(['run', {str(src)!r}, '--out', {str(tmp_path / 'out.jsonl')!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "ANTHROPIC_API_KEY": "test"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert proc.stderr == (
        "ratekeeper run: anthropic is not installed; install it with: pip install 'ratekeeper[anthropic]'\n"
    )


def test_dry_run_with_count_tokens_uses_the_exact_counts(
    emulator_url: str, api_key: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = [request(i) for i in range(10)]
    src = write_requests(tmp_path / "req.jsonl", items)
    args = ["run", str(src), "--dry-run", "--json", "--base-url", emulator_url, "--preset", "tier-4"]
    assert main(args) == 0
    estimated = json.loads(capsys.readouterr().out)
    assert estimated["input_tokens"] == "estimated"
    assert main([*args, "--count-tokens"]) == 0
    counted = json.loads(capsys.readouterr().out)
    assert counted["input_tokens"] == "counted"
    # the emulator's own count of the same text, which the estimator overestimates
    client = anthropic.Anthropic(api_key="test", base_url=emulator_url)
    exact = sum(
        client.messages.count_tokens(model=MODEL, messages=r["params"]["messages"]).input_tokens
        for r in items
    )
    assert counted["pools"][0]["input_tokens"] == exact < estimated["pools"][0]["input_tokens"]
    src = write_requests(tmp_path / "bad.jsonl", [request(0, model="claude-nope-9")])
    assert main(["run", str(src), "--dry-run", "--count-tokens", "--base-url", emulator_url]) == 1
    assert capsys.readouterr().err.startswith("ratekeeper run: count_tokens failed for 1 request(s); r0: ")


@pytest.mark.anyio
async def test_a_request_withdrawn_between_its_grant_and_its_send_is_not_sent() -> None:
    # The race behind a flaky stop: the stop saw no attempt yet and cancelled, but the waiter had
    # been granted; the cancel must land before the transport runs, not at its first checkpoint.
    from ratekeeper.run._engine import _FLIGHT, _count_attempt, _Flight

    sent: list[object] = []

    async def call_next(request: object) -> object:
        sent.append(request)
        return "response"

    flight = _Flight(anyio.CancelScope())
    token = _FLIGHT.set(flight)
    try:
        with flight.scope:
            flight.scope.cancel()
            await _count_attempt("request", call_next)
    finally:
        _FLIGHT.reset(token)
    assert sent == []
    assert flight.scope.cancelled_caught
    assert flight.attempts == 0
