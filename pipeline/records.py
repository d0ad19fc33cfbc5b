"""From one query's result (or failure) to its rows in boxes/, candidates/ and attention/.

Pure functions: exactly one boxes row and exactly K candidate rows per query whatever happened,
so row counts are invariants the tests and the run summary can check.
"""

from __future__ import annotations

import math

import numpy as np

from .ground import QueryResult
from .metrics import size_bucket
from .schema import SELECTOR_COLUMNS

GT_COLS = ("gt_x1", "gt_y1", "gt_x2", "gt_y2")


def _f(v) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def confidence(selector: str, result: QueryResult, idx: int) -> float | None:
    """A [0, 1] confidence for the selected box, comparable across queries.

    Predicted IoU when a regressor scored the query; otherwise a fixed normalisation of the
    selector's own score (documented in docs/schema.md), so export consumers can threshold it.
    """
    cand = result.candidates[idx]
    if "acs-learned" in cand.scores and math.isfinite(cand.scores["acs-learned"]):
        return cand.scores["acs-learned"]
    k = len(result.candidates)
    s = cand.scores.get(selector, float("nan"))
    if selector == "vote" and k > 1:
        return _clip(s / (k - 1))
    if selector == "acs-free" and cand.entropy is not None and result.grid_hw:
        # mean entropy relative to the uniform map's: 1 = all mass on one cell, 0 = uniform
        return _clip(1.0 + s / math.log(max(2, result.grid_hw[0] * result.grid_hw[1])))
    if selector in ("loc-mass", "loc-heads"):  # an attention share / an IoU: already in [0, 1]
        return _clip(s)
    if selector == "oracle":
        return _clip(s)
    # greedy, random, logprob: the model's own probability of the coordinate tokens
    return _clip(math.exp(cand.mean_logprob)) if math.isfinite(cand.mean_logprob) else None


def _clip(v: float) -> float | None:
    return None if not math.isfinite(v) else float(min(1.0, max(0.0, v)))


def rows_for_query(meta: dict, result: QueryResult | None, *, selector: str, k: int, run_id: str,
                   model_id: str, status: str | None = None, error: str | None = None,
                   dump_maps: bool = False) -> tuple[dict, list[dict], list[dict]]:
    """`meta` is the query's listing row (query_id, image_id, image_uri, category, gt_*, shard_id...)."""
    gt = [meta.get(c) for c in GT_COLS]
    has_gt = all(v is not None and math.isfinite(v) for v in gt)
    base = {"run_id": run_id, "shard_id": meta.get("shard_id")}
    box_row = {
        "query_id": meta["query_id"], "image_id": meta.get("image_id"), "image_uri": meta.get("image_uri"),
        "category": meta.get("category"), "selector": selector, "cand_idx": None,
        "x1": None, "y1": None, "x2": None, "y2": None, "score": None, "predicted_iou": None,
        "confidence": None, "n_candidates": k, "n_ok_candidates": 0,
        "image_width": meta.get("width"), "image_height": meta.get("height"), "model_id": model_id,
        **{c: _f(v) for c, v in zip(GT_COLS, gt)}, "gt_area": _f(meta.get("gt_area")),
        "iou": None, "size_bucket": None, **base,
    }
    if has_gt:
        area = meta.get("gt_area")
        if area is None or not math.isfinite(area):
            area = (gt[2] - gt[0]) * (gt[3] - gt[1])
        box_row["size_bucket"] = str(size_bucket(float(area)))
    if result is not None and not result.candidates:  # failed inside the grounder (e.g. query_error)
        status, error, result = result.status, result.error, None
    if result is None:
        box_row.update(status=status or "model_error", error=error)
        cands = [{"query_id": meta["query_id"], "cand_idx": c, "text": None, "status": "missing",
                  "error": error, "x1": None, "y1": None, "x2": None, "y2": None, "box_fixed": None,
                  "mean_logprob": None, "n_tokens": 0, **{col: None for col in SELECTOR_COLUMNS.values()},
                  "iou": None, **base} for c in range(k)]
        if has_gt:
            box_row["iou"] = 0.0  # a failed query is a miss, never silently left out of the metrics
        return box_row, cands, []

    idx = result.selected.get(selector)
    cand_rows, attn_rows = [], []
    for c in result.candidates:
        box = c.box or (None,) * 4
        cand_rows.append({
            "query_id": meta["query_id"], "cand_idx": c.cand_idx, "text": c.text, "status": c.status,
            "error": c.error, "x1": _f(box[0]), "y1": _f(box[1]), "x2": _f(box[2]), "y2": _f(box[3]),
            "box_fixed": c.box_fixed, "mean_logprob": _f(c.mean_logprob), "n_tokens": c.n_tokens,
            **{col: _f(c.scores.get(sel)) for sel, col in SELECTOR_COLUMNS.items()},
            "iou": _f(c.iou), **base})
        if c.entropy is not None:
            row = {"query_id": meta["query_id"], "cand_idx": c.cand_idx, "grid_h": result.grid_hw[0],
                   "grid_w": result.grid_hw[1], "layers": result.layers, "heads": result.heads,
                   "entropy": np.asarray(c.entropy, dtype=np.float32).ravel().tolist(),
                   "prompt_mass": None, "prompt_spatial_entropy": None, **base}
            if not attn_rows and result.prompt_mass is not None:  # per query: on its first row only
                row["prompt_mass"] = np.asarray(result.prompt_mass, np.float32).ravel().tolist()
                row["prompt_spatial_entropy"] = np.asarray(result.prompt_spatial_entropy, np.float32).ravel().tolist()
            if dump_maps:
                pooled = c.pooled
                row["map_grid"] = None if pooled is None else int(pooled.shape[-1])
                row["maps"] = None if pooled is None else np.asarray(pooled, np.float16).ravel().tolist()
            attn_rows.append(row)
    n_ok = sum(c.status == "ok" for c in result.candidates)
    box_row["n_ok_candidates"] = n_ok
    if idx is None:
        reason = result.error or f"selector {selector!r} has no score for any candidate"
        box_row.update(status="no_box" if n_ok == 0 else "model_error", error=reason)
        if has_gt:
            box_row["iou"] = 0.0
        return box_row, cand_rows, attn_rows
    chosen = result.candidates[idx]
    box_row.update(cand_idx=idx, x1=chosen.box[0], y1=chosen.box[1], x2=chosen.box[2], y2=chosen.box[3],
                   score=_f(chosen.scores.get(selector)), predicted_iou=_f(chosen.scores.get("acs-learned")),
                   confidence=confidence(selector, result, idx), status="ok", error=None,
                   iou=_f(chosen.iou) if has_gt else None)
    return box_row, cand_rows, attn_rows
