"""From the permit to its settlement: what one attempt's response tells the limiter.

``_Exchange`` takes over an attempt once its permit is held: a failure before
any response releases the permit; a response is observed (its headers; a 429's
``retry-after`` pauses the pool), then settled at once from a JSON body's
``usage``, or, for a body still to come, metered (see ``_stream``) and settled
when it ends. ``_Learner``, the base of ``RateLimitMiddleware`` above
``_Planner``, keeps what the responses teach from one attempt to the next: the
estimator's and the wallet's prices, a stream's characters per output token,
and which batches are still open.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final, final

import attrs
import httpx2

from ratekeeper.anthropic._plan import _BATCH, _BATCH_CREATE, _MESSAGES, _path_of, _Plan, _Planner
from ratekeeper.anthropic._stream import BodyOutcome, JsonMeter, Meter, SseMeter
from ratekeeper.core._accounting import Usage
from ratekeeper.core._headers import parse_headers
from ratekeeper.core._snapshot import RateLimitSnapshot
from ratekeeper.errors import InsufficientCredits
from ratekeeper.estimate._estimator import Estimate
from ratekeeper.gate._limiter import Permit

log = logging.getLogger("ratekeeper.anthropic")

#: What a mid-stream ``error`` event would have been as a status, for ``permit.observe``.
_ERROR_STATUS: Final = {"overloaded_error": 529, "rate_limit_error": 429, "api_error": 500}
#: Characters per output token before a stream of the family has finished: the docs' rule of
#: thumb, which counts more tokens than English prose has (charging early errs on the safe side).
_OUTPUT_CPT: Final = 3.5

#: Wraps a response body for a meter: ``MeteredSyncStream`` or ``MeteredAsyncStream``.
_Metered = Callable[[Any, Meter], httpx2.SyncByteStream | httpx2.AsyncByteStream]


def _never_sent(exc: BaseException) -> bool:
    """True if the request certainly did not reach the server (the connection was never made)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, httpx2.ConnectError | httpx2.ConnectTimeout):
            return True
        current = current.__cause__ or current.__context__
    return False


def _json_of(response: httpx2.Response) -> object:
    try:
        return json.loads(response.content)
    except (ValueError, httpx2.ResponseNotRead):
        return None


def _is_read(response: httpx2.Response) -> bool:
    try:
        response.content  # noqa: B018 - raises if the body was not read yet
    except httpx2.ResponseNotRead:
        return False
    return True


def _is_sse(response: httpx2.Response) -> bool:
    return response.headers.get("content-type", "").split(";")[0].strip().lower() == "text/event-stream"


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


@final
class _Exchange:
    """One attempt from the permit to its settlement; also the observer of a metered body."""

    def __init__(self, middleware: _Learner, plan: _Plan, permit: Permit, url: str) -> None:
        self._mw = middleware
        self._plan = plan
        self.permit = permit
        self._path = _path_of(url)
        self._snapshot: RateLimitSnapshot | None = None

    # -- failures before a response

    def failed(self, exc: BaseException) -> None:
        if _never_sent(exc):
            self.permit.sent = False  # it never left: give everything back
        self.permit.release()
        self._mw._remember_scan(self._plan)  # the SDK may send it again

    # -- the response

    def respond(self, response: httpx2.Response, metered: _Metered) -> RateLimitSnapshot | None:
        """Observe, settle what can be settled now, and meter the body if it is still to come.

        Returns the snapshot to attach to the parsed body (``None``: nothing to
        attach, e.g. an error or a body read later). Raises
        ``InsufficientCredits`` for a wallet proxy's 402.
        """
        permit, plan = self.permit, self._plan
        status = response.status_code
        # parsed once here; the limiter and the settlement take the snapshot as it is
        self._snapshot = headers = parse_headers(response.headers, received_at=_dt.datetime.now(_dt.UTC))
        if status >= 400:
            self._mw._remember_scan(plan)  # the SDK may send it again
            error_body = _json_of(response)
            snapshot = permit.observe(headers, status=status, body=error_body)
            permit.release()
            if status == 402:
                raise _insufficient(permit, snapshot, error_body)
            return None
        if plan.route == _MESSAGES:
            return self._messages(response, metered)
        snapshot = permit.observe(headers, status=status)
        body = _json_of(response)
        if plan.route == _BATCH_CREATE:
            self._mw._batch_created(body, plan.batch_requests)
        elif plan.route == _BATCH:
            self._mw._batches_seen(body, response.request.method, self._path)
        permit.release()  # the RPM token stays spent; a new batch's queue slots stay taken
        return snapshot if _is_read(response) else None

    def _messages(self, response: httpx2.Response, metered: _Metered) -> RateLimitSnapshot | None:
        plan = self._plan
        self._mw._response_started(plan.estimate)
        if _is_read(response):
            return self._settle_message(_json_of(response), complete=True, observed=False)
        # the body is still to come: observe the headers now, settle when the body ends
        self.permit.observe(self._snapshot)
        encoding = response.headers.get("content-encoding", "")
        meter: Meter
        if _is_sse(response):
            max_tokens = plan.demand.max_tokens if plan.demand is not None else 0
            cpt = self._mw._output_chars_per_token(plan.estimate)
            meter = SseMeter(self, content_encoding=encoding, max_tokens=max_tokens, chars_per_token=cpt)
        else:  # with_streaming_response: the caller reads the JSON body later
            meter = JsonMeter(self, content_encoding=encoding)
        response.stream = metered(response.stream, meter)
        return None

    def _settle_message(
        self, body: object, *, complete: bool, observed: bool, output: int = 0
    ) -> RateLimitSnapshot:
        """Settle from ``body``'s usage, observe the headers (unless ``observed`` already), learn.

        A complete answer's rate-limit headers may describe the server after this
        request's own settlement (the moment is undocumented): the limiter reads
        them best with the settlement already applied, so it settles first (when
        the usage cannot be read, it observes, then releases). A stream was observed at its
        first byte, before any settlement could be in its headers. A wallet's
        balance is fed last: the proxy reports it after the charge, so fed
        before settling the limiter would give this request's reservation back
        a second time.
        """
        permit, snapshot = self.permit, self._snapshot
        assert snapshot is not None
        usage = body.get("usage") if isinstance(body, dict) else None
        quota = body.get("quota") if isinstance(body, dict) else None
        quota = quota if isinstance(quota, dict) else {}
        settled = False
        if isinstance(usage, dict):
            try:
                if output > (_number(usage.get("output_tokens")) or 0.0):
                    usage = {**usage, "output_tokens": output}  # a cut stream: what its deltas showed
                credits = _number(quota.get("credits_used"))
                if credits is None and snapshot.quota is not None:
                    credits = snapshot.quota.credits_used
                if permit.active:
                    if observed:
                        permit.settle(usage, credits=credits)
                    else:  # the balance is fed below
                        permit.settle(usage, credits=credits, headers=_without_quota(snapshot))
                        observed = True
                settled = True
            except (TypeError, ValueError, OverflowError) as exc:
                # a malformed report must not lose the response nor leak the permit: keep the
                # reservation as charged (the safe side), and say what was wrong
                log.warning("cannot settle on this response's usage (%s); keeping its reservation", exc)
        if not observed:
            permit.observe(_without_quota(snapshot))  # the balance is fed below
        if not settled:
            permit.release()  # after the observation: a successful answer's reservation stands
            return snapshot
        assert isinstance(usage, dict)
        balance = _number(quota.get("balance_after"))
        if balance is None and snapshot.quota is not None:
            balance = snapshot.quota.balance
        if balance is not None:
            permit.observe({"x-quota-balance": repr(balance)})
        self._mw._learn(self._plan.estimate, usage, credits, complete=complete)
        return snapshot

    # -- BodyObserver

    def progress(self, output_tokens: int) -> None:
        self.permit.record_output(output_tokens)

    def finish(self, outcome: BodyOutcome) -> None:
        permit = self.permit
        if not permit.active:
            return
        if outcome.error is not None:
            error = outcome.error.get("error")
            kind = error.get("type") if isinstance(error, dict) else None
            permit.observe({}, status=_ERROR_STATUS.get(str(kind), 500), body=outcome.error)
        if outcome.json_body is not None:
            self._settle_message(outcome.json_body, complete=outcome.completed, observed=True)
        elif outcome.started:
            body: dict[str, Any] = {"usage": outcome.usage}
            if outcome.quota is not None:
                body["quota"] = outcome.quota
            complete = outcome.completed and outcome.error is None
            # a stream cut before its final usage: count the output its deltas showed
            output = 0 if outcome.final_usage else outcome.output_estimate
            self._settle_message(body, complete=complete, observed=True, output=output)
            if complete and outcome.final_usage:
                self._mw._learn_output(self._plan.estimate, outcome)
        else:
            # nothing seen: keep the reservation (the server charged it), give back what it didn't
            permit.release()


def _without_quota(snapshot: RateLimitSnapshot) -> RateLimitSnapshot:
    """``snapshot`` without its wallet balance (fed after the settlement); itself if it has none."""
    # (attrs.evolve copies all sixteen fields, ~8 us, for the common answer without a wallet)
    return snapshot if snapshot.quota is None else attrs.evolve(snapshot, quota=None)


def _insufficient(permit: Permit, snapshot: RateLimitSnapshot, body: object) -> InsufficientCredits:
    message = ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = str(body["error"].get("message") or "")
    balance = snapshot.quota.balance if snapshot.quota is not None else None
    return InsufficientCredits(permit.credits or None, balance, message)


class _Learner(_Planner):
    """The response side of ``RateLimitMiddleware``: what an ``_Exchange`` feeds back.

    Holds no state of its own: ``RateLimitMiddleware.__init__`` sets every attribute named here.
    """

    _open_batches: dict[str, int]
    _output_cpt: dict[str, float]

    def _response_started(self, estimate: Estimate | None) -> None:
        if estimate is not None and estimate.cache._touch:  # (else nothing to record: no clock read)
            # the prefixes this request writes are cached from the start of its response
            self._estimator.predictor.record(estimate, self._now())

    def _output_chars_per_token(self, estimate: Estimate | None) -> float:
        with self._lock:
            return self._output_cpt.get(estimate.family if estimate is not None else "", _OUTPUT_CPT)

    def _learn_output(self, estimate: Estimate | None, outcome: BodyOutcome) -> None:
        """Learn characters per output token from a finished stream, for the next running estimates."""
        output = _number(outcome.usage.get("output_tokens")) or 0.0
        if estimate is None or output < 20 or outcome.output_chars <= 0:
            return  # too little text to say anything
        sample = outcome.output_chars / output
        with self._lock:
            old = self._output_cpt.get(estimate.family)
            self._output_cpt[estimate.family] = sample if old is None else old + 0.2 * (sample - old)

    def _learn(
        self, estimate: Estimate | None, usage: Mapping[str, Any], credits: float | None, *, complete: bool
    ) -> None:
        if not complete:
            return  # a cut stream's output says nothing about how much the model writes
        if estimate is not None:
            self._estimator.observe(estimate, usage)
        if credits is not None and self._wallet is not None:
            self._wallet.learn(Usage.from_any(usage), credits)

    # -- batches

    def _batch_created(self, body: object, requests: int) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            return
        with self._lock:
            self._open_batches[body["id"]] = requests
        if body.get("processing_status") == "ended":
            self._batch_ended(body["id"])

    def _batches_seen(self, body: object, method: str, path: str) -> None:
        batch_id = _batch_id_from_path(path)
        if batch_id is not None and (method.upper() == "DELETE" or path.rstrip("/").endswith("/results")):
            self._batch_ended(batch_id)  # only an ended batch can be deleted or have results
        batches: list[object] = []
        if isinstance(body, dict):
            data = body.get("data")
            batches = data if isinstance(data, list) else [body]
        for batch in batches:
            if isinstance(batch, dict) and batch.get("processing_status") == "ended":
                batch_id = batch.get("id")
                if isinstance(batch_id, str):
                    self._batch_ended(batch_id)

    def _batch_ended(self, batch_id: str) -> None:
        with self._lock:
            requests = self._open_batches.pop(batch_id, 0)
        if requests:
            self._limiter.batch_finished(requests)


def _batch_id_from_path(path: str) -> str | None:
    parts = path.rstrip("/").split("/")
    try:
        i = parts.index("batches")
    except ValueError:
        return None
    return parts[i + 1] if i + 1 < len(parts) else None
