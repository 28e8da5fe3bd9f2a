"""Presets and model-id resolution.

The expected numbers below are transcribed by hand from the spec's tables
(/work/shared/spec/anthropic-rate-limits.md, section 3), never read from the
JSON file they check.
"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ratekeeper
from ratekeeper import (
    BatchLimits,
    ConfigurationError,
    ModelLimits,
    SpendCap,
    UnknownModelError,
    batch_limits,
    cache_reads_count,
    count_tokens_rpm,
    limits_for,
    long_context_limits,
    model_classes,
    pool_for,
    preset_names,
    register_model,
    resolve_model,
    spend_cap,
)
from ratekeeper.core import _model_ids, _presets

# ---------------------------------------------------------------- the spec, transcribed

Row = tuple[int, int, int]  # RPM, ITPM, OTPM

TIERS = ("tier-1", "tier-2", "tier-3", "tier-4")
PLANS = ("start", "build", "scale")

# Tier 1-4 scheme (2025 docs = seed 003): class -> (Tier 1, Tier 2, Tier 3, Tier 4)
TIER_TABLE: dict[str, tuple[Row, Row, Row, Row]] = {
    "sonnet-4": (
        (50, 30_000, 8_000),
        (1_000, 450_000, 90_000),
        (2_000, 800_000, 160_000),
        (4_000, 2_000_000, 400_000),
    ),
    "sonnet-3.7": (
        (50, 20_000, 8_000),
        (1_000, 40_000, 16_000),
        (2_000, 80_000, 32_000),
        (4_000, 200_000, 80_000),
    ),
    "haiku-4.5": (
        (50, 50_000, 10_000),
        (1_000, 450_000, 90_000),
        (2_000, 1_000_000, 200_000),
        (4_000, 4_000_000, 800_000),
    ),
    "haiku-3.5": (
        (50, 50_000, 10_000),
        (1_000, 100_000, 20_000),
        (2_000, 200_000, 40_000),
        (4_000, 400_000, 80_000),
    ),
    "haiku-3": (
        (50, 50_000, 10_000),
        (1_000, 100_000, 20_000),
        (2_000, 200_000, 40_000),
        (4_000, 400_000, 80_000),
    ),
    "opus-4": (
        (50, 30_000, 8_000),
        (1_000, 450_000, 90_000),
        (2_000, 800_000, 160_000),
        (4_000, 2_000_000, 400_000),
    ),
    "opus-3": (
        (50, 20_000, 4_000),
        (1_000, 40_000, 8_000),
        (2_000, 80_000, 16_000),
        (4_000, 400_000, 80_000),
    ),
}
TIER_DAGGER = {"haiku-3.5", "haiku-3", "opus-3"}

# Start / Build / Scale scheme (late-2026 docs): class -> (Start, Build, Scale)
_BIG: tuple[Row, Row, Row] = (
    (1_000, 2_000_000, 400_000),
    (5_000, 5_000_000, 1_000_000),
    (10_000, 10_000_000, 2_000_000),
)
PLAN_TABLE: dict[str, tuple[Row, Row, Row]] = {
    "opus-4": _BIG,
    "sonnet-5": _BIG,
    "sonnet-4": _BIG,
    "haiku-4.5": _BIG,
    "fable-5": ((1_000, 500_000, 100_000), (2_000, 1_500_000, 300_000), (4_000, 4_000_000, 800_000)),
}
PLAN_DAGGER = {"haiku-3.5"}

# Message Batches: (RPM, max queued requests); at most 100,000 requests per batch everywhere.
BATCHES = {
    "tier-1": (50, 100_000),
    "tier-2": (1_000, 200_000),
    "tier-3": (2_000, 300_000),
    "tier-4": (4_000, 500_000),
    "start": (1_000, 200_000),
    "build": (2_000, 300_000),
    "scale": (4_000, 500_000),
}
COUNT_TOKENS_RPM = {
    "tier-1": 100,
    "tier-2": 2_000,
    "tier-3": 4_000,
    "tier-4": 8_000,
    "start": None,
    "build": None,
    "scale": None,
}
# (monthly cap, cumulative credit purchase to reach, largest single purchase), USD
SPEND = {
    "tier-1": (100, 5, 100),
    "tier-2": (500, 40, 500),
    "tier-3": (1_000, 200, 1_000),
    "tier-4": (200_000, 400, 5_000),
    "start": (500, None, None),
    "build": (1_000, None, None),
    "scale": (200_000, None, None),
}

ALL_CLASSES = (
    "fable-5",
    "haiku-3",
    "haiku-3.5",
    "haiku-4.5",
    "opus-3",
    "opus-4",
    "sonnet-3.7",
    "sonnet-4",
    "sonnet-5",
)


def _cells() -> list[tuple[str, str, Row, bool]]:
    cells = []
    for cls, tier_rows in TIER_TABLE.items():
        cells += [(tier, cls, row, cls in TIER_DAGGER) for tier, row in zip(TIERS, tier_rows, strict=True)]
    for cls, plan_rows in PLAN_TABLE.items():
        cells += [(plan, cls, row, cls in PLAN_DAGGER) for plan, row in zip(PLANS, plan_rows, strict=True)]
    return cells


@pytest.fixture(autouse=True)
def _clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_model_ids, "_registered_ids", {})
    monkeypatch.setattr(_model_ids, "_registered_patterns", [])


# ---------------------------------------------------------------- preset values


def test_preset_names() -> None:
    assert preset_names() == (*TIERS, *PLANS)


def test_model_classes() -> None:
    assert model_classes() == ALL_CLASSES


@pytest.mark.parametrize(("preset", "cls", "row", "dagger"), _cells())
def test_every_cell_matches_the_spec(preset: str, cls: str, row: Row, dagger: bool) -> None:
    scheme = "tiers-2025" if preset in TIERS else "plans-2026"
    lim = limits_for(preset, cls)
    assert (lim.rpm, lim.itpm, lim.otpm) == row
    assert lim == ModelLimits(
        model_class=cls,
        pool=pool_for(cls),
        rpm=row[0],
        itpm=row[1],
        otpm=row[2],
        cache_reads_count=dagger,
        preset=preset,
        scheme=scheme,
    )


@pytest.mark.parametrize("preset", [*TIERS, *PLANS])
def test_each_preset_has_exactly_the_spec_classes(preset: str) -> None:
    table: dict[str, tuple[Row, ...]] = {**TIER_TABLE} if preset in TIERS else {**PLAN_TABLE}
    for cls in ALL_CLASSES:
        if cls in table:
            assert limits_for(preset, cls).model_class == cls
        else:
            with pytest.raises(UnknownModelError, match="has no limits for model class"):
                limits_for(preset, cls)


@pytest.mark.parametrize("preset", [*TIERS, *PLANS])
def test_batches_count_tokens_and_spend(preset: str) -> None:
    rpm, queued = BATCHES[preset]
    assert batch_limits(preset) == BatchLimits(
        rpm=rpm, max_queued_requests=queued, max_requests_per_batch=100_000, preset=preset
    )
    assert count_tokens_rpm(preset) == COUNT_TOKENS_RPM[preset]
    cap, purchase, max_purchase = SPEND[preset]
    assert spend_cap(preset) == SpendCap(
        monthly_usd=cap, credit_purchase_usd=purchase, max_credit_purchase_usd=max_purchase, preset=preset
    )


@pytest.mark.parametrize("model", ["claude-sonnet-4-20250514", "claude-sonnet-4-5", "sonnet-4"])
def test_long_context_tier_4_sonnet(model: str) -> None:
    lim = long_context_limits("tier-4", model)
    assert lim is not None
    assert (lim.itpm, lim.otpm, lim.rpm) == (1_000_000, 200_000, 4_000)
    assert lim.long_context
    assert lim.pool == "sonnet-4.x-long-context" != limits_for("tier-4", model).pool
    assert ratekeeper.LONG_CONTEXT_BETA == "context-1m-2025-08-07"
    assert ratekeeper.LONG_CONTEXT_MIN_INPUT_TOKENS == 200_000


@pytest.mark.parametrize("preset", [*TIERS, *PLANS])
@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_long_context_absent_elsewhere(preset: str, cls: str) -> None:
    if preset == "tier-4" and cls == "sonnet-4":
        return
    assert long_context_limits(preset, cls) is None


def test_cache_reads_count_per_scheme() -> None:
    for cls in ALL_CLASSES:
        assert cache_reads_count(cls) is (cls in TIER_DAGGER)
        assert cache_reads_count(cls, "tiers-2025") is (cls in TIER_DAGGER)
        assert cache_reads_count(cls, "plans-2026") is (cls in PLAN_DAGGER)
        assert cache_reads_count(cls, "Tier 2") is (cls in TIER_DAGGER)
        assert cache_reads_count(cls, "scale") is (cls in PLAN_DAGGER)


def test_cache_reads_count_unknown_scheme() -> None:
    msg = (
        "unknown scheme '2027'; known schemes and presets: tiers-2025, plans-2026, "
        "tier-1, tier-2, tier-3, tier-4, start, build, scale"
    )
    with pytest.raises(ConfigurationError, match=rf"^{re.escape(msg)}$"):
        cache_reads_count("haiku-3", "2027")


# ---------------------------------------------------------------- preset names


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("tier-1", "tier-1"),
        ("Tier 1", "tier-1"),
        ("tier1", "tier-1"),
        ("TIER-1", "tier-1"),
        ("tier_4", "tier-4"),
        (" Tier  3 ", "tier-3"),
        ("Start", "start"),
        ("BUILD", "build"),
        ("scale", "scale"),
    ],
)
def test_preset_spellings(spelling: str, name: str) -> None:
    assert limits_for(spelling, "haiku-4.5").preset == name
    assert batch_limits(spelling).preset == name


@pytest.mark.parametrize("preset", ["tier-5", "tier", "enterprise", "", "tier-1-2"])
def test_unknown_preset(preset: str) -> None:
    msg = f"unknown preset {preset!r}; known presets: tier-1, tier-2, tier-3, tier-4, start, build, scale"
    for call in (
        lambda: limits_for(preset, "opus-4"),
        lambda: batch_limits(preset),
        lambda: spend_cap(preset),
    ):
        with pytest.raises(ConfigurationError, match=rf"^{re.escape(msg)}$"):
            call()


def test_missing_class_message() -> None:
    msg = (
        "unknown model 'claude-sonnet-5' (preset 'tier-1' has no limits for model class 'sonnet-5'); "
        "known model classes: haiku-3, haiku-3.5, haiku-4.5, opus-3, opus-4, sonnet-3.7, sonnet-4"
    )
    with pytest.raises(UnknownModelError, match=rf"^{re.escape(msg)}$"):
        limits_for("tier-1", "claude-sonnet-5")
    msg = (
        "unknown model 'claude-3-opus-latest' (preset 'scale' has no limits for model class 'opus-3'); "
        "known model classes: fable-5, haiku-4.5, opus-4, sonnet-4, sonnet-5"
    )
    with pytest.raises(UnknownModelError, match=rf"^{re.escape(msg)}$"):
        limits_for("scale", "claude-3-opus-latest")


# ---------------------------------------------------------------- model ids

RESOLVE = [
    # bare
    ("claude-sonnet-4-5", "sonnet-4"),
    ("claude-opus-4-1", "opus-4"),
    ("claude-opus-4", "opus-4"),
    ("claude-opus-4-0", "opus-4"),
    ("claude-sonnet-4", "sonnet-4"),
    ("claude-haiku-4-5", "haiku-4.5"),
    ("claude-opus-4-5", "opus-4"),
    ("claude-opus-4-6", "opus-4"),
    ("claude-opus-4-7", "opus-4"),
    ("claude-opus-4-8", "opus-4"),
    ("claude-sonnet-4-6", "sonnet-4"),
    # dated
    ("claude-sonnet-4-5-20250929", "sonnet-4"),
    ("claude-opus-4-1-20250805", "opus-4"),
    ("claude-opus-4-20250514", "opus-4"),
    ("claude-sonnet-4-20250514", "sonnet-4"),
    ("claude-haiku-4-5-20251001", "haiku-4.5"),
    ("claude-sonnet-4-6-20260217", "sonnet-4"),
    # -latest
    ("claude-3-7-sonnet-latest", "sonnet-3.7"),
    ("claude-3-5-haiku-latest", "haiku-3.5"),
    ("claude-3-opus-latest", "opus-3"),
    # version first
    ("claude-3-5-haiku-20241022", "haiku-3.5"),
    ("claude-3-7-sonnet-20250219", "sonnet-3.7"),
    ("claude-3-opus-20240229", "opus-3"),
    ("claude-3-haiku-20240307", "haiku-3"),
    # dotted and provider-prefixed
    ("anthropic/claude-sonnet-4.6", "sonnet-4"),
    ("anthropic/claude-3.7-sonnet", "sonnet-3.7"),
    ("anthropic/claude-opus-4.6", "opus-4"),
    ("anthropic/claude-opus-4.5", "opus-4"),
    ("anthropic/claude-sonnet-4.5", "sonnet-4"),
    ("anthropic/claude-haiku-4.5", "haiku-4.5"),
    ("anthropic/claude-opus-4.1", "opus-4"),
    ("claude-sonnet-4.5", "sonnet-4"),
    # Bedrock and Vertex spellings
    ("anthropic.claude-3-haiku-20240307-v1:0", "haiku-3"),
    ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "sonnet-4"),
    ("claude-opus-4@20250514", "opus-4"),
    # Sonnet 5 and Fable 5
    ("claude-sonnet-5", "sonnet-5"),
    ("claude-sonnet-5-20260901", "sonnet-5"),
    ("claude-fable-5", "fable-5"),
    ("claude-fable-5-20261015", "fable-5"),
    ("anthropic/claude-fable-5", "fable-5"),
    # case and spaces
    ("CLAUDE-OPUS-4-1", "opus-4"),
    ("Claude-3-5-Haiku-Latest", "haiku-3.5"),
    ("  claude-sonnet-4-5  ", "sonnet-4"),
    # class ids
    *[(cls, cls) for cls in ALL_CLASSES],
    ("Sonnet-4", "sonnet-4"),
]


@pytest.mark.parametrize(("model", "cls"), RESOLVE)
def test_resolve(model: str, cls: str) -> None:
    assert resolve_model(model) == cls


KNOWN = "fable-5, haiku-3, haiku-3.5, haiku-4.5, opus-3, opus-4, sonnet-3.7, sonnet-4, sonnet-5"

UNKNOWN = [
    ("gpt-4o", ""),
    ("", ""),
    ("claude", ""),
    ("claude-opus", ""),
    ("claude-sonnet-4-5-2025092", ""),
    ("claude-sonnet-4-5-123", ""),
    ("claude-instant-1.2", ""),
    ("claude-3-5-sonnet-20241022", "Claude Sonnet 3.5 has no model class; see register_model()"),
    ("anthropic/claude-3.5-sonnet", "Claude Sonnet 3.5 has no model class; see register_model()"),
    ("claude-opus-4-2", "Claude Opus 4.2 has no model class; see register_model()"),
    ("claude-haiku-5", "Claude Haiku 5 has no model class; see register_model()"),
    ("claude-2-1", ""),
]


@pytest.mark.parametrize(("model", "detail"), UNKNOWN)
def test_unknown_model(model: str, detail: str) -> None:
    extra = f" ({detail})" if detail else ""
    msg = f"unknown model {model!r}{extra}; known model classes: {KNOWN}"
    with pytest.raises(UnknownModelError, match=rf"^{re.escape(msg)}$") as info:
        resolve_model(model)
    assert info.value.known == ALL_CLASSES
    with pytest.raises(UnknownModelError):
        limits_for("tier-1", model)


@given(st.one_of(st.text(), st.from_regex(r"(anthropic/)?claude-[0-9a-z.@:\-]{0,24}", fullmatch=True)))
def test_resolve_never_crashes(model: str) -> None:
    try:
        cls = resolve_model(model)
    except UnknownModelError:
        return
    assert cls in model_classes()


@given(st.one_of(st.text(), st.from_regex(r"[Tt]ier[ _-]?[0-9]{0,6}", fullmatch=True)))
def test_preset_lookup_never_crashes(preset: str) -> None:
    try:
        name = batch_limits(preset).preset
    except ConfigurationError as exc:
        message = str(exc)
    else:
        assert name in preset_names()
        return
    assert message.startswith(f"unknown preset {preset!r}; known presets: ")


# ---------------------------------------------------------------- pools


@pytest.mark.parametrize("preset", [*TIERS, *PLANS])
def test_opus_4x_share_a_pool(preset: str) -> None:
    ids = ["claude-opus-4-20250514", "claude-opus-4-1", "claude-opus-4-5", "anthropic/claude-opus-4.6"]
    assert {limits_for(preset, m).pool for m in ids} == {"opus-4.x"}


@pytest.mark.parametrize("preset", [*TIERS, *PLANS])
def test_sonnet_4x_share_a_pool(preset: str) -> None:
    ids = ["claude-sonnet-4-20250514", "claude-sonnet-4-5-20250929", "anthropic/claude-sonnet-4.6"]
    assert {limits_for(preset, m).pool for m in ids} == {"sonnet-4.x"}


@pytest.mark.parametrize("preset", PLANS)
def test_sonnet_5_is_separate(preset: str) -> None:
    assert limits_for(preset, "claude-sonnet-5").pool != limits_for(preset, "claude-sonnet-4-5").pool


def test_every_class_has_its_own_pool() -> None:
    pools = [pool_for(cls) for cls in ALL_CLASSES]
    assert len(set(pools)) == len(pools)


# ---------------------------------------------------------------- registration


def test_register_exact_id_to_known_class() -> None:
    register_model("claude-sonnet-4-7", "sonnet-4")
    assert resolve_model("claude-sonnet-4-7") == "sonnet-4"
    assert resolve_model("anthropic/claude-sonnet-4.7") == "sonnet-4"
    assert resolve_model("CLAUDE-SONNET-4-7-20270101") == "sonnet-4"
    assert limits_for("tier-2", "claude-sonnet-4-7").pool == "sonnet-4.x"
    assert model_classes() == ALL_CLASSES


def test_register_pattern_to_new_class() -> None:
    register_model(re.compile(r"(.*/)?my-proxy-model-[0-9]+"), "proxy-model")
    assert resolve_model("vendor/my-proxy-model-7") == "proxy-model"
    assert resolve_model("proxy-model") == "proxy-model"
    assert "proxy-model" in model_classes()
    assert pool_for("my-proxy-model-1") == "proxy-model"
    msg = (
        "unknown model 'my-proxy-model-1' (preset 'start' has no limits for model class 'proxy-model'); "
        "known model classes: fable-5, haiku-4.5, opus-4, sonnet-4, sonnet-5"
    )
    with pytest.raises(UnknownModelError, match=rf"^{re.escape(msg)}$"):
        limits_for("start", "my-proxy-model-1")


def test_registration_beats_builtin_and_later_wins() -> None:
    register_model("claude-haiku-4-5", "haiku-x")
    assert resolve_model("claude-haiku-4-5-20251001") == "haiku-x"
    register_model("claude-haiku-4-5", "haiku-4.5")
    assert resolve_model("claude-haiku-4-5") == "haiku-4.5"


def test_remembered_answers_follow_registrations() -> None:
    # resolve_model and the estimator's model profile remember their answers by id
    from ratekeeper import TokenEstimator

    assert resolve_model("claude-haiku-4-5") == "haiku-4.5"
    assert TokenEstimator.family_of("claude-haiku-4-5") == "haiku-4.5"
    with pytest.raises(UnknownModelError):
        resolve_model("acme-large")
    register_model("claude-haiku-4-5", "haiku-x")
    register_model("acme-large", "sonnet-4")
    assert resolve_model("claude-haiku-4-5") == "haiku-x"
    assert TokenEstimator.family_of("claude-haiku-4-5") == "haiku-x"
    assert TokenEstimator.family_of("acme-large") == "sonnet-4"
    register_model(re.compile(r"acme-.*"), "opus-4")  # a pattern registered later wins too
    assert TokenEstimator.family_of("acme-large") == "sonnet-4"  # exact ids are tried first
    assert TokenEstimator.family_of("acme-small") == "opus-4"


def test_remembered_answers_are_bounded() -> None:
    from ratekeeper.estimate import _profile

    for i in range(3 * _model_ids.MAX_REMEMBERED_IDS):
        assert resolve_model(f"claude-sonnet-4-5-2025{i:04d}") == "sonnet-4"
        _profile.model_profile(f"claude-sonnet-4-5-2025{i:04d}")
    assert len(_model_ids._resolved) <= _model_ids.MAX_REMEMBERED_IDS
    assert len(_profile._profiles) <= _model_ids.MAX_REMEMBERED_IDS


@pytest.mark.parametrize("bad", ["", "Has Space", "-x", "ü"])
def test_register_rejects_bad_class(bad: str) -> None:
    msg = f"invalid model class {bad!r}: use lower-case letters, digits, '.', '-' and '_'"
    with pytest.raises(ConfigurationError, match=rf"^{re.escape(msg)}$"):
        register_model("some-model", bad)


def test_register_rejects_empty_id() -> None:
    with pytest.raises(ConfigurationError, match=r"^register_model needs a non-empty model id$"):
        register_model("  ", "sonnet-4")


# ---------------------------------------------------------------- the data file


def _raw() -> dict[str, object]:
    text = (resources.files("ratekeeper.core") / "data" / "presets.json").read_text(encoding="utf-8")
    data = json.loads(text)
    assert isinstance(data, dict)
    return data


def test_data_loaded_once() -> None:
    assert _presets._tables() is _presets._tables()


def test_data_names_its_sources() -> None:
    raw = _raw()
    schemes = raw["schemes"]
    assert isinstance(schemes, dict)
    assert schemes["tiers-2025"]["_source"] == "Anthropic rate-limit documentation, 2025 copy (seed 003)"
    assert schemes["plans-2026"]["_source"] == "late-2026 documentation copy"
    assert "anthropic-rate-limits.md" in str(raw["_spec"])


def _broken(path: tuple[str, ...], value: object) -> dict[str, object]:
    raw = copy.deepcopy(_raw())
    node: dict[str, object] = raw
    for key in path[:-1]:
        child = node[key]
        assert isinstance(child, dict)
        node = child
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return raw


_DELETE = object()

MALFORMED = [
    (
        ("presets", "tier-1", "models", "sonnet-4", "rpm"),
        "50",
        "field /presets/tier-1/models/sonnet-4/rpm: expected a positive integer, got '50'",
    ),
    (
        ("presets", "tier-2", "models", "opus-3", "otpm"),
        True,
        "field /presets/tier-2/models/opus-3/otpm: expected a positive integer, got True",
    ),
    (("presets", "tier-3", "batches"), _DELETE, "field /presets/tier-3/batches: missing"),
    (
        ("presets", "scale", "spend", "monthly_cap_usd"),
        -1,
        "field /presets/scale/spend/monthly_cap_usd: expected a positive integer, got -1",
    ),
    (
        ("presets", "start", "scheme"),
        "plans-2027",
        "field /presets/start/scheme: expected a scheme (tiers-2025, plans-2026), got 'plans-2027'",
    ),
    (
        ("presets", "build", "models", "gpt-4"),
        {"rpm": 1, "itpm": 1, "otpm": 1},
        f"field /presets/build/models/gpt-4: expected a model class ({KNOWN}), got 'gpt-4'",
    ),
    (("classes", "opus-4"), _DELETE, "field /classes/opus-4: missing"),
    (
        ("schemes", "plans-2026", "cache_reads_count"),
        "haiku-3.5",
        "field /schemes/plans-2026/cache_reads_count: expected a list of model classes, got 'haiku-3.5'",
    ),
    (("presets",), [], "field /presets: expected an object, got []"),
]


@pytest.mark.parametrize(("path", "value", "msg"), MALFORMED)
def test_malformed_data(path: tuple[str, ...], value: object, msg: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"^{re.escape('x.json: ' + msg)}$"):
        _presets._parse(_broken(path, value), "x.json")


def test_malformed_top_level() -> None:
    with pytest.raises(ConfigurationError, match=r"^x\.json: field /: expected an object, got \[\]$"):
        _presets._parse([], "x.json")
