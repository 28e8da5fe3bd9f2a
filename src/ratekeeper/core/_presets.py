"""Published rate-limit presets: the tier tables, by model class, and ``Limiter(limits=...)``.

The numbers live in ``ratekeeper/core/data/presets.json`` (both published schemes:
Tier 1-4 from the 2025 docs, Start / Build / Scale from the late-2026 docs).
The file is read once, validated, and cached. Presets are a starting point:
the limits a response's headers announce always beat them. ``_model_ids`` maps a
model id to the model class these tables are keyed by.

>>> limits_for("tier-4", "claude-sonnet-4-5-20250929").itpm
2000000
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from importlib import resources
from typing import Final, NoReturn, final

import attrs

from ratekeeper.core._model_ids import _BUILTIN_CLASSES, model_classes, resolve_model
from ratekeeper.errors import ConfigurationError, UnknownModelError

__all__ = [
    "LONG_CONTEXT_BETA",
    "LONG_CONTEXT_MIN_INPUT_TOKENS",
    "BatchLimits",
    "ModelLimits",
    "SpendCap",
    "batch_limits",
    "cache_reads_count",
    "count_tokens_rpm",
    "limits_for",
    "long_context_limits",
    "pool_for",
    "preset_names",
    "spend_cap",
]

#: The beta header that enables the 1M-token context window (2025 docs).
LONG_CONTEXT_BETA: Final = "context-1m-2025-08-07"
#: Requests with more input tokens than this, under the beta header, use the long-context limits.
LONG_CONTEXT_MIN_INPUT_TOKENS: Final = 200_000

_DATA_FILE: Final = "presets.json"
_SOURCE: Final = "ratekeeper/core/data/presets.json"
_DEFAULT_SCHEME: Final = "tiers-2025"


@final
@attrs.frozen(kw_only=True)
class ModelLimits:
    """The per-minute limits of one model class under one preset.

    ``pool`` names the shared limit: model classes never share one, but several
    models share a class (Opus 4, 4.1 and 4.5 all draw on ``opus-4.x``).
    ``cache_reads_count`` is True for the classes marked † in the preset's
    scheme: their ``cache_read_input_tokens`` count toward ITPM.

    >>> lim = limits_for("Tier 1", "claude-3-5-haiku-latest")
    >>> (lim.model_class, lim.pool, lim.rpm, lim.itpm, lim.otpm, lim.cache_reads_count)
    ('haiku-3.5', 'haiku-3.5', 50, 50000, 10000, True)
    """

    model_class: str
    pool: str
    rpm: int
    itpm: int
    otpm: int
    cache_reads_count: bool
    preset: str
    scheme: str
    long_context: bool = False


@final
@attrs.frozen(kw_only=True)
class BatchLimits:
    """Message Batches API limits, shared across all models.

    ``rpm`` covers every batch endpoint; ``max_queued_requests`` caps the batch
    requests waiting in the processing queue (a concurrency cap, not a rate).

    >>> batch_limits("tier-2")
    BatchLimits(rpm=1000, max_queued_requests=200000, max_requests_per_batch=100000, preset='tier-2')
    """

    rpm: int
    max_queued_requests: int
    max_requests_per_batch: int
    preset: str


@final
@attrs.frozen(kw_only=True)
class SpendCap:
    """A preset's monthly spend cap and, for Tiers 1-4, the credit purchases behind it.

    ``credit_purchase_usd`` is the cumulative purchase that reaches the tier and
    ``max_credit_purchase_usd`` the largest single purchase; both are None for
    Start / Build / Scale, where no figures are published.

    >>> spend_cap("scale").monthly_usd
    200000
    """

    monthly_usd: int
    credit_purchase_usd: int | None
    max_credit_purchase_usd: int | None
    preset: str


# --------------------------------------------------------------------------- data


@attrs.frozen
class _Preset:
    name: str
    display_name: str
    scheme: str
    models: Mapping[str, tuple[int, int, int]]
    batches: BatchLimits
    count_tokens_rpm: int | None
    long_context: Mapping[str, tuple[int, int]]
    spend: SpendCap


@attrs.frozen
class _Tables:
    pools: Mapping[str, str]
    cache_read_classes: Mapping[str, frozenset[str]]
    presets: Mapping[str, _Preset]


def _fail(source: str, path: str, expected: str, value: object) -> NoReturn:
    raise ConfigurationError(f"{source}: field {path}: expected {expected}, got {value!r}")


def _obj(value: object, source: str, path: str, required: tuple[str, ...] = ()) -> dict[str, object]:
    """A JSON object without its ``_comment`` keys; ``required`` keys must be present."""
    if not isinstance(value, dict):
        _fail(source, path or "/", "an object", value)
    out = {str(k): v for k, v in value.items() if not str(k).startswith("_")}
    for key in required:
        if key not in out:
            raise ConfigurationError(f"{source}: field {path}/{key}: missing")
    return out


def _count(value: object, source: str, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(source, path, "a positive integer", value)
    return value


def _num(obj: Mapping[str, object], key: str, source: str, path: str) -> int:
    return _count(obj[key], source, f"{path}/{key}")


def _counts(value: object, source: str, path: str, keys: tuple[str, ...]) -> list[int]:
    """The positive integers at ``keys`` of the JSON object ``value``, in that order."""
    obj = _obj(value, source, path, keys)
    return [_num(obj, key, source, path) for key in keys]


def _num_or_null(obj: Mapping[str, object], key: str, source: str, path: str) -> int | None:
    return None if obj[key] is None else _num(obj, key, source, path)


def _text(value: object, source: str, path: str) -> str:
    if not isinstance(value, str) or not value:
        _fail(source, path, "a non-empty string", value)
    return value


def _class_key(key: str, pools: Mapping[str, str], source: str, path: str) -> str:
    if key not in pools:
        _fail(source, path, f"a model class ({', '.join(sorted(pools))})", key)
    return key


def _parse(raw: object, source: str) -> _Tables:
    """Validate the decoded JSON and build the tables; errors name the file and the field."""
    top = _obj(raw, source, "", ("classes", "schemes", "presets"))
    pools: dict[str, str] = {}
    for cls, entry in _obj(top["classes"], source, "/classes").items():
        path = f"/classes/{cls}"
        if cls not in _BUILTIN_CLASSES:
            _fail(source, path, f"a model class ({', '.join(_BUILTIN_CLASSES)})", cls)
        pools[cls] = _text(_obj(entry, source, path, ("pool",))["pool"], source, f"{path}/pool")
    for cls in _BUILTIN_CLASSES:
        if cls not in pools:
            raise ConfigurationError(f"{source}: field /classes/{cls}: missing")

    schemes: dict[str, frozenset[str]] = {}
    for name, entry in _obj(top["schemes"], source, "/schemes").items():
        path = f"/schemes/{name}/cache_reads_count"
        listed = _obj(entry, source, f"/schemes/{name}", ("cache_reads_count",))["cache_reads_count"]
        if not isinstance(listed, list):
            _fail(source, path, "a list of model classes", listed)
        schemes[name] = frozenset(
            _class_key(_text(c, source, f"{path}/{i}"), pools, source, f"{path}/{i}")
            for i, c in enumerate(listed)
        )

    presets: dict[str, _Preset] = {}
    for name, entry in _obj(top["presets"], source, "/presets").items():
        presets[name] = _parse_preset(name, entry, pools, schemes, source)
    if not presets:
        _fail(source, "/presets", "at least one preset", {})
    return _Tables(pools=pools, cache_read_classes=schemes, presets=presets)


def _parse_preset(
    name: str, entry: object, pools: Mapping[str, str], schemes: Mapping[str, frozenset[str]], source: str
) -> _Preset:
    path = f"/presets/{name}"
    fields = ("scheme", "display_name", "models", "batches", "count_tokens_rpm", "long_context", "spend")
    p = _obj(entry, source, path, fields)
    scheme = _text(p["scheme"], source, f"{path}/scheme")
    if scheme not in schemes:
        _fail(source, f"{path}/scheme", f"a scheme ({', '.join(schemes)})", scheme)
    models: dict[str, tuple[int, int, int]] = {}
    for cls, row in _obj(p["models"], source, f"{path}/models").items():
        rpath = f"{path}/models/{cls}"
        _class_key(cls, pools, source, rpath)
        rpm, itpm, otpm = _counts(row, source, rpath, ("rpm", "itpm", "otpm"))
        models[cls] = (rpm, itpm, otpm)
    rpm, queued, per_batch = _counts(
        p["batches"], source, f"{path}/batches", ("rpm", "max_queued_requests", "max_requests_per_batch")
    )
    batches = BatchLimits(rpm=rpm, max_queued_requests=queued, max_requests_per_batch=per_batch, preset=name)
    long_context: dict[str, tuple[int, int]] = {}
    if p["long_context"] is not None:
        lc = _obj(p["long_context"], source, f"{path}/long_context", ("models",))
        for cls, row in _obj(lc["models"], source, f"{path}/long_context/models").items():
            rpath = f"{path}/long_context/models/{cls}"
            if cls not in models:
                _fail(source, rpath, f"a model class of this preset ({', '.join(models)})", cls)
            itpm, otpm = _counts(row, source, rpath, ("itpm", "otpm"))
            long_context[cls] = (itpm, otpm)
    spath = f"{path}/spend"
    s = _obj(p["spend"], source, spath, ("monthly_cap_usd", "credit_purchase_usd", "max_credit_purchase_usd"))
    spend = SpendCap(
        monthly_usd=_num(s, "monthly_cap_usd", source, spath),
        credit_purchase_usd=_num_or_null(s, "credit_purchase_usd", source, spath),
        max_credit_purchase_usd=_num_or_null(s, "max_credit_purchase_usd", source, spath),
        preset=name,
    )
    return _Preset(
        name=name,
        display_name=_text(p["display_name"], source, f"{path}/display_name"),
        scheme=scheme,
        models=models,
        batches=batches,
        count_tokens_rpm=_num_or_null(p, "count_tokens_rpm", source, path),
        long_context=long_context,
        spend=spend,
    )


@functools.cache
def _tables() -> _Tables:
    text = (resources.files("ratekeeper.core") / "data" / _DATA_FILE).read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{_SOURCE}: not valid JSON: {exc}") from exc
    return _parse(raw, _SOURCE)


# --------------------------------------------------------------------------- presets


def _preset(preset: str) -> _Preset:
    tables = _tables()
    key = re.sub(r"[\s_]+", "-", preset.strip().lower())
    m = re.fullmatch(r"tier-?([0-9]{1,3})", key)
    if m:
        key = f"tier-{int(m[1])}"
    found = tables.presets.get(key)
    if found is None:
        raise ConfigurationError(f"unknown preset {preset!r}; known presets: {', '.join(tables.presets)}")
    return found


def preset_names() -> tuple[str, ...]:
    """The canonical preset names, Tier 1-4 scheme first.

    >>> preset_names()
    ('tier-1', 'tier-2', 'tier-3', 'tier-4', 'start', 'build', 'scale')
    """
    return tuple(_tables().presets)


def limits_for(preset: str, model: str) -> ModelLimits:
    """The RPM / ITPM / OTPM limits of ``model``'s class under ``preset``.

    ``preset`` is case- and spacing-insensitive (``"Tier 1"``, ``"tier1"``);
    ``model`` is any id :func:`resolve_model` accepts. Raises
    ``ConfigurationError`` for an unknown preset and ``UnknownModelError`` for
    an unknown model or a class the preset has no row for.

    >>> limits_for("build", "claude-sonnet-5").rpm
    5000
    """
    p = _preset(preset)
    cls = resolve_model(model)
    row = p.models.get(cls)
    if row is None:
        raise UnknownModelError(
            model, tuple(sorted(p.models)), f"preset {p.name!r} has no limits for model class {cls!r}"
        )
    rpm, itpm, otpm = row
    return ModelLimits(
        model_class=cls,
        pool=pool_for(cls),
        rpm=rpm,
        itpm=itpm,
        otpm=otpm,
        cache_reads_count=cls in _tables().cache_read_classes[p.scheme],
        preset=p.name,
        scheme=p.scheme,
    )


def long_context_limits(preset: str, model: str) -> ModelLimits | None:
    """The separate limits for long-context requests, or None where none are published.

    They apply to requests over ``LONG_CONTEXT_MIN_INPUT_TOKENS`` input tokens
    sent with the ``LONG_CONTEXT_BETA`` header (2025 docs: Sonnet 4 / 4.5, Tier 4).
    Only ITPM and OTPM are published; ``rpm`` repeats the class's standard RPM,
    which such requests still draw on. The pool is ``"<pool>-long-context"``.

    >>> long_context_limits("tier-4", "claude-sonnet-4-5").itpm
    1000000
    >>> long_context_limits("tier-1", "claude-sonnet-4-5") is None
    True
    """
    p = _preset(preset)
    cls = resolve_model(model)
    row = p.long_context.get(cls)
    if row is None:
        return None
    std = limits_for(p.name, cls)
    return attrs.evolve(std, pool=f"{std.pool}-long-context", itpm=row[0], otpm=row[1], long_context=True)


def batch_limits(preset: str) -> BatchLimits:
    """The Message Batches API limits of ``preset`` (see :class:`BatchLimits`)."""
    return _preset(preset).batches


def count_tokens_rpm(preset: str) -> int | None:
    """The RPM of ``POST /v1/messages/count_tokens``, or None where no figure is published.

    >>> count_tokens_rpm("tier-3"), count_tokens_rpm("start")
    (4000, None)
    """
    return _preset(preset).count_tokens_rpm


def spend_cap(preset: str) -> SpendCap:
    """The monthly spend cap of ``preset`` (see :class:`SpendCap`)."""
    return _preset(preset).spend


def cache_reads_count(model: str, scheme: str = _DEFAULT_SCHEME) -> bool:
    """Whether ``cache_read_input_tokens`` count toward ITPM for ``model`` (the † classes).

    ``scheme`` is ``"tiers-2025"`` (Haiku 3.5, Haiku 3, Opus 3) or
    ``"plans-2026"`` (Haiku 3.5 only), or a preset name standing for its scheme.

    >>> cache_reads_count("claude-3-haiku-20240307")
    True
    >>> cache_reads_count("claude-3-haiku-20240307", "plans-2026")
    False
    """
    tables = _tables()
    classes = tables.cache_read_classes.get(scheme)
    if classes is None:
        try:
            classes = tables.cache_read_classes[_preset(scheme).scheme]
        except ConfigurationError:
            names = (*tables.cache_read_classes, *tables.presets)
            raise ConfigurationError(
                f"unknown scheme {scheme!r}; known schemes and presets: {', '.join(names)}"
            ) from None
    return resolve_model(model) in classes


def pool_for(model: str) -> str:
    """The name of the shared limit ``model`` draws on, whatever the preset.

    >>> pool_for("claude-opus-4-1"), pool_for("claude-opus-4-20250514")
    ('opus-4.x', 'opus-4.x')
    """
    cls = resolve_model(model)
    return _tables().pools.get(cls, cls)


# --------------------------------------------------------------------------- Limiter(limits=...)

# the names people write for a limit (the console's and the headers' words) -> the pool's dimension
_DIMENSIONS: Final[Mapping[str, str]] = {
    "requests": "requests",
    "rpm": "requests",
    "input_tokens": "input_tokens",
    "itpm": "input_tokens",
    "output_tokens": "output_tokens",
    "otpm": "output_tokens",
    "tokens": "tokens",
    "priority_input_tokens": "priority_input_tokens",
    "priority_output_tokens": "priority_output_tokens",
}


def _pool_names() -> tuple[str, ...]:
    pools = _tables().pools
    return tuple(sorted({pools.get(cls, cls) for cls in model_classes()}))


def limit_overrides(limits: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``Limiter(limits=...)`` keyed by pool and dimension, whatever names were given.

    A key may be a pool (``"sonnet-4.x"``), a model class (``"sonnet-4"``) or a
    model id (``"claude-sonnet-4-5"``); a dimension may be ``rpm``, ``itpm``,
    ``otpm`` or the pool's own name. Anything else raises ``ConfigurationError``
    listing what is valid: a misspelt key used to be kept as a pool of its own
    that no model ever drew on, so the override was silently ignored.

    >>> limit_overrides({"claude-sonnet-4-5": {"rpm": 50}})
    {'sonnet-4.x': {'requests': 50.0}}
    """
    out: dict[str, dict[str, float]] = {}
    for key, dims in limits.items():
        pools = _pool_names()
        if key in pools:
            pool = key
        else:
            try:
                pool = pool_for(key)
            except UnknownModelError:
                raise ConfigurationError(
                    f"limits: unknown pool or model {key!r}; give a pool ({', '.join(pools)}), "
                    f"a model class ({', '.join(model_classes())}) or a model id such as "
                    f"'claude-sonnet-4-5'"
                ) from None
        target = out.setdefault(pool, {})
        for dim, value in dims.items():
            name = _DIMENSIONS.get(dim.lower())
            if name is None:
                raise ConfigurationError(
                    f"limits[{key!r}]: unknown dimension {dim!r}; valid: {', '.join(_DIMENSIONS)}"
                )
            target[name] = float(value)
    return out
