"""The wait queue on its own: priority then arrival order, departures forgotten, size bounded."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from ratekeeper.gate._queue import WaiterState, WaitQueue


@dataclass(eq=False)
class W:
    priority: int
    state: WaiterState = WaiterState.WAITING


def test_the_head_is_the_oldest_of_the_highest_priority() -> None:
    q: WaitQueue[W] = WaitQueue()
    low, high, high2, mid = W(0), W(5), W(5), W(2)
    for w in (low, high, high2, mid):
        q.push(w)
    assert q.head() is high
    assert q.first(10) == [high, high2, mid, low]
    assert q.first(2) == [high, high2]
    assert q.first(0) == []


def test_whoever_left_the_line_is_skipped_and_dropped() -> None:
    q: WaitQueue[W] = WaitQueue()
    ws = [W(p) for p in (3, 3, 1, 7)]
    for w in ws:
        q.push(w)
    ws[3].state = WaiterState.GRANTED
    ws[0].state = WaiterState.GONE
    assert q.head() is ws[1]
    assert list(q.waiting()) == [ws[1], ws[2]]
    assert len(q) == 2  # the two met at the front of their lines are gone from the queue
    ws[1].state = ws[2].state = WaiterState.FAILED
    assert q.head() is None
    assert not q


def test_a_queue_whose_waiters_leave_from_the_middle_stays_the_size_of_its_line() -> None:
    """The head never moves (it waits for a big request) while 100,000 others come and go."""
    q: WaitQueue[W] = WaitQueue()
    head = W(10)
    q.push(head)
    for i in range(100_000):
        w = W(i % 1_000)
        q.push(w)
        w.state = WaiterState.GONE  # cancelled behind the head: never met at a line's front
        assert len(q) <= 2 * 2 + 64 + 1  # the head and the newcomer wait, at most 64 more kept
    assert q.head() is head


def test_levels_emptied_behind_the_head_do_not_pile_up() -> None:
    """100,000 priorities appear behind a head that never moves and are granted from the middle.

    An emptied level stays on the heap until it reaches the top; the compaction pass bounds
    how many such levels are kept, as it bounds the waiters that left.
    """
    q: WaitQueue[W] = WaitQueue()
    head = W(10**6)
    q.push(head)
    for i in range(100_000):
        w = W(i)
        q.push(w)
        assert q.first(2) == [head, w]
        w.state = WaiterState.GRANTED  # backfilled behind the head
        assert len(q._levels) <= 2 * 2 + 64 + 1
    assert q.head() is head
    assert q.first(5) == [head]


def test_waiting_is_a_copy_the_caller_may_change() -> None:
    q: WaitQueue[W] = WaitQueue()
    ws = [W(0) for _ in range(5)]
    for w in ws:
        q.push(w)
    for w in q.waiting():
        w.state = WaiterState.FAILED
        q.push(W(1))  # a newcomer while the caller walks the line: no "deque mutated" error
    assert len(q.first(100)) == 5


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.integers(-3, 3)),
            st.tuples(st.just("leave"), st.integers(0, 200)),
            st.tuples(st.just("head"), st.just(0)),
            st.tuples(st.just("first"), st.integers(0, 6)),
            st.tuples(st.just("clear"), st.just(0)),
        ),
        max_size=200,
    )
)
def test_the_queue_agrees_with_a_sorted_list(ops: list[tuple[str, int]]) -> None:
    """Whatever the mix of joins, departures and looks: the same order as sorting the line."""
    q: WaitQueue[W] = WaitQueue()
    line: list[tuple[int, int, W]] = []  # (-priority, arrival, waiter)
    arrival = 0
    for op, arg in ops:
        if op == "push":
            w = W(arg)
            q.push(w)
            line.append((-arg, arrival, w))
            arrival += 1
        elif op == "leave" and line:
            _, _, w = line.pop(arg % len(line))
            w.state = WaiterState.GONE
        elif op == "clear":
            for _, _, w in line:
                w.state = WaiterState.FAILED
            line.clear()
            q.clear()
        expected = [w for _, _, w in sorted(line, key=lambda t: t[:2])]
        if op == "head":
            assert q.head() is (expected[0] if expected else None)
        if op == "first":
            assert q.first(arg) == expected[:arg]
        assert len(q) >= len(line)
    assert list(q.waiting()) == [w for _, _, w in sorted(line, key=lambda t: t[:2])]
