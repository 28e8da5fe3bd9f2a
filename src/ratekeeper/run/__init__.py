"""Running a file of requests through the limits: ``run_requests`` and ``ratekeeper run``.

``_requests`` reads the Message Batches request format, ``_results`` writes
its result format, ``_engine`` sends, ``_plan`` estimates a dry run.
"""

from __future__ import annotations

from ratekeeper.run._engine import run_requests
from ratekeeper.run._requests import BadLine, BatchRequest, parse_request, read_requests
from ratekeeper.run._results import Previous, RequestResult, ResultsFile

__all__ = [
    "BadLine",
    "BatchRequest",
    "Previous",
    "RequestResult",
    "ResultsFile",
    "parse_request",
    "read_requests",
    "run_requests",
]
