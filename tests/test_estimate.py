"""Token estimation, online calibration and prompt-cache prediction.

Expected numbers are worked out by hand from the documented rules, never read
back from the code: 3.5 UTF-8 bytes a token (the newer tokenizer: 1.3 times
the tokens), rounded up over the whole request; 4 tokens a request, 3 a
message, 8 a custom tool plus the tool-use system prompt (346 for tool_choice
auto/none, 313 for any/tool); images width * height / 750 after scaling to a
1568 px edge and at most 1,600 tokens; PDFs 3,100 tokens a page.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
import re
import struct
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ratekeeper
from ratekeeper import (
    CachePrediction,
    Calibration,
    ConfigurationError,
    Estimate,
    PromptCachePredictor,
    TokenEstimator,
    UnknownModelError,
)
from ratekeeper.estimate._body_fields import json_len
from ratekeeper.estimate._media import image_size

SONNET = "claude-sonnet-4-5"
Body = dict[str, Any]


def user(content: object) -> dict[str, object]:
    return {"role": "user", "content": content}


def assistant(content: object) -> dict[str, object]:
    return {"role": "assistant", "content": content}


def text(s: str, **extra: object) -> dict[str, object]:
    return {"type": "text", "text": s, **extra}


CC = {"type": "ephemeral"}
CC_1H = {"type": "ephemeral", "ttl": "1h"}


def body(*messages: object, model: str = SONNET, max_tokens: int = 1000, **extra: object) -> Body:
    return {"model": model, "max_tokens": max_tokens, "messages": list(messages), **extra}


def estimate(b: Mapping[str, Any], est: TokenEstimator | None = None, now: float = 0.0) -> Estimate:
    return (est or TokenEstimator()).estimate(b, now=now)


# ------------------------------------------------------------------------ image and PDF fixtures


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(width: int, height: int) -> bytes:
    """A complete, valid PNG (greyscale, all black)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(width) for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b";"


def jpeg(width: int, height: int, exif_bytes: int = 5000, exif_blocks: int = 1) -> bytes:
    """SOI, JFIF APP0, padded APP1s (EXIF stand-ins) and SOF0: what the size reader must walk."""

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    app0 = segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    app1 = segment(0xE1, b"Exif\x00\x00" + bytes(exif_bytes))
    sof0 = segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
    return b"\xff\xd8" + app0 + app1 * exif_blocks + sof0 + b"\xff\xd9"


def webp(chunk: bytes, payload: bytes) -> bytes:
    """A RIFF WebP container holding one chunk."""
    riff = b"WEBP" + chunk + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(riff)) + riff


def webp_vp8x(width: int, height: int) -> bytes:
    return webp(b"VP8X", bytes(4) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little"))


def webp_vp8l(width: int, height: int) -> bytes:
    return webp(b"VP8L", b"\x2f" + struct.pack("<I", (width - 1) | ((height - 1) << 14)))


def webp_vp8(width: int, height: int) -> bytes:
    return webp(b"VP8 ", b"\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", width, height))


def image(data: bytes, media_type: str = "image/png") -> dict[str, object]:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": b64(data)}}


def pdf(data: bytes) -> dict[str, object]:
    return {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": b64(data)},
    }


def fake_pdf(pages: int) -> bytes:
    kids = b" ".join(b"%d 0 R" % (i + 3) for i in range(pages))
    parts = [b"%PDF-1.4\n", b"2 0 obj << /Type /Pages /Kids [" + kids + b"] /Count %d >> endobj\n" % pages]
    for i in range(pages):
        # Both spellings occur in real files.
        kind = b"/Type /Page" if i % 2 else b"/Type/Page"
        parts.append(b"%d 0 obj << " % (i + 3) + kind + b" /Parent 2 0 R >> endobj\n")
    return b"".join(parts) + b"%%EOF\n"


# ------------------------------------------------------------------------ estimates, table

X350 = "x" * 350  # 100 tokens of text

ESTIMATE_CASES: list[tuple[str, Body, int]] = [
    ("plain text", body(user(X350)), 100 + 4 + 3),
    ("two messages", body(user(X350), assistant("y" * 350)), 200 + 4 + 2 * 3),
    ("rounds up over the request", body(user("x" * 351)), 101 + 4 + 3),
    ("system string", body(user(X350), system="s" * 700), 300 + 4 + 3),
    ("system blocks", body(user(X350), system=[text("s" * 350), text("t" * 350)]), 300 + 4 + 3),
    ("non-ASCII text counts UTF-8 bytes", body(user("é" * 175)), 100 + 4 + 3),
    (
        # name 11 + description 39 + '{"type":"object"}' 17 + 283 = 350 characters
        "custom tool",
        body(
            user("x" * 283),
            tools=[{"name": "get_weather", "description": "d" * 39, "input_schema": {"type": "object"}}],
        ),
        100 + 4 + 3 + 8 + 346,
    ),
    (
        "tool_choice any uses the shorter tool prompt",
        body(
            user("x" * 283),
            tools=[{"name": "get_weather", "description": "d" * 39, "input_schema": {"type": "object"}}],
            tool_choice={"type": "any"},
        ),
        100 + 4 + 3 + 8 + 313,
    ),
    (
        "server tool",
        body(user(X350), tools=[{"type": "bash_20250124", "name": "bash"}]),
        100 + 4 + 3 + 245 + 346,
    ),
    (
        "unknown server tool",
        body(user(X350), tools=[{"type": "web_search_20250305", "name": "web_search"}]),
        100 + 4 + 3 + 300 + 346,
    ),
    (
        # 100 + tool_use (id 7 + name 11 + '{"city":"Paris"}' 16) + tool_result (id 7 + 209)
        "tool_use and tool_result",
        body(
            user("x" * 100),
            assistant(
                [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]
            ),
            user([{"type": "tool_result", "tool_use_id": "toolu_1", "content": "r" * 209}]),
        ),
        100 + 4 + 3 * 3,
    ),
    (
        "tool_result with nested blocks",
        body(
            user([{"type": "tool_result", "tool_use_id": "", "content": [text("a" * 150), text("b" * 200)]}])
        ),
        100 + 4 + 3,
    ),
    (
        "thinking text counts, its signature does not",
        body(
            user("x" * 175), assistant([{"type": "thinking", "thinking": "t" * 175, "signature": "s" * 999}])
        ),
        100 + 4 + 2 * 3,
    ),
    (
        "redacted thinking: 3/4 of its base64",
        body(user("x" * 50), assistant([{"type": "redacted_thinking", "data": "r" * 400}])),
        100 + 4 + 2 * 3,
    ),
    (
        "plain-text document with a title",
        body(
            user(
                [
                    {
                        "type": "document",
                        "source": {"type": "text", "media_type": "text/plain", "data": "d" * 300},
                        "title": "t" * 50,
                    }
                ]
            )
        ),
        100 + 4 + 3,
    ),
    (
        "search result",
        body(
            user(
                [
                    {
                        "type": "search_result",
                        "source": "s" * 10,
                        "title": "t" * 40,
                        "content": [text("c" * 300)],
                    }
                ]
            )
        ),
        100 + 4 + 3,
    ),
    (
        # '{"type":"future_block","payload":"p"}' is 38 characters, + 312 = 350
        "an unknown block type counts as its JSON",
        body(user([{"type": "future_block", "payload": "p"}, text("x" * 312)])),
        100 + 4 + 3,
    ),
    (
        "thinking budget is output, not input",
        body(user(X350), max_tokens=8000, thinking={"type": "enabled", "budget_tokens": 4000}),
        100 + 4 + 3,
    ),
    ("Opus 4.1: classic tokenizer", body(user("x" * 3500), model="claude-opus-4-1"), 1000 + 4 + 3),
    ("Opus 4.7: 30% more tokens", body(user("x" * 3500), model="claude-opus-4-7"), 1300 + 4 + 3),
    ("Sonnet 5: 30% more tokens", body(user("x" * 3500), model="claude-sonnet-5"), 1300 + 4 + 3),
    ("Fable 5: 30% more tokens", body(user("x" * 3500), model="claude-fable-5"), 1300 + 4 + 3),
    ("Haiku 3.5, old-style id", body(user("x" * 3500), model="claude-3-5-haiku-20241022"), 1000 + 4 + 3),
]


@pytest.mark.parametrize(
    ("b", "expected"), [c[1:] for c in ESTIMATE_CASES], ids=[c[0] for c in ESTIMATE_CASES]
)
def test_estimate_table(b: Body, expected: int) -> None:
    e = estimate(b)
    assert e.demand.input_tokens == expected
    assert e.input_tokens == expected
    assert (e.demand.cache_read_input_tokens, e.demand.cache_creation_input_tokens) == (0, 0)
    assert e.demand.max_tokens == b["max_tokens"]


def test_newer_tokenizer_is_30_percent_more_on_text() -> None:
    old = estimate(body(user("x" * 35_000), model="claude-opus-4-6"))
    new = estimate(body(user("x" * 35_000), model="claude-opus-4-8"))
    assert new.text_tokens / old.text_tokens == pytest.approx(1.3)
    assert (old.family, new.family) == ("opus-4", "opus-4.7")


def test_estimate_carries_calibration_data() -> None:
    e = estimate(body(user(X350), thinking={"type": "enabled", "budget_tokens": 2000}, max_tokens=4000))
    assert (e.model, e.family, e.factor, e.counted_tokens, e.thinking) == (
        SONNET,
        "sonnet-4",
        1.0,
        None,
        True,
    )
    assert e.text_tokens == pytest.approx(100.0)
    assert e.fixed_tokens == 4 + 3


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("claude-opus-4-20250514", "opus-4"),
        ("claude-opus-4-5", "opus-4"),
        ("claude-opus-4-7", "opus-4.7"),
        ("anthropic/claude-opus-4.8", "opus-4.7"),
        ("claude-sonnet-4-6", "sonnet-4"),
        ("claude-sonnet-5", "sonnet-5"),
        ("claude-3-7-sonnet-latest", "sonnet-3.7"),
        ("claude-haiku-4-5-20251001", "haiku-4.5"),
        ("claude-3-haiku-20240307", "haiku-3"),
        ("claude-3-opus-latest", "opus-3"),
        ("claude-fable-5", "fable-5"),
    ],
)
def test_family_of(model: str, family: str) -> None:
    assert TokenEstimator.family_of(model) == family


# ------------------------------------------------------------------------ images and PDFs

IMAGE_CASES: list[tuple[str, dict[str, object], int]] = [
    ("PNG 200x200", image(png(200, 200)), 54),  # 40,000 / 750 = 53.3
    ("PNG 1x1: at least one token", image(png(1, 1)), 1),
    ("PNG 1568x500: no scaling", image(png(1568, 500)), 1046),  # 784,000 / 750 = 1045.3
    ("PNG 2000x100: scaled to 1568x78.4", image(png(2000, 100)), 164),  # 122,931 / 750 = 163.9
    ("PNG 3136x1568: capped", image(png(3136, 1568)), 1600),  # 1568x784 would be 1,639
    ("GIF 300x150", image(gif(300, 150), "image/gif"), 60),
    ("JPEG 1000x1000 behind a 5 KB EXIF block", image(jpeg(1000, 1000), "image/jpeg"), 1334),
    ("JPEG 4000x3000: capped", image(jpeg(4000, 3000), "image/jpeg"), 1600),
    ("WebP VP8X 800x600", image(webp_vp8x(800, 600), "image/webp"), 640),
    ("WebP VP8L 100x75", image(webp_vp8l(100, 75), "image/webp"), 10),
    ("WebP VP8 160x120", image(webp_vp8(160, 120), "image/webp"), 26),  # 19,200 / 750 = 25.6
    ("URL image: the default", {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}, 1600),
    (
        "Files API image: the default",
        {"type": "image", "source": {"type": "file", "file_id": "file_1"}},
        1600,
    ),
    ("not base64: the default", {"type": "image", "source": {"type": "base64", "data": "!!!"}}, 1600),
    ("not an image: the default", image(b"hello, world"), 1600),
]


@pytest.mark.parametrize(("block", "tokens"), [c[1:] for c in IMAGE_CASES], ids=[c[0] for c in IMAGE_CASES])
def test_image_tokens(block: dict[str, object], tokens: int) -> None:
    e = estimate(body(user([block, text(X350)])))
    assert e.demand.input_tokens == 100 + 4 + 3 + tokens


def test_jpeg_beyond_the_header_window_falls_back() -> None:
    # 128 KiB of base64 is 96 KiB of JPEG: a SOF after one 60 KB segment is in
    # reach, after two it is not, and the image gets the default.
    assert image_size(b64(jpeg(10, 10, exif_bytes=60_000))) == (10, 10)
    assert image_size(b64(jpeg(10, 10, exif_bytes=60_000, exif_blocks=2))) is None
    e = estimate(body(user([image(jpeg(10, 10, 60_000, 2), "image/jpeg"), text(X350)])))
    assert e.demand.input_tokens == 100 + 4 + 3 + 1600


@pytest.mark.parametrize(
    ("fmt", "media"), [("PNG", "png"), ("JPEG", "jpeg"), ("GIF", "gif"), ("WEBP", "webp")]
)
@pytest.mark.parametrize("lossless", [False, True])
def test_image_sizes_of_real_files(fmt: str, media: str, lossless: bool) -> None:
    pil = pytest.importorskip("PIL.Image")
    buf = io.BytesIO()
    pil.new("RGB", (321, 123), (200, 30, 30)).save(buf, format=fmt, lossless=lossless)
    assert image_size(b64(buf.getvalue())) == (321, 123)


PDF_CASES: list[tuple[str, dict[str, object], int]] = [
    ("4 page objects", pdf(fake_pdf(4)), 4),
    ("1 page", pdf(fake_pdf(1)), 1),
    ("no visible page objects: 60 KB at 25 KB a page", pdf(b"%PDF-1.5\n" + bytes(59_991)), 3),
    ("at most 100 pages", pdf(fake_pdf(250)), 100),
    ("URL: five pages", {"type": "document", "source": {"type": "url", "url": "https://x/y.pdf"}}, 5),
    ("Files API: five pages", {"type": "document", "source": {"type": "file", "file_id": "file_1"}}, 5),
]


@pytest.mark.parametrize(("block", "pages"), [c[1:] for c in PDF_CASES], ids=[c[0] for c in PDF_CASES])
def test_pdf_pages(block: dict[str, object], pages: int) -> None:
    e = estimate(body(user([block, text(X350)])))
    assert e.demand.input_tokens == 100 + 4 + 3 + 3100 * pages


# ------------------------------------------------------------------------ exact counter


def test_counter_replaces_the_character_estimate() -> None:
    seen: list[Mapping[str, Any]] = []

    def counter(b: Mapping[str, Any]) -> int:
        seen.append(b)
        return 5000

    b = body(user(X350))
    e = TokenEstimator(counter=counter).estimate(b, now=0.0)
    assert seen == [b]
    assert (e.demand.input_tokens, e.counted_tokens) == (5000, 5000)
    assert e.text_tokens == pytest.approx(100.0)  # still there for calibration


def test_counter_total_is_split_by_the_cache_predictor() -> None:
    # Estimated: the system prefix is 4,000 + 4 = 4,004 of 4,008 tokens; the
    # counter says 8,016, so the prefix is 8,016 * 4,004 / 4,008 = 8,008.
    b = body(user("hi"), system=[text("s" * 14_000, cache_control=CC)])
    est = TokenEstimator(counter=lambda _: 8016)
    e = est.estimate(b, now=0.0)
    assert (e.demand.cache_creation_input_tokens, e.demand.input_tokens) == (8008, 8)
    est.predictor.record(e, now=1.0)
    e2 = est.estimate(b, now=2.0)
    assert (e2.demand.cache_read_input_tokens, e2.demand.input_tokens) == (8008, 8)


@pytest.mark.parametrize("bad", [-1, 1.5, "12", None, True])
def test_counter_result_must_be_a_count(bad: object) -> None:
    est = TokenEstimator(counter=lambda _: bad)  # type: ignore[arg-type, return-value]
    with pytest.raises(
        ConfigurationError,
        match=rf"^the token counter's result must be a non-negative integer, got {re.escape(repr(bad))}$",
    ):
        est.estimate(body(user("hi")), now=0.0)


# ------------------------------------------------------------------------ calibration


def synthetic_run(
    model: str, true_chars_per_token: float, observations: int, seed: int = 1
) -> tuple[TokenEstimator, Callable[[int], tuple[Estimate, int]]]:
    """An estimator trained on ``observations`` requests whose true token counts follow a hidden ratio.

    Truth: text at ``true_chars_per_token`` with +-3% noise a request, plus 9
    tokens of framing (the estimator assumes 7).
    """
    rng = random.Random(seed)
    est = TokenEstimator()

    def request(chars: int) -> tuple[Estimate, int]:
        e = est.estimate(body(user("x" * chars), model=model), now=0.0)
        truth = round(chars / true_chars_per_token * rng.uniform(0.97, 1.03)) + 9
        return e, truth

    for _ in range(observations):
        e, truth = request(rng.randint(2_000, 40_000))
        est.observe(e, {"input_tokens": truth, "output_tokens": 10})
    return est, request


def relative_errors(request: Callable[[int], tuple[Estimate, int]], n: int = 200) -> list[float]:
    rng = random.Random(99)
    errors = []
    for _ in range(n):
        e, truth = request(rng.randint(2_000, 40_000))
        errors.append(abs(e.input_tokens - truth) / truth)
    return errors


@pytest.mark.parametrize(
    ("model", "true_cpt", "n", "mean_error", "max_error"),
    [
        # Uncalibrated, a 2.8 true ratio is 20% off; the +-3% per-request noise is the floor
        # (1.5% mean). Over 20 seeds: 1.6% mean / 4.5% worst after 5, 1.5% / 4.1% after 10.
        ("claude-sonnet-4-5", 2.8, 0, 0.21, 0.26),
        ("claude-sonnet-4-5", 2.8, 5, 0.025, 0.055),
        ("claude-sonnet-4-5", 2.8, 10, 0.02, 0.045),
        ("claude-sonnet-4-5", 2.8, 20, 0.02, 0.045),
        ("claude-opus-4-7", 2.4, 20, 0.02, 0.045),
        ("claude-haiku-4-5", 4.2, 20, 0.02, 0.045),
    ],
)
def test_calibration_converges(
    model: str, true_cpt: float, n: int, mean_error: float, max_error: float
) -> None:
    est, request = synthetic_run(model, true_cpt, n)
    errors = relative_errors(request)
    assert sum(errors) / len(errors) < mean_error
    assert max(errors) < max_error
    cal = est.calibration(TokenEstimator.family_of(model))
    assert cal.observations == n


def test_calibration_is_per_family() -> None:
    est, _ = synthetic_run("claude-opus-4-1", 2.8, 10)
    assert est.calibration("opus-4").factor == pytest.approx(3.5 / 2.8, rel=0.03)
    assert est.calibration("opus-4.7") == Calibration("opus-4.7")
    assert est.estimate(body(user("x" * 3500), model="claude-opus-4-7"), now=0.0).factor == 1.0


def test_calibration_counts_cache_reads_and_writes_as_input() -> None:
    est = TokenEstimator()
    e = est.estimate(body(user("x" * 3500)), now=0.0)  # 1,000 + 7
    est.observe(e, {"input_tokens": 7, "cache_read_input_tokens": 1500, "cache_creation_input_tokens": 500})
    assert est.calibration("sonnet-4").factor == pytest.approx(2.0, rel=0.01)


def test_calibration_factor_is_clamped() -> None:
    est = TokenEstimator()
    e = est.estimate(body(user(X350)), now=0.0)
    for _ in range(100):
        est.observe(e, {"input_tokens": 10**9})
    assert est.calibration("sonnet-4").factor == pytest.approx(4.0, rel=0.01)
    for _ in range(100):
        est.observe(e, {"input_tokens": 1})
    assert est.calibration("sonnet-4").factor == pytest.approx(0.25, rel=0.01)


def test_image_heavy_requests_barely_move_the_text_factor() -> None:
    est = TokenEstimator()
    e = est.estimate(body(user([image(png(4000, 3000))] * 10 + [text("x" * 35)])), now=0.0)
    # 10 text tokens against 16,007 fixed: whatever the truth, the factor hardly moves.
    est.observe(e, {"input_tokens": 30_000})
    assert est.calibration("sonnet-4").factor < 1.01


def test_expected_output_learns_the_share_of_max_tokens() -> None:
    est = TokenEstimator()
    b = body(user(X350), max_tokens=1000)
    assert est.estimate(b, now=0.0).demand.expected_output_tokens == 1000  # before any usage: all of it
    for output in (200, 300, 250):
        est.observe(est.estimate(b, now=0.0), {"input_tokens": 107, "output_tokens": output})
    cal = est.calibration("sonnet-4")
    assert cal.output_ratio == pytest.approx(0.25)
    assert cal.output_observations == 3
    assert est.estimate(body(user(X350), max_tokens=4000), now=0.0).demand.expected_output_tokens == 1000
    # Capped at max_tokens, and thinking requests are learned apart.
    thinking = body(user(X350), max_tokens=2000, thinking={"type": "enabled", "budget_tokens": 1024})
    assert est.estimate(thinking, now=0.0).demand.expected_output_tokens == 2000
    est.observe(est.estimate(thinking, now=0.0), {"input_tokens": 107, "output_tokens": 5000})
    assert est.calibration("sonnet-4").thinking_output_ratio == 1.0
    assert est.estimate(thinking, now=0.0).demand.expected_output_tokens == 2000


def test_observe_rejects_what_is_not_usage() -> None:
    est = TokenEstimator()
    e = est.estimate(body(user("hi")), now=0.0)
    msg = (
        "usage is not a usage object or mapping: "
        "usage must be a mapping or an object with usage attributes, got None"
    )
    with pytest.raises(ConfigurationError, match=rf"^{re.escape(msg)}$"):
        est.observe(e, None)


def test_observe_accepts_sdk_usage_objects() -> None:
    anthropic_types = pytest.importorskip("anthropic.types")
    est = TokenEstimator()
    e = est.estimate(body(user("x" * 3500)), now=0.0)
    usage = anthropic_types.Usage(input_tokens=2007, output_tokens=5)
    est.observe(e, usage)
    assert est.calibration("sonnet-4").factor == pytest.approx(2.0, rel=0.01)


# ------------------------------------------------------------------------ priority tier


@pytest.mark.parametrize(
    ("priority_tier", "service_tier", "priority"),
    [(False, None, False), (True, None, True), (True, "auto", True), (True, "standard_only", False)],
)
def test_priority(priority_tier: bool, service_tier: str | None, priority: bool) -> None:
    b = body(user("hi"))
    if service_tier is not None:
        b["service_tier"] = service_tier
    e = TokenEstimator(priority_tier=priority_tier).estimate(b, now=0.0)
    assert e.demand.priority is priority


# ------------------------------------------------------------------------ cache prediction

S14K = "s" * 14_000  # 4,000 tokens; with the request's 4, a 4,004-token prefix
CACHED_SYSTEM = body(user("hi"), system=[text(S14K, cache_control=CC)])
CACHED_SYSTEM_1H = body(user("hi"), system=[text(S14K, cache_control=CC_1H)])


Step = tuple[float, str, tuple[int, int] | None]


def run_steps(p: PromptCachePredictor, b: Mapping[str, Any], steps: list[Step]) -> None:
    for t, op, expected in steps:
        if op == "record":
            p.record(b, now=t)
        else:
            pred = p.predict(b, now=t)
            assert (pred.read_tokens, pred.write_tokens) == expected, f"t={t}"


def test_cache_5m_steps() -> None:
    run_steps(
        PromptCachePredictor(),
        CACHED_SYSTEM,
        [
            (0.0, "predict", (0, 4004)),
            (0.5, "predict", (0, 4004)),  # sent before the first response began: a write too
            (1.0, "record", None),  # the first response starts
            (2.0, "predict", (4004, 0)),
            (300.9, "predict", (4004, 0)),
            (301.0, "predict", (0, 4004)),  # 5 minutes after the write
        ],
    )


def test_cache_hit_refreshes_the_ttl() -> None:
    run_steps(
        PromptCachePredictor(),
        CACHED_SYSTEM,
        [
            (0.0, "record", None),
            (200.0, "predict", (4004, 0)),
            (200.0, "record", None),  # the hit's response starts: refreshed until 500
            (450.0, "predict", (4004, 0)),
            (499.9, "predict", (4004, 0)),
            (500.0, "predict", (0, 4004)),
        ],
    )


def test_cache_1h_ttl() -> None:
    p = PromptCachePredictor()
    first = p.predict(CACHED_SYSTEM_1H, now=0.0)
    assert (first.write_tokens, first.write_1h_tokens) == (4004, 4004)
    run_steps(
        p,
        CACHED_SYSTEM_1H,
        [(0.0, "record", None), (3599.0, "predict", (4004, 0)), (3600.0, "predict", (0, 4004))],
    )


def test_cache_mixed_ttls_split_the_write() -> None:
    b = body(user("hi"), system=[text(S14K, cache_control=CC_1H), text("t" * 3500, cache_control=CC)])
    pred = PromptCachePredictor().predict(b, now=0.0)
    assert (pred.read_tokens, pred.write_tokens, pred.write_1h_tokens) == (0, 5004, 4004)


def test_time_running_backwards_never_shortens_an_entry() -> None:
    run_steps(
        PromptCachePredictor(),
        CACHED_SYSTEM,
        [
            (100.0, "record", None),
            (50.0, "record", None),  # a clock step back: still valid until 400
            (399.0, "predict", (4004, 0)),
            (400.0, "predict", (0, 4004)),
        ],
    )


@pytest.mark.parametrize(
    ("model", "system_chars", "cached"),
    [
        # prefix tokens = chars / 3.5 + 4
        ("claude-sonnet-4-5", 3_570, True),  # 1,024
        ("claude-sonnet-4-5", 3_566, False),  # 1,023
        ("claude-opus-4-1", 3_570, True),  # 1,024
        ("claude-sonnet-4-6", 7_000, False),  # 2,004 < 2,048
        ("claude-sonnet-4-6", 7_154, True),  # 2,048
        ("claude-3-5-haiku-latest", 7_154, True),
        ("claude-3-haiku-20240307", 7_000, False),
        ("claude-haiku-4-5", 14_000, False),  # 4,004 < 4,096
        ("claude-haiku-4-5", 14_322, True),  # 4,096
        ("claude-opus-4-5", 14_000, False),
        ("claude-opus-4-6", 14_322, True),
        # Sonnet 5's minimum is not published: 4,096 is assumed, conservatively.
        ("claude-sonnet-5", 10_000, False),  # 10,000 * 1.3 / 3.5 = 3,715, + 4 = 3,719
        ("claude-sonnet-5", 14_000, True),  # 5,204
    ],
)
def test_minimum_cacheable_length(model: str, system_chars: int, cached: bool) -> None:
    b = body(user("hi"), model=model, system=[text("s" * system_chars, cache_control=CC)])
    est = TokenEstimator()
    e = est.estimate(b, now=0.0)
    prefix = e.input_tokens - 3 - 1  # the message's framing and "hi"
    assert e.demand.cache_creation_input_tokens == (prefix if cached else 0)
    est.predictor.record(e, now=0.0)
    assert len(est.predictor) == int(cached)
    assert est.estimate(b, now=1.0).demand.cache_read_input_tokens == (prefix if cached else 0)


def test_cache_is_per_model() -> None:
    p = PromptCachePredictor()
    p.record(CACHED_SYSTEM, now=0.0)
    other = {**CACHED_SYSTEM, "model": "claude-sonnet-4-5-20250929"}  # same model, but a different id
    assert p.predict(other, now=1.0).read_tokens == 0


def growing_conversation(extra_blocks: int) -> tuple[Body, Body]:
    first = body(user([text("q1", cache_control=CC)]), system=S14K)
    second = body(
        user([text("q1")]),  # the same prefix, without its breakpoint now
        assistant([text("a" * 350)] + [text("b") for _ in range(extra_blocks)]),
        user([text("q2", cache_control=CC)]),
        system=S14K,
    )
    return first, second


def test_cache_lookback_finds_the_previous_turns_prefix() -> None:
    # first: 14,002 characters -> 4,001 + 4 + 3 = 4,008 tokens, all written
    # second: 14,354 characters -> 4,102 + 4 + 9 = 4,115; reads 4,008, writes 107
    first, second = growing_conversation(0)
    est = TokenEstimator()
    e1 = est.estimate(first, now=0.0)
    assert (e1.demand.cache_creation_input_tokens, e1.demand.input_tokens) == (4008, 0)
    est.predictor.record(e1, now=1.0)
    e2 = est.estimate(second, now=10.0)
    d = e2.demand
    assert (d.cache_read_input_tokens, d.cache_creation_input_tokens, d.input_tokens) == (4008, 107, 0)
    est.predictor.record(e2, now=11.0)
    assert len(est.predictor) == 2
    # The read refreshed the first prefix too.
    assert est.predictor.predict(first, now=305.0).read_tokens == 4008


@pytest.mark.parametrize(("extra_blocks", "hit"), [(17, True), (18, True), (19, False)])
def test_cache_lookback_is_20_blocks(extra_blocks: int, hit: bool) -> None:
    # The cached prefix ends at block 1; the new breakpoint is at block 3 + extra_blocks.
    # Blocks 20 before it are still looked at (18 extra: block 21), 21 before are not.
    first, second = growing_conversation(extra_blocks)
    p = PromptCachePredictor()
    p.record(first, now=0.0)
    assert (p.predict(second, now=1.0).read_tokens > 0) is hit


def test_cache_later_breakpoint_hit_covers_earlier_ones() -> None:
    b = body(
        user([text("x" * 3500, cache_control=CC), text("y" * 3500, cache_control=CC)]), system=[text(S14K)]
    )
    p = PromptCachePredictor()
    p.record(b, now=0.0)
    pred = p.predict(b, now=1.0)
    assert (pred.read_tokens, pred.write_tokens) == (6007, 0)  # 14,000 + 7,000 chars = 6,000, + 4 + 3


def test_tool_choice_change_invalidates_system_and_messages() -> None:
    # The tool: "t" + 3,500 + '{"type":"object"}' = 3,518 characters, 1,006 tokens.
    tools = [
        {"name": "t", "description": "d" * 3500, "input_schema": {"type": "object"}, "cache_control": CC}
    ]
    b = body(user([text("x" * 3500, cache_control=CC)]), system=[text(S14K, cache_control=CC)], tools=tools)
    p = PromptCachePredictor()
    p.record(b, now=0.0)
    assert len(p) == 3
    assert p.predict(b, now=1.0) == CachePrediction(6367, 0, 0)  # 21,018 / 3.5 -> 6,006 + 4 + 8 + 346 + 3
    changed = {**b, "tool_choice": {"type": "any"}}
    pred = p.predict(changed, now=1.0)
    # The tools prefix still reads: 1,006 + 4 + 8 + 313 = 1,331; the rest is written again:
    # 6,006 + 4 + 8 + 313 + 3 = 6,334.
    assert (pred.read_tokens, pred.write_tokens) == (1331, 6334 - 1331)


def test_thinking_change_invalidates_messages_only() -> None:
    b = body(user([text("x" * 3500, cache_control=CC)]), system=[text(S14K, cache_control=CC)])
    p = PromptCachePredictor()
    p.record(b, now=0.0)
    changed = {**b, "thinking": {"type": "enabled", "budget_tokens": 2000}}
    pred = p.predict(changed, now=1.0)
    assert (pred.read_tokens, pred.write_tokens) == (4004, 1003)


def test_cache_content_change_misses() -> None:
    p = PromptCachePredictor()
    p.record(CACHED_SYSTEM, now=0.0)
    changed = body(user("hi"), system=[text(S14K[:-1] + "t", cache_control=CC)])
    assert p.predict(changed, now=1.0).read_tokens == 0


def test_cache_memory_is_bounded_lru() -> None:
    bodies = [body(user("hi"), system=[text(c * 14_000, cache_control=CC)]) for c in "abc"]
    p = PromptCachePredictor(max_entries=2)
    for t, b in enumerate(bodies):
        p.record(b, now=float(t))
    assert len(p) == 2
    assert p.predict(bodies[0], now=3.0).read_tokens == 0
    assert p.predict(bodies[2], now=3.0).read_tokens == 4004


def test_cache_prunes_expired_entries_before_recent_ones() -> None:
    a = body(user("hi"), system=[text("a" * 14_000, cache_control=CC)])
    b_1h = body(user("hi"), system=[text("b" * 14_000, cache_control=CC_1H)])
    c = body(user("hi"), system=[text("c" * 14_000, cache_control=CC)])
    p = PromptCachePredictor(max_entries=2)
    p.record(b_1h, now=0.0)  # least recently used, but valid for an hour
    p.record(a, now=1.0)  # expires at 301
    p.record(c, now=400.0)
    assert p.predict(b_1h, now=401.0).read_tokens == 4004
    assert p.predict(c, now=401.0).read_tokens == 4004
    assert len(p) == 2


def test_record_takes_an_estimate_a_prediction_or_a_body() -> None:
    for make in (
        lambda p: TokenEstimator(predictor=p).estimate(CACHED_SYSTEM, now=0.0),
        lambda p: p.predict(CACHED_SYSTEM, now=0.0),
        lambda p: CACHED_SYSTEM,
    ):
        p = PromptCachePredictor()
        p.record(make(p), now=0.0)
        assert p.predict(CACHED_SYSTEM, now=1.0) == CachePrediction(4004, 0, 0)
        p.clear()
        assert len(p) == 0


def test_no_breakpoints_no_cache() -> None:
    p = PromptCachePredictor()
    b = body(user("x" * 14_000), system=S14K)
    p.record(b, now=0.0)
    assert len(p) == 0
    assert p.predict(b, now=1.0) == CachePrediction()


def test_reprs() -> None:
    est = TokenEstimator()
    est.observe(est.estimate(body(user(X350)), now=0.0), {"input_tokens": 207})
    # Twice the estimate, weighted by the text share 100/107: 2 ** (100 / 107) = 1.911.
    assert repr(est) == "<TokenEstimator counter=False families={sonnet-4: x1.911 (1)}>"
    assert repr(PromptCachePredictor(max_entries=7)) == "<PromptCachePredictor entries=0 max_entries=7>"


# ------------------------------------------------------------------------ malformed bodies

DEEP: object = "leaf"
for _ in range(205):
    DEEP = [DEEP]

MALFORMED: list[tuple[object, str]] = [
    ("hi", "the request body must be a mapping, got str"),
    ({}, "model must be a non-empty string, got None"),
    ({"model": " "}, "model must be a non-empty string, got ' '"),
    ({"model": SONNET}, "max_tokens must be a positive integer, got None"),
    ({"model": SONNET, "max_tokens": "x"}, "max_tokens must be a positive integer, got 'x'"),
    ({"model": SONNET, "max_tokens": 0}, "max_tokens must be a positive integer, got 0"),
    ({"model": SONNET, "max_tokens": True}, "max_tokens must be a positive integer, got True"),
    ({"model": SONNET, "max_tokens": 1.5}, "max_tokens must be a positive integer, got 1.5"),
    ({"model": SONNET, "max_tokens": 10**10}, "max_tokens must be at most 1,000,000,000, got 10000000000"),
    ({"model": SONNET, "max_tokens": 10}, "messages must be a list, got None"),
    ({**body(), "messages": "x" * 100}, "messages must be a list, got '" + "x" * 56 + "..."),
    ({**body(), "messages": ["hi"]}, "messages[0] must be a mapping, got 'hi'"),
    (body({"role": "bot", "content": "hi"}), "messages[0].role must be 'user' or 'assistant', got 'bot'"),
    (body(user(5)), "messages[0].content must be a string or a list of blocks, got 5"),
    (body(user("hi"), user([{"text": "hi"}])), "messages[1].content[0].type must be a string, got None"),
    (body(user([{"type": "text", "text": 5}])), "messages[0].content[0].text must be a string, got 5"),
    (
        body(user([{"type": "image", "source": "x"}])),
        "messages[0].content[0].source must be a mapping, got 'x'",
    ),
    (
        body(user([{"type": "image", "source": {"type": "base64"}}])),
        "messages[0].content[0].source.data must be a string, got None",
    ),
    (
        body(user([{"type": "document", "source": {"type": "base64", "data": 7}}])),
        "messages[0].content[0].source.data must be a string, got 7",
    ),
    (
        body(user([{"type": "tool_result", "tool_use_id": "t", "content": 5}])),
        "messages[0].content[0].content must be a string or a list of blocks, got 5",
    ),
    (
        body(user([{"type": "tool_result", "tool_use_id": "t", "content": [text("a"), {"type": 3}]}])),
        "messages[0].content[0].content[1].type must be a string, got 3",
    ),
    (
        body(assistant([{"type": "tool_use", "id": "t", "name": "n", "input": {"s": {1, 2}}}])),
        "messages[0].content[0].input holds a set, which is not a JSON value",
    ),
    (
        body(assistant([{"type": "tool_use", "id": "t", "name": "n", "input": DEEP}])),
        "messages[0].content[0].input is nested more than 200 levels deep",
    ),
    (
        body(assistant([{"type": "tool_use", "input": {}}])),
        "messages[0].content[0].name must be a string, got None",
    ),
    (body(user("hi"), system=5), "system must be a string or a list of blocks, got 5"),
    (body(user("hi"), system=["hi"]), "system[0] must be a mapping, got 'hi'"),
    (body(user("hi"), tools={}), "tools must be a list, got {}"),
    (body(user("hi"), tools=[{"input_schema": {}}]), "tools[0].name must be a string, got None"),
    (body(user("hi"), tools=[{"name": "n"}]), "tools[0].input_schema must be a mapping, got None"),
    (
        body(user("hi"), tools=[{"name": "n", "input_schema": "x"}]),
        "tools[0].input_schema must be a mapping, got 'x'",
    ),
    (body(user("hi"), tools=[{"type": 5}]), "tools[0].type must be a string, got 5"),
    (body(user("hi"), tool_choice="auto"), "tool_choice must be a mapping, got 'auto'"),
    (body(user("hi"), tool_choice={}), "tool_choice.type must be a string, got None"),
    (body(user("hi"), thinking=True), "thinking must be a mapping, got True"),
    (
        body(user("hi"), thinking={"type": "enabled", "budget_tokens": "lots"}),
        "thinking.budget_tokens must be a positive integer, got 'lots'",
    ),
    (body(user("hi"), service_tier=1), "service_tier must be a string, got 1"),
    (
        body(user("hi"), system=[text("s", cache_control="yes")]),
        "system[0].cache_control must be a mapping, got 'yes'",
    ),
    (
        body(user("hi"), system=[text("s", cache_control={"type": "ephemeral", "ttl": "2h"})]),
        "system[0].cache_control.ttl must be '5m' or '1h', got '2h'",
    ),
    (
        body(user("hi"), tools=[{"name": "n", "input_schema": {}, "cache_control": {"ttl": []}}]),
        "tools[0].cache_control.ttl must be '5m' or '1h', got []",
    ),
    (
        body(user([text(str(i), cache_control=CC) for i in range(5)])),
        "at most 4 cache_control breakpoints are allowed, got 5",
    ),
]


@pytest.mark.parametrize(("b", "message"), MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_bodies(b: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"^{re.escape(message)}$"):
        TokenEstimator().estimate(b, now=0.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=rf"^{re.escape(message)}$"):
        PromptCachePredictor().predict(b, now=0.0)  # type: ignore[arg-type]


def test_four_breakpoints_are_fine() -> None:
    b = body(user([text(str(i), cache_control=CC) for i in range(4)]))
    assert TokenEstimator().estimate(b, now=0.0).demand.input_tokens == 2 + 4 + 3  # "0123": 4 / 3.5


def test_unknown_model() -> None:
    with pytest.raises(UnknownModelError, match=r"^unknown model 'gpt-4'"):
        TokenEstimator().estimate(body(user("hi"), model="gpt-4"), now=0.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"learning_rate_floor": 0.0}, "learning_rate_floor must be in (0, 1], got 0.0"),
        ({"learning_rate_floor": 1.5}, "learning_rate_floor must be in (0, 1], got 1.5"),
    ],
)
def test_estimator_arguments(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"^{re.escape(message)}$"):
        TokenEstimator(**args)


@pytest.mark.parametrize("bad", [0, -1, 1.0, True])
def test_predictor_arguments(bad: object) -> None:
    with pytest.raises(ConfigurationError, match=rf"^max_entries must be a positive integer, got {bad!r}$"):
        PromptCachePredictor(max_entries=bad)  # type: ignore[arg-type]


def test_sdk_content_blocks_are_accepted() -> None:
    types = pytest.importorskip("anthropic.types")
    blocks = [
        types.TextBlock(type="text", text="x" * 175),
        types.ToolUseBlock(type="tool_use", id="", name="", input={}),
    ]
    # "x" * 175 + '{}' = 177, + 173 = 350
    e = estimate(body(user("y" * 173), assistant(blocks)))
    assert e.demand.input_tokens == 100 + 4 + 2 * 3


# ------------------------------------------------------------------------ bounded cost


# (a 10 MB body's cost is measured in benchmarks/test_bench_estimate_big.py, against json.dumps)


# ------------------------------------------------------------------------ properties

json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)
KEYS = ["model", "max_tokens", "messages", "system", "tools", "tool_choice", "thinking", "service_tier"]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), json_values, max_size=8))
def test_arbitrary_json_bodies_raise_only_configuration_errors(b: dict[str, Any]) -> None:
    try:
        e = TokenEstimator().estimate(b, now=0.0)
    except ConfigurationError:
        return
    assert e.input_tokens >= 0


MODELS = [
    "claude-sonnet-4-5",
    "claude-opus-4-7",
    "claude-3-5-haiku-latest",
    "claude-haiku-4-5",
    "claude-fable-5",
]
BLOCK_TYPES = [
    "text",
    "image",
    "document",
    "tool_use",
    "tool_result",
    "thinking",
    "redacted_thinking",
    "search_result",
    "server_tool_use",
    "web_search_tool_result",
]
cache_controls = st.none() | st.just(CC) | st.just(CC_1H) | json_values
sources = st.fixed_dictionaries(
    {"type": st.sampled_from(["base64", "url", "text", "content", "file"]) | json_values},
    optional={
        "data": st.sampled_from([b64(png(30, 20)), b64(fake_pdf(2)), "!!", ""]) | json_values,
        "media_type": st.sampled_from(["image/png", "application/pdf", "text/plain"]),
    },
)


def blocks(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"type": st.sampled_from(BLOCK_TYPES)},
        optional={
            "text": st.text(max_size=200) | json_values,
            "source": sources | json_values,
            "input": json_values,
            "name": st.text(max_size=10),
            "id": st.text(max_size=10),
            "tool_use_id": st.text(max_size=10),
            "content": st.text(max_size=50) | st.lists(inner, max_size=3) | json_values,
            "thinking": st.text(max_size=50),
            "data": st.text(max_size=50),
            "cache_control": cache_controls,
        },
    )


block_strategy = st.recursive(blocks(st.just(text("leaf"))), blocks, max_leaves=6)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant"]),
            "content": st.text(max_size=100) | st.lists(block_strategy, max_size=4),
        }
    ),
    max_size=6,
)
structured_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(MODELS), "max_tokens": st.integers(1, 200_000), "messages": messages},
    optional={
        "system": st.text(max_size=100) | st.lists(block_strategy, max_size=3),
        "tools": st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.text(max_size=10),
                    "input_schema": st.dictionaries(st.text(max_size=5), json_values),
                },
                optional={
                    "type": st.sampled_from(["custom", "bash_20250124"]),
                    "cache_control": cache_controls,
                },
            ),
            max_size=3,
        ),
        "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "tool", "none"])}),
        "thinking": st.fixed_dictionaries(
            {
                "type": st.sampled_from(["enabled", "disabled", "adaptive"]),
                "budget_tokens": st.integers(1, 10**6),
            }
        ),
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(structured_bodies, st.floats(0, 10_000), st.floats(0, 10_000))
def test_estimates_are_consistent(b: Body, t1: float, t2: float) -> None:
    est = TokenEstimator()
    try:
        e = est.estimate(b, now=t1)
    except ConfigurationError:
        return
    d = e.demand
    assert min(d.input_tokens, d.cache_read_input_tokens, d.cache_creation_input_tokens) >= 0
    assert d.cache_creation_1h_input_tokens <= d.cache_creation_input_tokens
    assert e.input_tokens >= e.fixed_tokens
    assert d.expected_output_tokens == d.max_tokens
    est.predictor.record(e, now=t1)
    later = est.estimate(b, now=t2)
    # The cache moves tokens between the three parts; it never changes the total.
    assert later.input_tokens == e.input_tokens
    assert later.demand.cache_read_input_tokens + later.demand.cache_creation_input_tokens <= e.input_tokens
    if t2 >= t1 and t2 - t1 < 300:
        # Everything written at t1 is readable until its TTL runs out.
        assert (
            later.demand.cache_read_input_tokens == d.cache_read_input_tokens + d.cache_creation_input_tokens
        )


printable = st.text(st.characters(min_codepoint=32, max_codepoint=126, exclude_characters='"\\'), max_size=20)
plain_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**70), 10**70) | printable,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(printable, c, max_size=4),
    max_leaves=20,
)


@given(plain_json)
def test_json_length_matches_json_dumps(value: object) -> None:
    assert json_len(value, "v") == len(json.dumps(value, separators=(",", ":")))


def test_public_names() -> None:
    for name in ("CachePrediction", "Calibration", "Estimate", "PromptCachePredictor", "TokenEstimator"):
        assert name in ratekeeper.__all__
    assert math.isclose(ratekeeper.TokenEstimator().calibration("x").factor, 1.0)


def test_the_reservation_adds_a_margin_of_two_typical_errors() -> None:
    """A request admitted the moment a bucket holds its estimate must not be refused for the error."""
    cold = TokenEstimator().estimate(body(user("x" * 35_000)), now=0.0)
    assert cold.margin == pytest.approx(math.exp(2 * 0.05))  # ~10.5% before anything is known
    assert cold.reserved.input_tokens == math.ceil(cold.demand.input_tokens * cold.margin)
    assert attrs.evolve(cold.reserved, input_tokens=cold.demand.input_tokens) == cold.demand
    # calibrated on requests that are off by +-3%: the margin follows the errors seen
    _, request = synthetic_run("claude-sonnet-4-5", 2.8, 40)
    warm, truth = request(20_000)
    assert 1.0 < warm.margin < 1.06
    assert warm.reserved.input_tokens >= truth * 0.98
    # an exact count needs no margin
    counted = TokenEstimator(counter=lambda _: 8016).estimate(body(user("x" * 35_000)), now=0.0)
    assert counted.margin == 1.0
    assert counted.reserved == counted.demand
