"""The quick rows of the feedback matrix (``feedback_matrix.py``), once each, under every moment.

The numbers go to the benchmark's ``extra_info``; the tests check only what
must hold whatever they are: ratekeeper's limiter holds no permit and queues
no request once the run is over, and no request of ratekeeper's failed. The
issue's targets are marked in the table, not asserted.
"""

from __future__ import annotations

from typing import Any

import pytest
from feedback_matrix import MOMENTS, ROWS, Cell, Row, run_cell

QUICK = [(row, moment) for row in ROWS if row.quick for moment in MOMENTS]


@pytest.mark.slow
@pytest.mark.parametrize(("row", "moment"), QUICK, ids=[f"{r.name}-{m}" for r, m in QUICK])
def test_feedback_matrix(row: Row, moment: str, benchmark: Any) -> None:
    cell: Cell = benchmark.pedantic(run_cell, args=(row, moment), rounds=1, iterations=1)
    benchmark.extra_info.update(cell.as_dict())
    rk = cell.result["ratekeeper"]
    assert cell.in_flight == 0
    assert cell.queued == 0
    assert rk.requests_failed == 0
    assert rk.requests_ok > 0
