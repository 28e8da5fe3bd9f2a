"""``POST /v1/messages/count_tokens`` and the Message Batches endpoints."""

from __future__ import annotations

import json
import math
from typing import Any

import attrs

from ratekeeper.emulator._body import decide_output, message_body, parse_json, validate
from ratekeeper.emulator._cache import CachePlan
from ratekeeper.emulator._models import display_model_id, model_traits
from ratekeeper.emulator._state import ServerState
from ratekeeper.emulator._tokens import count_request, output_words
from ratekeeper.emulator._wire import EmulatorRequest, Reply, iso_time
from ratekeeper.errors import UnknownModelError

__all__ = ["Batch", "BatchBook"]

_DAY = 86400.0


def _ok(st: ServerState, rid: str, now: float, body: Any, headers: list[tuple[str, str]]) -> Reply:
    delay = st.config.latency.error_delay
    hdrs = tuple(st.base_headers(rid, now + delay) + headers)
    return Reply(status=200, headers=hdrs, request_id=rid, delay=delay, body=body, ends_at=delay)


def _limited(st: ServerState, pool_name: str, endpoint: str, rid: str, now: float) -> Reply | None:
    """Take one request from ``pool_name``'s RPM bucket, or the 429 if it is empty."""
    pool = st.endpoint_pool(pool_name)
    refusal = pool.check({"requests": 1}, now)
    if refusal is None:
        pool.charge("requests", 1, now, rid)
        st.record(rid, now, endpoint, 200, pool=pool_name, admitted={"requests": 1.0})
        return None
    st.record(
        rid,
        now,
        endpoint,
        429,
        pool=pool_name,
        error_type="rate_limit_error",
        retry_after=refusal.retry_after(),
        settled_at=now,
    )
    return st.error(
        429,
        "rate_limit_error",
        refusal.message(),
        rid,
        now,
        headers=pool.headers(st.config.epoch, now, combined=False),
        retry_after=refusal.retry_after(),
    )


def _fail(
    st: ServerState, status: int, kind: str, message: str, endpoint: str, rid: str, now: float
) -> Reply:
    st.record(rid, now, endpoint, status, error_type=kind, settled_at=now)
    return st.error(status, kind, message, rid, now)


def handle_count_tokens(st: ServerState, req: EmulatorRequest, now: float) -> Reply:
    """Answer ``POST /v1/messages/count_tokens``: the exact input count, ignoring the cache."""
    rid = st.ids.request_id()
    body, why = parse_json(req.body)
    if body is not None:
        why = validate(body, messages_endpoint=False)
    if body is None or why:
        return _fail(st, 400, "invalid_request_error", why, "count_tokens", rid, now)
    model = str(body["model"])
    try:
        st.model_info(model)
    except UnknownModelError:
        return _fail(st, 404, "not_found_error", f"model: {model}", "count_tokens", rid, now)
    refused = _limited(st, "count_tokens", "count_tokens", rid, now)
    if refused is not None:
        return refused
    factor = model_traits(model).token_factor
    total = count_request(body, display_model_id(model), factor).total
    headers = st.endpoint_pool("count_tokens").headers(st.config.epoch, now, combined=False)
    return _ok(st, rid, now, {"input_tokens": total}, headers)


@attrs.define
class Batch:
    """One Message Batch and where it stands."""

    id: str
    created: float
    ends_at: float
    requests: list[dict[str, Any]]
    base_url: str
    status: str = "in_progress"
    cancel_at: float | None = None
    ended: float | None = None
    results: list[dict[str, Any]] = attrs.field(factory=list)
    deleted: bool = False

    def counts(self) -> dict[str, int]:
        """``request_counts`` as the API shows them."""
        c = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if self.ended is None:
            c["processing"] = len(self.requests)
        for r in self.results:
            c[r["result"]["type"]] += 1
        return c


class BatchBook:
    """All batches of the organization, and the processing-queue cap."""

    def __init__(self, st: ServerState) -> None:
        self.st = st
        self.batches: dict[str, Batch] = {}

    def queued(self) -> int:
        """Batch requests still in the processing queue."""
        return sum(len(b.requests) for b in self.batches.values() if b.ended is None)

    def _json(self, b: Batch) -> dict[str, Any]:
        epoch = self.st.config.epoch
        return {
            "id": b.id,
            "type": "message_batch",
            "processing_status": b.status,
            "request_counts": b.counts(),
            "ended_at": iso_time(epoch, b.ended) if b.ended is not None else None,
            "created_at": iso_time(epoch, b.created),
            "expires_at": iso_time(epoch, b.created + _DAY),
            "archived_at": None,
            "cancel_initiated_at": iso_time(epoch, b.cancel_at) if b.cancel_at is not None else None,
            "results_url": f"{b.base_url}/v1/messages/batches/{b.id}/results"
            if b.ended is not None
            else None,
        }

    def handle(self, req: EmulatorRequest, now: float) -> Reply:
        """Route one batches request (the batch RPM applies to every one of them)."""
        st = self.st
        rid = st.ids.request_id()
        parts = req.route.split("/")[4:]  # after /v1/messages/batches
        method = req.method.upper()
        if method == "POST" and not parts and len(req.body) > st.config.max_batch_bytes:
            return _fail(
                st,
                413,
                "request_too_large",
                "Request exceeds the maximum allowed number of bytes.",
                "batches",
                rid,
                now,
            )
        refused = _limited(st, "batches", "batches", rid, now)
        if refused is not None:
            return refused
        if method == "POST" and not parts:
            return self._create(req, rid, now)
        if method == "GET" and not parts:
            return self._list(req, rid, now)
        batch = self.batches.get(parts[0]) if parts else None
        if batch is None or batch.deleted:
            return self._error(404, "not_found_error", "Not found", rid, now)
        if method == "GET" and len(parts) == 1:
            return self._reply(rid, now, self._json(batch))
        if method == "GET" and parts[1:] == ["results"]:
            return self._results(batch, rid, now)
        if method == "POST" and parts[1:] == ["cancel"]:
            return self._cancel(batch, rid, now)
        if method == "DELETE" and len(parts) == 1:
            if batch.ended is None:
                return self._error(
                    400, "invalid_request_error", "Batches must be ended to be deleted.", rid, now
                )
            batch.deleted = True
            return self._reply(rid, now, {"id": batch.id, "type": "message_batch_deleted"})
        return self._error(404, "not_found_error", "Not Found", rid, now)

    def _headers(self, now: float) -> list[tuple[str, str]]:
        return self.st.endpoint_pool("batches").headers(self.st.config.epoch, now, combined=False)

    def _reply(self, rid: str, now: float, body: Any) -> Reply:
        return _ok(self.st, rid, now, body, self._headers(now))

    def _error(
        self, status: int, kind: str, message: str, rid: str, now: float, retry: int | None = None
    ) -> Reply:
        rec = self.st.by_id[rid]
        rec.status, rec.error_type = status, kind
        return self.st.error(status, kind, message, rid, now, headers=self._headers(now), retry_after=retry)

    def _create(self, req: EmulatorRequest, rid: str, now: float) -> Reply:
        st = self.st
        body, why = parse_json(req.body)
        reqs = body.get("requests") if body is not None else None
        if body is None or not isinstance(reqs, list) or not reqs:
            return self._error(400, "invalid_request_error", why or "requests: Field required", rid, now)
        if len(reqs) > st.config.batch_max_requests:
            msg = f"requests: a batch may hold at most {st.config.batch_max_requests:,} requests"
            return self._error(400, "invalid_request_error", msg, rid, now)
        for i, r in enumerate(reqs):
            if (
                not isinstance(r, dict)
                or not isinstance(r.get("custom_id"), str)
                or not isinstance(r.get("params"), dict)
            ):
                return self._error(
                    400, "invalid_request_error", f"requests.{i}: custom_id and params required", rid, now
                )
        cap, queued = st.batch_queue_cap(), self.queued()
        if queued + len(reqs) > cap:
            msg = (
                f"This request would exceed your organization's limit of {cap:,} batch requests in the "
                f"processing queue ({queued:,} queued)."
            )
            return self._error(429, "rate_limit_error", msg, rid, now, retry=self._queue_wait(len(reqs), now))
        base = req.base_url.rstrip("/")
        batch = Batch(st.ids.batch_id(), now, now + st.config.batch_processing_time, reqs, base)
        self.batches[batch.id] = batch
        st.scheduler.at(batch.ends_at, batch.id, lambda t: self._end(batch, t))
        return self._reply(rid, now, self._json(batch))

    def _queue_wait(self, n: int, now: float) -> int:
        free = self.st.batch_queue_cap() - self.queued()
        for b in sorted((b for b in self.batches.values() if b.ended is None), key=lambda b: b.ends_at):
            free += len(b.requests)
            if free >= n:
                return max(1, math.ceil(b.ends_at - now))
        return 60

    def _list(self, req: EmulatorRequest, rid: str, now: float) -> Reply:
        q = req.query
        limit = max(1, min(1000, int(q.get("limit", "20"))))
        items = [b for b in sorted(self.batches.values(), key=lambda b: -b.created) if not b.deleted]
        ids = [b.id for b in items]
        if "after_id" in q and q["after_id"] in ids:
            items = items[ids.index(q["after_id"]) + 1 :]
        elif "before_id" in q and q["before_id"] in ids:
            items = items[: ids.index(q["before_id"])][-limit:]
        page = items[:limit]
        body = {
            "data": [self._json(b) for b in page],
            "has_more": len(items) > limit,
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
        }
        return self._reply(rid, now, body)

    def _cancel(self, batch: Batch, rid: str, now: float) -> Reply:
        if batch.ended is None and batch.cancel_at is None:
            batch.cancel_at = now
            batch.status = "canceling"
            self.st.scheduler.cancel(batch.id)
            self.st.scheduler.at(
                now + self.st.config.batch_cancel_time, batch.id, lambda t: self._end(batch, t)
            )
        return self._reply(rid, now, self._json(batch))

    def _results(self, batch: Batch, rid: str, now: float) -> Reply:
        if batch.ended is None:
            return self._error(
                404, "not_found_error", "Results are not available until the batch has ended.", rid, now
            )
        content = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in batch.results)
        hdrs = self.st.base_headers(rid, now, "application/binary") + self._headers(now)
        delay = self.st.config.latency.error_delay
        return Reply(
            status=200, headers=tuple(hdrs), request_id=rid, delay=delay, content=content, ends_at=delay
        )

    def _end(self, batch: Batch, at: float) -> None:
        batch.ended = at
        batch.status = "ended"
        for r in batch.requests:
            if batch.cancel_at is not None:
                batch.results.append({"custom_id": r["custom_id"], "result": {"type": "canceled"}})
            else:
                batch.results.append({"custom_id": r["custom_id"], "result": self._run(r["params"], at)})

    def _run(self, params: dict[str, Any], at: float) -> dict[str, Any]:
        st = self.st
        why = validate(params)
        model = str(params.get("model", ""))
        if not why:
            try:
                info = st.model_info(model)
            except UnknownModelError:
                why = f"model: {model}"
        if why:
            return {
                "type": "errored",
                "error": {"type": "error", "error": {"type": "invalid_request_error", "message": why}},
            }
        shown = display_model_id(model)
        total = count_request(params, shown, model_traits(model).token_factor).total
        plan = CachePlan(read=0, write_5m=0, write_1h=0, input=total, hit_key=None, writes=())
        max_tokens = int(params["max_tokens"])
        out = decide_output(st, None, params, max_tokens)
        stop = "max_tokens" if out >= max_tokens else "end_turn"
        if st.config.mode == "api":  # batches are billed at half price
            st.spend.add(
                0.5
                * st.price(info.model_class).cost_usd(
                    input_tokens=total, cache_write_5m=0, cache_write_1h=0, cache_read=0, output_tokens=out
                ),
                at,
            )
        message = message_body(st.ids.message_id(), shown, output_words(0, out), plan, out, stop)
        return {"type": "succeeded", "message": message}
