"""Hostile arguments to the public calls: refused at once, clearly, with nothing enqueued or lost."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import anyio
import pytest

import ratekeeper
from ratekeeper import Limiter

MODEL = "claude-sonnet-4-5"


def _one_request_pool() -> Limiter:
    return Limiter(limits={"sonnet-4.x": {"requests": 1, "input_tokens": 100_000, "output_tokens": 100_000}})


class _Message:
    """Has a ``usage`` but is not one: what ``settle(message)`` passes by mistake."""

    usage: ClassVar[dict[str, int]] = {"input_tokens": 1, "output_tokens": 1}


@pytest.mark.parametrize(
    ("usage", "message"),
    [
        (_Message(), "got _Message; pass message.usage, not the message"),
        ("100", "got str"),
        (7, "got int"),
        (None, "got None"),
    ],
)
def test_settle_refuses_what_is_not_a_usage_and_keeps_the_reservation(usage: object, message: str) -> None:
    lim = _one_request_pool()
    permit = lim.acquire_nowait(MODEL, input_tokens=10, max_tokens=1000)
    before = dict(permit.reserved)
    with pytest.raises(TypeError, match=f"^usage must be a mapping .*{message}$"):
        permit.settle(usage)
    assert permit.active  # nothing refunded: the caller can still settle it right
    assert dict(permit.reserved) == before
    permit.settle({"input_tokens": 10, "output_tokens": 5})
    assert not permit.active


@pytest.mark.parametrize("value", [math.nan, math.inf, -1, 10**400, "5", True])
def test_record_output_refuses_a_count_that_is_not_one(value: Any) -> None:
    lim = _one_request_pool()
    permit = lim.acquire_nowait(MODEL, input_tokens=10, max_tokens=1000)
    before = lim.statistics()["sonnet-4.x"].levels["output_tokens"]
    with pytest.raises(ValueError, match=r"^output_tokens must be a count from 0 to "):
        permit.record_output(value)
    # (wall-clock refill of a few microseconds aside: nan once took it to minus the capacity)
    assert lim.statistics()["sonnet-4.x"].levels["output_tokens"] == pytest.approx(before, abs=1.0)
    permit.record_output(2000)  # a real count still works and goes over the reservation
    permit.settle({"input_tokens": 10, "output_tokens": 2000})


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"priority": None}, TypeError, r"^priority must be an int, got NoneType$"),
        ({"priority": "high"}, TypeError, r"^priority must be an int, got str$"),
        ({"priority": 1.5}, TypeError, r"^priority must be an int, got float$"),
        ({"timeout": math.nan}, ValueError, r"^timeout must be a number of seconds or None, got nan$"),
        ({"timeout": "1"}, TypeError, r"^timeout must be a number of seconds or None, got str$"),
    ],
)
async def test_a_bad_wait_argument_is_refused_before_it_can_wedge_the_pool(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    lim = _one_request_pool()
    first = lim.acquire_nowait(MODEL, input_tokens=10, max_tokens=10)  # the pool is now full
    async with anyio.create_task_group() as tg:
        got: list[str] = []

        async def waiter() -> None:
            async with lim.acquire(MODEL, input_tokens=10, max_tokens=10):
                got.append("waited")

        tg.start_soon(waiter)
        await anyio.sleep(0)
        with pytest.raises(error, match=message):
            lim.acquire(MODEL, input_tokens=10, max_tokens=10, **kwargs)
        with pytest.raises(error, match=message):
            lim.acquire_demand(MODEL, ratekeeper.Demand(input_tokens=10, max_tokens=10), **kwargs)
        first.release()  # never sent: all of it goes back, and the queue still moves
    assert got == ["waited"]


@pytest.mark.parametrize("model", [None, 5, b"claude-sonnet-4-5"])
def test_a_model_that_is_not_a_str_is_named_as_such(model: Any) -> None:
    lim = Limiter("tier-1")
    want = rf"^model must be a str \(a model id or pool name\), got {type(model).__name__}$"
    with pytest.raises(TypeError, match=want):
        lim.acquire(model, input_tokens=1, max_tokens=1)
    with pytest.raises(TypeError, match=want):
        lim.acquire_nowait(model, input_tokens=1, max_tokens=1)
