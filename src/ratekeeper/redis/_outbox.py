"""The outbox: changes synchronous permit methods leave for later, and the thread that sends them.

A change (settle, release, a resync, ...) waits here until the next reserve carries it
in its own round trip or the flusher thread sends it a few milliseconds later. The
same thread runs timed callbacks (a prefetch's expiry). During a long outage the oldest
changes are dropped: they only refund or correct, so dropping them admits less.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final, final

from ratekeeper.redis._ops import RedisDown, Refused, Result, ScriptCall
from ratekeeper.redis._wire import Transport

__all__ = ["Outbox"]

log = logging.getLogger("ratekeeper")

#: Changes waiting to be sent are capped: during a long outage the oldest are dropped
#: (they only refund or correct; dropping them errs on the side of admitting less).
OUTBOX_LIMIT: Final = 10_000


@final
class Outbox:
    """Queued script calls, sent through ``transport`` by whoever comes first: a reserve or the flusher."""

    def __init__(
        self, transport: Transport, *, where: str, lease: float, timeout: float, flush_delay: float
    ) -> None:
        self._transport = transport
        self._where = where
        self._lease = lease
        self._timeout = timeout
        self._flush_delay = flush_delay
        self._queue: deque[ScriptCall] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        # held while flush() sends: a flush that finds the outbox empty because the flusher
        # thread has just taken it waits for that send, so "flushed" means "applied"
        self._flush_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._closed = False
        # (when, order, callback), run by the flusher thread: prefetches expire this way
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_order = itertools.count()
        self._closing: list[weakref.WeakMethod[Callable[[], None]]] = []

    def __len__(self) -> int:
        return len(self._queue)

    def send(self, call: ScriptCall) -> None:
        """Queue a change for the next round trip; the flusher sends it if nothing else does."""
        with self._lock:
            if len(self._queue) >= OUTBOX_LIMIT:
                self._queue.popleft()
            self._queue.append(call)
            self._start_flusher()
            self._ready.notify()

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the flusher thread ``delay`` seconds from now (not after close)."""
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_order), callback))
            self._start_flusher()
            self._ready.notify()

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run the bound method ``callback`` at ``close()``, before its last flush, if its object lives."""
        self._closing.append(weakref.WeakMethod(callback))

    def _start_flusher(self) -> None:
        # under _lock
        if self._flusher is None and not self._closed:
            self._flusher = threading.Thread(target=self._flush_loop, name="ratekeeper-redis", daemon=True)
            self._flusher.start()

    def take(self) -> list[ScriptCall]:
        """Everything queued, in order, to go ahead of a reserve in the same pipeline.

        Sent again, a call with an id is a no-op if it had run; one whose id Redis may
        have forgotten by the time it arrives (first sent over ``lease`` seconds ago,
        less two timeouts and a second) is dropped instead, with a warning.
        """
        if not self._queue:  # a racy peek is fine: a call added right now goes next time
            return []
        with self._lock:
            calls = list(self._queue)
            self._queue.clear()
        horizon = time.monotonic() - (self._lease - 2.0 * self._timeout - 1.0)
        keep = [c for c in calls if not (c.ident is not None and c.sent and c.sent < horizon)]
        if len(keep) < len(calls):
            log.warning(
                "ratekeeper: %d queued changes to Redis at %s are dropped: first sent over "
                "%gs ago, Redis may have forgotten whether it applied them",
                len(calls) - len(keep),
                self._where,
                self._lease,
            )
        return keep

    def put_back(self, calls: Sequence[ScriptCall]) -> None:
        """Calls a failed round trip may not have delivered go back to the front, in order."""
        if not calls:
            return
        with self._lock:
            self._queue.extendleft(reversed(calls))
            while len(self._queue) > OUTBOX_LIMIT:
                self._queue.popleft()
            self._ready.notify()

    def deliver(self, calls: Sequence[ScriptCall], results: Sequence[Result]) -> None:
        """Hand each reply to its call's callback (a broken callback must not lose the others).

        A call Redis refused is logged and dropped: it may have run in part.
        """
        for call, result in zip(calls, results, strict=True):
            if isinstance(result, Refused):
                log.error(
                    "ratekeeper: Redis at %s refused a %s change (%s); it is dropped",
                    self._where,
                    call.script,
                    result,
                )
            elif call.on_reply is not None:
                try:
                    call.on_reply(result)
                except Exception:
                    log.exception("ratekeeper: handling a Redis reply failed")

    def flush(self) -> bool:
        """Send every queued change now (blocking); False if Redis could not be reached.

        True: every change queued before the call has been applied (or refused, and
        logged), including one the flusher thread was sending at that moment.
        """
        with self._flush_lock:
            calls = self.take()
            if not calls:
                return True
            try:
                results = self._transport.run_sync(calls)
            except RedisDown:
                self.put_back(calls)
                return False
            self.deliver(calls, results)
            return True

    def _wait_for_work(self) -> list[Callable[[], None]] | None:
        """Block until a change is queued or a timer is due; the callbacks due (None: closed)."""
        due: list[Callable[[], None]] = []
        with self._lock:
            while not self._queue and not self._closed:
                if not self._timers:
                    self._ready.wait()
                    continue
                wait = self._timers[0][0] - time.monotonic()
                if wait <= 0.0:
                    break
                self._ready.wait(wait)
            if self._closed and not self._queue:
                return None
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
        return due

    def _flush_loop(self) -> None:
        while True:
            due = self._wait_for_work()
            if due is None:
                return
            for callback in due:
                try:
                    callback()
                except Exception:
                    log.exception("ratekeeper: a timed callback failed")
            if not self._queue:
                continue
            # a short pause lets a reserve that is about to go carry these changes
            if self._flush_delay:
                time.sleep(self._flush_delay)
            wait = self._transport.down_until - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, 1.0))
                if self._closed:
                    return
                continue
            try:
                self.flush()
            except Exception:
                # (the scripts flushed again between a reload and its retry, say): that batch
                # is lost, but this thread must live to send the next ones
                log.exception("ratekeeper: sending queued changes to Redis failed; they are dropped")

    def close(self) -> None:
        """Run the close callbacks, send what is queued (best effort), stop the flusher thread."""
        for ref in self._closing:
            callback = ref()
            if callback is None:
                continue
            try:
                callback()
            except Exception:
                log.exception("ratekeeper: closing a limiter's prefetches failed")
        try:
            self.flush()
        except Exception:
            log.exception("ratekeeper: sending the last queued changes to Redis failed")
        with self._lock:
            self._closed = True
            self._ready.notify()
        flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(timeout=self._timeout * 2 + 1.0)
