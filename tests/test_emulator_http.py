"""The emulator as a real loopback HTTP server, with the real SDK pointed at it, and the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import anthropic
import anyio
import httpx2
import pytest
from anthropic.types import MessageParam

from ratekeeper.cli._main import main
from ratekeeper.emulator import EmulatedServer, EmulatorConfig, LatencyModel, PoolLimits, serve

FAST = LatencyModel(ttft=0.01, tokens_per_second=5_000.0, error_delay=0.0)
MODEL = "claude-haiku-4-5"
HELLO: list[MessageParam] = [{"role": "user", "content": "Hello there"}]


@pytest.mark.parametrize("moment", ["admission", "response"])
def test_sdk_against_the_http_server(moment: str) -> None:
    server = EmulatedServer(EmulatorConfig(latency=FAST, report_moment=moment))  # type: ignore[arg-type]
    with serve(server, port=0) as http:
        assert http.url.startswith("http://127.0.0.1:")
        client = anthropic.Anthropic(api_key="test", base_url=http.url, max_retries=0)
        msg = client.messages.create(model=MODEL, max_tokens=30, messages=HELLO)
        assert msg.usage.output_tokens >= 1
        with client.messages.stream(model=MODEL, max_tokens=30, messages=HELLO) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert final.content[0].type == "text"
        assert final.content[0].text == text
        raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=5, messages=HELLO)
        assert raw.headers["anthropic-ratelimit-requests-remaining"] == "47"
        assert client.messages.count_tokens(model=MODEL, messages=HELLO).input_tokens == 9
        url = http.url
    assert [r.status for r in server.log] == [200, 200, 200, 200]
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(url + "/v1/messages")


def test_many_clients_connecting_at_once_are_all_answered() -> None:
    """The listen backlog holds a crowd: socketserver's default of 5 reset connections."""
    slow = LatencyModel(ttft=0.3, tokens_per_second=5_000.0, error_delay=0.0)
    server = EmulatedServer(EmulatorConfig(latency=slow, default_limits=PoolLimits(10_000, 10**9, 10**9)))
    body = {"model": MODEL, "max_tokens": 5, "messages": HELLO}
    headers = {"x-api-key": "test", "anthropic-version": "2023-06-01"}
    statuses: list[int] = []

    async def one(client: httpx2.AsyncClient) -> None:
        statuses.append((await client.post("/v1/messages", json=body, headers=headers)).status_code)

    async def crowd(url: str) -> None:
        limits = httpx2.Limits(max_connections=None)
        async with (
            httpx2.AsyncClient(base_url=url, limits=limits, timeout=10) as client,
            anyio.create_task_group() as tg,
        ):
            for _ in range(64):
                tg.start_soon(one, client)

    with serve(server, port=0) as http:
        anyio.run(crowd, http.url)
    assert statuses == [200] * 64


def test_http_server_listens_on_any_address_it_is_given_loopback_by_default() -> None:
    # issue 15: `emulate --host` takes the address the user names (a container's 0.0.0.0, say)
    with serve(EmulatorConfig(), port=0) as http:
        assert (http.host, http.loopback) == ("127.0.0.1", True)
    with serve(EmulatorConfig(), host="0.0.0.0", port=0) as http:
        assert http.loopback is False
        # every interface includes loopback: ask it there, nothing leaves the machine
        req = urllib.request.Request(
            f"http://127.0.0.1:{http.port}/v1/messages/count_tokens",
            data=b'{"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "Hi"}]}',
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200


def test_cli_emulate_warns_when_not_on_loopback() -> None:
    code = "from ratekeeper.cli._main import main; raise SystemExit(main())"
    args = [sys.executable, "-c", code, "emulate", "--port", "0", "--host", "0.0.0.0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        assert proc.stdout.readline().startswith("listening on http://0.0.0.0:")
        assert proc.stderr.readline().strip() == (
            "ratekeeper emulate: 0.0.0.0 is not a loopback address: other machines can reach the "
            "emulator, and it checks no API key"
        )
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0


def test_cli_without_a_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "emulate" in out
    assert out.startswith("usage: ratekeeper")


def test_cli_emulate_serves_until_interrupted() -> None:
    code = "from ratekeeper.cli._main import main; raise SystemExit(main())"
    args = [sys.executable, "-c", code, "emulate", "--port", "0", "--ttft", "0.01", "--preset", "tier-2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.removeprefix("listening on ")
        req = urllib.request.Request(
            url + "/v1/messages/count_tokens",
            data=b'{"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "Hi"}]}',
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["anthropic-ratelimit-requests-limit"] == "2000"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cli_emulate_stops_on_an_interrupt_or_term_even_started_with_sigint_ignored(signum: int) -> None:
    """A shell script's background job (``ratekeeper emulate &``) starts with SIGINT ignored."""
    code = "from ratekeeper.cli._main import main; raise SystemExit(main())"
    args = [sys.executable, "-c", code, "emulate", "--port", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=ignore_sigint
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("listening on http://127.0.0.1:")
        proc.send_signal(signum)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _raw_post(url: str, head: bytes, body: bytes = b"") -> bytes:
    """Send one hand-made POST and read the answer until the server closes."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=5) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n" + head + b"\r\n" + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("length", [b"1001", b"10000000000", b"-1", b"ten"])
def test_http_server_refuses_a_body_over_the_cap_unread(length: bytes) -> None:
    server = EmulatedServer(EmulatorConfig(latency=FAST, max_request_bytes=1000))
    with serve(server, port=0) as http:
        # the body is never sent: a server reading it would wait, the test's timeout would fire
        answer = _raw_post(http.url, b"content-length: " + length + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"type": "request_too_large"' in answer
    assert server.log == []


@pytest.mark.parametrize(
    "head",
    [b"content-type: application/json\r\n", b"transfer-encoding: chunked\r\n"],
    ids=["no length", "chunked"],
)
def test_http_server_refuses_a_post_without_a_content_length(head: bytes) -> None:
    server = EmulatedServer(EmulatorConfig(latency=FAST))
    with serve(server, port=0) as http:
        answer = _raw_post(http.url, head, b'{"model": "claude-sonnet-4-5"}')
    assert answer.startswith(b"HTTP/1.1 411 "), answer[:200]
    assert b"content-length" in answer.split(b"\r\n\r\n", 1)[1]
    assert answer.count(b"HTTP/1.1") == 1  # the body was not read as another request
    assert server.log == []


def test_http_server_takes_a_response_moment_report_when_it_sends() -> None:
    slow = LatencyModel(ttft=0.3, tokens_per_second=1000.0, jitter=0.0, error_delay=0.001)
    server = EmulatedServer(EmulatorConfig(latency=slow, report_moment="response"))
    seen: list[str] = []
    with serve(server, port=0) as http:
        client = anthropic.Anthropic(api_key="test", base_url=http.url, max_retries=0)

        def first() -> None:
            raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=5, messages=HELLO)
            seen.append(raw.headers["anthropic-ratelimit-requests-remaining"])

        thread = threading.Thread(target=first)
        thread.start()
        while not server.log:  # the first is admitted
            time.sleep(0.005)
        client.messages.create(model=MODEL, max_tokens=5, messages=HELLO)
        thread.join()
    assert seen == ["48"]  # the second, admitted while the first was under way, is counted
