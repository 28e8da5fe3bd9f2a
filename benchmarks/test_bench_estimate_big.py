"""What a 10 MB body costs the estimator, next to ``json.dumps`` of it in the same run.

The body holds an image and a PDF of 7.5 MB each (base64) and a 1 MB text block
behind a cache breakpoint: the estimator decodes the media's headers, measures
the text and hashes the cached prefix, each at C speed, so its cost must stay a
small multiple of serializing the body, which the SDK does anyway.

Run: pytest benchmarks/test_bench_estimate_big.py --benchmark-only --benchmark-columns=min,median
Under ``--benchmark-disable`` (CI) each runs once and checks the estimate only.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib
from typing import Any

from pytest_benchmark.fixture import BenchmarkFixture

from ratekeeper import TokenEstimator

CC = {"type": "ephemeral"}


def _png_header() -> bytes:
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def heavy_body() -> dict[str, Any]:
    """About 21 MB of JSON: a 1x1 PNG and a PDF padded to 7.5 MB each, 1 MB of text, two breakpoints."""
    big = os.urandom(7_500_000)
    image = base64.b64encode(_png_header() + big).decode()
    pdf = base64.b64encode(b"%PDF-1.4\n" + big).decode()
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": pdf}},
        {"type": "text", "text": "x" * 1_000_000, "cache_control": CC},
    ]
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1000,
        "system": [{"type": "text", "text": "You are terse. " * 1_000, "cache_control": CC}],
        "messages": [{"role": "user", "content": content}],
    }


BODY = heavy_body()


def test_estimate_10mb_body(benchmark: BenchmarkFixture) -> None:
    est = TokenEstimator()
    e = benchmark(est.estimate, BODY, 0.0)
    assert e.demand.cache_creation_input_tokens > 0


def test_json_dumps_10mb_baseline(benchmark: BenchmarkFixture) -> None:
    assert len(benchmark(json.dumps, BODY)) > 20_000_000
