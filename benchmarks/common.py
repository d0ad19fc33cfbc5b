"""Shared helpers for benchmarks: medians, the benchmark queries and the closing JSON line."""

from __future__ import annotations

import json
import statistics


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def emit(result: dict) -> None:
    """The last line of stdout: one JSON object with every figure."""
    print(json.dumps(result, default=float))


def benchmark_queries(model: str, variant: str, split: str, n: int):
    """(adapter, profile path, regressor path, [(Query, area)], size bucket per query): the model
    loaded as `acs label` would, and `n` synthetic grounding queries with their ground truth."""
    import numpy as np

    from pipeline.assets import default_paths
    from pipeline.metrics import size_bucket
    from pipeline.models.base import load_adapter
    from pipeline.organism.scenes import grounding_queries

    adapter = load_adapter(model)
    profile, regressor = default_paths(model, None, None)
    items = grounding_queries(variant, split, n)
    buckets = np.array([str(size_bucket(a)) for _, a in items])
    return adapter, profile, regressor, items, buckets


def selector_metrics(results, buckets, selectors) -> dict:
    """Acc@0.5 / mIoU per size bucket of each selector's chosen candidate (no box: IoU 0)."""
    import numpy as np

    from pipeline.metrics import summarize

    out = {}
    for sel in selectors:
        ious = np.array([(r.candidates[r.selected[sel]].iou if r.selected.get(sel) is not None else 0.0)
                         for r in results])
        out[sel] = summarize(ious, buckets)
    return out
