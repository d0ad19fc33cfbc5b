"""Shared helpers for benchmarks: synthetic queries with ground truth, medians, the JSON line."""

from __future__ import annotations

import json
import statistics


def synthetic_queries(variant: str, split: str, n: int, seed: int = 0):
    """The first `n` unambiguous queries of a synthetic split, as `pipeline.ground.Query`."""
    from pipeline.ground import Query
    from pipeline.synthetic import make_scene

    out, i = [], 0
    while len(out) < n:
        scene = make_scene(variant, split, i, seed=seed)
        for cat, obj in scene.queries():
            x, y, w, h = obj.bbox
            out.append((Query(f"{variant}-{split}-{i}:{cat}", scene.image, cat, (x, y, x + w, y + h)), obj.area))
        i += 1
    return out[:n]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def emit(result: dict) -> None:
    """The last line of stdout: one JSON object with every figure."""
    print(json.dumps(result, default=float))
