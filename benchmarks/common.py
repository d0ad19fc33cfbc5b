"""Shared helpers for benchmarks: medians and the closing JSON line."""

from __future__ import annotations

import json
import statistics


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def emit(result: dict) -> None:
    """The last line of stdout: one JSON object with every figure."""
    print(json.dumps(result, default=float))
