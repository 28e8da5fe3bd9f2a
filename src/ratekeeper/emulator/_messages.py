"""``POST /v1/messages``: validation, admission, accounting, and the answer (JSON or SSE)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from ratekeeper.emulator._accel import acceleration_wait, note_admission
from ratekeeper.emulator._body import decide_output, message_body, parse_json, usage_fields, validate
from ratekeeper.emulator._generation import Timeline, make_timeline
from ratekeeper.emulator._models import display_model_id, model_traits
from ratekeeper.emulator._pools import Pool
from ratekeeper.emulator._state import LiveRequest, ModelInfo, ServerState
from ratekeeper.emulator._tokens import count_request, output_words
from ratekeeper.emulator._wire import EmulatorRequest, Reply, SseEvent
from ratekeeper.errors import UnknownModelError

__all__ = ["abandon", "handle_messages"]


def _wallet_error(
    st: ServerState,
    status: int,
    code: str,
    message: str,
    hint: str,
    rid: str,
    now: float,
    retry_after: int | None = None,
) -> Reply:
    extra = {"hint": hint, "docs_url": f"https://usequota.ai/docs/errors#{code}"}
    return st.error(status, code, message, rid, now, retry_after=retry_after, envelope_extra=extra)


def _charge_output(pool: Pool, amount: int, rid: str, at: float) -> None:
    pool.charge("output_tokens", amount, at, rid)


def handle_messages(st: ServerState, req: EmulatorRequest, now: float) -> Reply:
    """Answer one ``POST /v1/messages``."""
    rid = st.ids.request_id()
    cfg = st.config
    if len(req.body) > cfg.max_request_bytes:
        st.record(rid, now, "messages", 413, error_type="request_too_large")
        return st.error(
            413, "request_too_large", "Request exceeds the maximum allowed number of bytes.", rid, now
        )
    body, why = parse_json(req.body)
    if body is not None:
        why = validate(body)
    if body is None or why:
        st.record(rid, now, "messages", 400, error_type="invalid_request_error")
        return st.error(400, "invalid_request_error", why, rid, now)
    model = str(body["model"])
    wallet = cfg.mode == "wallet"
    try:
        if wallet and "/" in model and not model.lower().startswith("anthropic/"):
            raise UnknownModelError(model, ())
        info = st.model_info(model)
    except UnknownModelError:
        st.record(rid, now, "messages", 404, model=model, error_type="not_found_error")
        if wallet:
            return _wallet_error(
                st,
                404,
                "model_not_found",
                f"Unknown model: {model}",
                "Use a provider-prefixed model id such as anthropic/claude-sonnet-4.6.",
                rid,
                now,
            )
        return st.error(404, "not_found_error", f"model: {model}", rid, now)
    return _Admission(st, req, body, info, rid, now).run()


class _Admission:
    """One Messages request from admission to the reply it gets."""

    def __init__(
        self,
        st: ServerState,
        req: EmulatorRequest,
        body: dict[str, Any],
        info: ModelInfo,
        rid: str,
        now: float,
    ) -> None:
        self.st, self.req, self.body, self.info, self.rid, self.now = st, req, body, info, rid, now
        self.cfg = st.config
        self.model = str(body["model"])
        self.shown_model = display_model_id(self.model)
        traits = model_traits(self.model, self.cfg.min_cache_tokens)
        self.counted = count_request(body, self.shown_model, traits.token_factor)
        self.plan = st.cache.plan(self.counted, traits.min_cache_tokens, now)
        self.max_tokens = int(body["max_tokens"])
        self.stream = bool(body.get("stream"))
        reads = self.plan.read if info.cache_reads_count else 0
        self.itpm_cost = self.plan.input + self.plan.creation + reads
        self.message_id = st.ids.message_id()
        self.wallet_hold = (0, 0)
        self.rec = st.record(
            rid,
            now,
            "messages",
            0,
            pool=info.pool.name,
            model=self.model,
            stream=self.stream,
            max_tokens=self.max_tokens,
        )

    # ------------------------------------------------------------------ refusals

    def _refuse(self, reply: Reply, error_type: str) -> Reply:
        self.rec.status = reply.status
        self.rec.error_type = error_type
        ra = reply.header("retry-after")
        self.rec.retry_after = int(ra) if ra is not None else None
        self.rec.settled_at = self.now
        return reply

    def _rate_headers(self, at: float | None = None) -> list[tuple[str, str]]:
        at = self.now if at is None else at
        if self.cfg.mode == "api":
            return self.info.pool.headers(self.cfg.epoch, at, combined=True)
        if self.cfg.mode == "unified":
            return self.st.unified.headers(self.cfg.epoch, at)
        return []

    def _reports_at_response(self) -> bool:
        moment = self.cfg.report_moment
        if moment == "mixed":
            return self.st.moment_rng.random() < 0.5
        return moment == "response"

    def _check_api(self) -> Reply | None:
        st, now, pool = self.st, self.now, self.info.pool
        if st.spend.reached(now):
            when = st.spend.resets_at(now).strftime("%Y-%m-%d at %H:%M UTC")
            msg = f"You have reached your specified API usage limits. You will regain access on {when}."
            reply = st.error(
                429,
                "rate_limit_error",
                msg,
                self.rid,
                now,
                headers=self._rate_headers(),
                details={"error_code": "enforced_spend_limit_reached"},
            )
            return self._refuse(reply, "spend_limit")
        if self.cfg.acceleration is not None:
            wait = acceleration_wait(pool, self.cfg.acceleration, now)
            if wait is not None:
                msg = (
                    "This request was rate limited because your organization's usage increased too "
                    "sharply. Please ramp up your traffic gradually and keep a consistent usage pattern."
                )
                ra = 60 if wait == float("inf") else max(1, int(-(-wait // 1)))
                reply = st.error(
                    429, "rate_limit_error", msg, self.rid, now, headers=self._rate_headers(), retry_after=ra
                )
                return self._refuse(reply, "acceleration_limit")
        out_cost = self.max_tokens if self.cfg.otpm_rule == "max_tokens" else 1
        refusal = pool.check({"requests": 1, "input_tokens": self.itpm_cost, "output_tokens": out_cost}, now)
        if refusal is not None:
            reply = st.error(
                429,
                "rate_limit_error",
                refusal.message(),
                self.rid,
                now,
                headers=self._rate_headers(),
                retry_after=refusal.retry_after(),
            )
            return self._refuse(reply, "rate_limit_error")
        return None

    def _check_unified(self) -> Reply | None:
        wait = self.st.unified.rejected_for(self.now)
        if wait is None:
            return None
        msg = "This request would exceed your account's rate limit. Please try again later."
        reply = self.st.error(
            429,
            "rate_limit_error",
            msg,
            self.rid,
            self.now,
            headers=self._rate_headers(),
            retry_after=max(1, int(-(-wait // 1))),
        )
        return self._refuse(reply, "rate_limit_error")

    def _reservation(self) -> int:
        price = self.st.price(self.info.model_class)
        p = self.plan
        usd = price.cost_usd(
            input_tokens=p.input,
            cache_write_5m=p.write_5m,
            cache_write_1h=p.write_1h,
            cache_read=p.read,
            output_tokens=self.max_tokens,
        )
        return self.st.wallet.credits(usd)

    def _check_wallet(self) -> Reply | None:
        st, now = self.st, self.now
        pool = st.endpoint_pool("wallet")
        refusal = pool.check({"requests": 1}, now)
        if refusal is not None:
            msg = f"Rate limit exceeded: {pool.limits['requests']} requests per minute."
            reply = _wallet_error(
                st,
                429,
                "rate_limit_exceeded",
                msg,
                "Slow down or ask for a per-key override.",
                self.rid,
                now,
                retry_after=refusal.retry_after(),
            )
            return self._refuse(reply, "rate_limit_exceeded")
        need = self._reservation()
        if need > st.wallet.available:
            msg = f"Reservation of {need} credits exceeds the wallet balance of {int(st.wallet.available)}."
            reply = _wallet_error(
                st, 402, "insufficient_credits", msg, "Top up the wallet or lower max_tokens.", self.rid, now
            )
            return self._refuse(reply, "insufficient_credits")
        pool.charge("requests", 1, now, self.rid)
        return None

    def _check_overload(self) -> Reply | None:
        p = self.cfg.overload_probability
        if p and self.st.rng.random() < p:
            reply = self.st.error(529, "overloaded_error", "Overloaded", self.rid, self.now)
            return self._refuse(reply, "overloaded_error")
        return None

    # ------------------------------------------------------------------ admission

    def run(self) -> Reply:
        check = {"api": self._check_api, "unified": self._check_unified, "wallet": self._check_wallet}
        refused = check[self.cfg.mode]() or self._check_overload()
        if refused is not None:
            return refused
        return self._admit()

    def _admit(self) -> Reply:
        st, cfg, now, rid, pool = self.st, self.cfg, self.now, self.rid, self.info.pool
        output = decide_output(st, self.req, self.body, self.max_tokens)
        tl = make_timeline(output, cfg.latency, st.rng)
        broken = False
        if (
            self.stream
            and cfg.midstream_error_probability
            and st.rng.random() < cfg.midstream_error_probability
        ):
            tl, broken = tl.cut(st.rng.randrange(len(tl.chunks))), True
            self.rec.error_type = "overloaded_error"  # sent as an SSE error event after a 200
        st.cache.commit(self.plan, now, now + tl.start, rid)
        rec = self.rec
        rec.status = 200
        rec.input_tokens, rec.cache_creation_input_tokens = self.plan.input, self.plan.creation
        rec.cache_read_input_tokens = self.plan.read
        rec.planned_output_tokens = tl.output_tokens
        if cfg.mode == "api":
            rec.admitted = {"requests": 1.0, "input_tokens": float(self.itpm_cost)}
            pool.charge("requests", 1, now, rid)
            pool.charge("input_tokens", self.itpm_cost, now, rid)
            if cfg.otpm_rule == "max_tokens":
                pool.charge("output_tokens", self.max_tokens, now, rid)
                rec.admitted["output_tokens"] = float(self.max_tokens)
            else:
                self._schedule_progressive(tl)
            if cfg.acceleration is not None:
                note_admission(pool, now)
        elif cfg.mode == "unified":
            st.unified.admit(now)
        headers = self._rate_headers()
        wallet_info = self._wallet_admit(tl.output_tokens) if cfg.mode == "wallet" else None
        st.live[rid] = LiveRequest(now, tl, self._settle)
        st.scheduler.at(now + tl.end, rid, lambda t: self._settle(tl.output_tokens, t))
        if self.stream:
            return self._stream_reply(tl, headers, wallet_info, broken)
        return self._json_reply(tl, headers, wallet_info)

    def _schedule_progressive(self, tl: Timeline) -> None:
        pool, rid, prev = self.info.pool, self.rid, 0
        for off, cum in tl.chunks:
            step = cum - prev
            prev = cum
            self.st.scheduler.at(self.now + off, rid, functools.partial(_charge_output, pool, step, rid))

    def _cost(self, output: int) -> float:
        p = self.plan
        return self.st.price(self.info.model_class).cost_usd(
            input_tokens=p.input,
            cache_write_5m=p.write_5m,
            cache_write_1h=p.write_1h,
            cache_read=p.read,
            output_tokens=output,
        )

    def _wallet_admit(self, output: int) -> dict[str, Any]:
        w = self.st.wallet
        reserve = self._reservation()
        used = w.credits(self._cost(output))
        before = w.balance
        w.balance -= used
        w.held += reserve - used
        self.wallet_hold = (reserve, used)
        return {
            "reserved": reserve,
            "balance_reserved": int(before - reserve),
            "quota": {
                "credits_used": used,
                "balance_before": int(before),
                "balance_after": int(w.balance),
                "ledger_id": self.st.ids.ledger_id(),
                "wallet": w.config.wallet,
                "billing_mode": w.config.billing_mode,
            },
        }

    def _settle(self, produced: int, at: float) -> None:
        st, rec, cfg = self.st, self.rec, self.cfg
        st.live.pop(self.rid, None)
        if cfg.mode == "api" and cfg.otpm_rule == "max_tokens":
            self.info.pool.refund("output_tokens", self.max_tokens - produced, at, self.rid)
        cost = self._cost(produced)
        rec.output_tokens, rec.cost_usd, rec.settled_at = produced, cost, at
        if cfg.mode == "api":
            st.spend.add(cost, at)
        elif cfg.mode == "unified":
            st.unified.add(cost, at)
        else:
            reserve, used = self.wallet_hold
            actual = st.wallet.credits(cost)
            st.wallet.balance += used - actual
            st.wallet.held -= reserve - used

    # ------------------------------------------------------------------ answers

    def _message(self, text: str, output: int, stop_reason: str | None) -> dict[str, Any]:
        return message_body(self.message_id, self.shown_model, text, self.plan, output, stop_reason)

    def _stop_reason(self, output: int) -> str:
        return "max_tokens" if output >= self.max_tokens else "end_turn"

    def _json_reply(
        self, tl: Timeline, headers: list[tuple[str, str]], wallet: dict[str, Any] | None
    ) -> Reply:
        out = tl.output_tokens
        body = self._message(output_words(0, out), out, self._stop_reason(out))
        base = self.st.base_headers(self.rid, self.now + tl.end)
        quota: list[tuple[str, str]] = []
        if wallet is not None:
            body["quota"] = dict(wallet["quota"])
            quota = self._quota_headers(wallet)
        late = None
        if self._reports_at_response():
            settled_at = self.now + tl.end

            def late(t: float) -> list[tuple[str, str]]:
                # never before this request's own settlement, whatever the caller's clock rounding
                at = self.st.advance(max(t, settled_at))
                return base + self._rate_headers(at) + quota

        return Reply(
            status=200,
            headers=tuple(base + headers + quota),
            request_id=self.rid,
            delay=tl.end,
            body=body,
            ends_at=tl.end,
            late_headers=late,
        )

    def _quota_headers(self, wallet: Mapping[str, Any]) -> list[tuple[str, str]]:
        q = wallet["quota"]
        out = [("X-Quota-Credits-Used", str(q["credits_used"])), ("X-Quota-Balance", str(q["balance_after"]))]
        if self.st.wallet.config.markup != 1.0:
            out.append(("X-Quota-Markup", f"{self.st.wallet.config.markup:g}"))
        return out

    def _stream_reply(
        self, tl: Timeline, headers: list[tuple[str, str]], wallet: dict[str, Any] | None, broken: bool
    ) -> Reply:
        start = tl.start
        first = self._message("", 1, None)
        first["usage"]["output_tokens"] = 1
        events = [
            SseEvent(start, "message_start", {"type": "message_start", "message": first}),
            SseEvent(
                start,
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            SseEvent(start, "ping", {"type": "ping"}),
        ]
        prev = 0
        for off, cum in tl.chunks:
            delta = {"type": "text_delta", "text": output_words(prev, cum - prev)}
            events.append(
                SseEvent(
                    off, "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
                )
            )
            prev = cum
        events += self._stream_close(tl, wallet, broken)
        hdrs = self.st.base_headers(self.rid, self.now + start, "text/event-stream; charset=utf-8")
        hdrs += [("cache-control", "no-cache"), *headers]
        if wallet is not None:
            hdrs += [
                ("X-Quota-Credits-Reserved", str(wallet["reserved"])),
                ("X-Quota-Balance-Reserved", str(wallet["balance_reserved"])),
            ]
        return Reply(
            status=200,
            headers=tuple(hdrs),
            request_id=self.rid,
            delay=start,
            events=tuple(events),
            ends_at=tl.end,
        )

    def _stream_close(self, tl: Timeline, wallet: dict[str, Any] | None, broken: bool) -> list[SseEvent]:
        """The events after the last delta: an ``error`` if the stream breaks off, else its end."""
        end = tl.end
        if broken:
            err = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            return [SseEvent(end, "error", err)]
        out = tl.output_tokens
        usage = usage_fields(self.plan, out)
        del usage["cache_creation"], usage["service_tier"]
        events = [
            SseEvent(end, "content_block_stop", {"type": "content_block_stop", "index": 0}),
            SseEvent(
                end,
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self._stop_reason(out), "stop_sequence": None},
                    "usage": usage,
                },
            ),
            SseEvent(end, "message_stop", {"type": "message_stop"}),
        ]
        if wallet is not None:
            events.append(SseEvent(end, "quota_usage", {"type": "quota_usage", "quota": wallet["quota"]}))
        return events


def abandon(st: ServerState, request_id: str, now: float) -> bool:
    """The client went away at ``now``: settle what was produced; False if nothing was running."""
    live = st.live.get(request_id)
    if live is None:
        return False
    st.scheduler.cancel(request_id)
    produced = live.timeline.produced_by(now - live.arrival)
    live.settle(produced, now)
    st.cache.cancel(request_id, now)
    rec = st.by_id.get(request_id)
    if rec is not None:
        rec.abandoned = True
    return True
