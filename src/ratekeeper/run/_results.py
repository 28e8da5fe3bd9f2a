"""Results in the Message Batches API's result format, and the results file they go to.

A line is ``{"custom_id", "result": {"type": "succeeded", "message": {...}}}``
or ``{"custom_id", "result": {"type": "errored", "error": {...}}}``, as a
batch's results are, plus ``attempts`` (HTTP attempts, the SDK's retries
included) and ``timing``. Each line is written in one ``write`` and flushed as
its request finishes, so a killed run leaves whole lines and at most one torn
last line, which the next run cuts off (``Previous.read``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, final

import attrs

from ratekeeper.errors import ConfigurationError

__all__ = ["Previous", "RequestResult", "ResultsFile"]


@final
@attrs.frozen
class RequestResult:
    """What became of one request: its ``custom_id`` and ``result`` in the Batches API's format.

    ``result["type"]`` is ``"succeeded"`` (``result["message"]`` is the
    Message as JSON) or ``"errored"`` (``result["error"]`` the API's error
    body, ``{"type": "error", "error": {"type": ..., "message": ...}}``).
    ``attempts`` counts the HTTP attempts sent (the SDK's retries included; 0
    if the request was refused before sending); ``started_at`` is a Unix time
    and ``seconds`` the time from then to the answer, waiting for capacity
    included. ``line`` is the input line, if the request came from a file.
    """

    custom_id: str
    result: Mapping[str, Any]
    attempts: int
    started_at: float
    seconds: float
    line: int | None = None

    @property
    def succeeded(self) -> bool:
        """True if the result is a message."""
        return self.result.get("type") == "succeeded"

    @property
    def usage(self) -> Mapping[str, Any]:
        """The message's ``usage`` (empty for an error)."""
        message = self.result.get("message")
        usage = message.get("usage") if isinstance(message, Mapping) else None
        return usage if isinstance(usage, Mapping) else {}

    def to_json(self) -> dict[str, Any]:
        """The results-file line, as a dict."""
        started = dt.datetime.fromtimestamp(self.started_at, dt.UTC)
        return {
            "custom_id": self.custom_id,
            "result": dict(self.result),
            "attempts": self.attempts,
            "timing": {
                "started_at": started.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "seconds": round(self.seconds, 3),
            },
        }


@final
@attrs.frozen
class Previous:
    """What a results file already holds: ``custom_id`` -> result type, and what reading it repaired."""

    types: Mapping[str, str]
    torn_bytes: int = 0

    @classmethod
    def read(cls, path: Path) -> Previous:
        """Read ``path`` (missing: empty), cutting off a torn last line a killed run left.

        A complete line that is not a result is a ``ConfigurationError``
        naming the line: this is not a file to append to.
        """
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls({})
        torn = 0
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            torn = len(data) - keep
            with path.open("r+b") as f:
                f.truncate(keep)
            data = data[:keep]
        types: dict[str, str] = {}
        for number, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            custom_id, kind = _result_line(raw, path, number)
            # a later line is a later answer (a retried error), so it wins
            types[custom_id] = kind
        return cls(types, torn)

    @property
    def succeeded(self) -> frozenset[str]:
        """The ``custom_id`` s answered with a message."""
        return frozenset(k for k, v in self.types.items() if v == "succeeded")

    @property
    def errored(self) -> frozenset[str]:
        """The ``custom_id`` s answered with an error (and not since with a message)."""
        return frozenset(k for k, v in self.types.items() if v != "succeeded")


def _result_line(raw: bytes, path: Path, number: int) -> tuple[str, str]:
    where = f"{path}: line {number}"
    try:
        obj = json.loads(raw)
    except ValueError:
        raise ConfigurationError(f"{where} is not JSON; not a results file to resume") from None
    result = obj.get("result") if isinstance(obj, dict) else None
    kind = result.get("type") if isinstance(result, dict) else None
    custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
    if not isinstance(custom_id, str) or not isinstance(kind, str):
        raise ConfigurationError(f"{where} has no custom_id and result.type; not a results file to resume")
    return custom_id, kind


@final
class ResultsFile:
    """The results file, open for appending: one line per result, flushed as it is written."""

    def __init__(self, path: Path, *, drop: Iterable[str] = ()) -> None:
        """Open ``path`` for appending, first rewriting it without the lines of ``drop`` (ids to retry)."""
        dropped = frozenset(drop)
        if dropped and path.exists():
            _rewrite_without(path, dropped)
        self.path = path
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def write(self, result: RequestResult) -> None:
        """Append ``result``'s line and flush it, in one write so a kill cannot split it from its newline."""
        self._file.write(json.dumps(result.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Flush to disk and close."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rewrite_without(path: Path, drop: frozenset[str]) -> None:
    # a new file moved into place: a kill during the rewrite leaves the old file whole
    temporary = path.with_name(path.name + ".rewrite")
    with path.open("rb") as src, temporary.open("wb") as dst:
        for raw in src:
            if raw.strip() and json.loads(raw).get("custom_id") in drop:
                continue
            dst.write(raw)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(temporary, path)
