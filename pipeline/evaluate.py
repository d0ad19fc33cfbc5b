"""Re-scoring a labelled run without the model: every selector is a column of `candidates/`.

For each selector, each query's choice is the candidate with the highest score (ties: lowest
cand_idx, i.e. greedy first; `no_box` candidates have no score and are never chosen). A query
whose selector chose nothing counts as IoU 0: failures stay in the denominator.
"""

from __future__ import annotations

import posixpath

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import BOXES_SCHEMA, CANDIDATES_SCHEMA, SELECTOR_COLUMNS


def read_table(url: str, name: str, storage_options: dict | None = None, schema: pa.Schema | None = None,
               columns: list[str] | None = None) -> pl.DataFrame:
    """All files of one table; `columns` projects (pooled maps are large: read them only when needed)."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    d = posixpath.join(root.rstrip("/"), name)
    fs.invalidate_cache(d)  # another process may have written files since this process last listed
    files = sorted(p for p in (fs.ls(d, detail=False) if fs.exists(d) else []) if p.endswith(".parquet"))
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    if not tables:
        return pl.from_arrow(schema.empty_table()) if schema is not None else pl.DataFrame()
    return pl.from_arrow(pa.concat_tables(tables, promote_options="default"))


def load_tables(url: str, storage_options: dict | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    return (read_table(url, "boxes", storage_options, BOXES_SCHEMA),
            read_table(url, "candidates", storage_options, CANDIDATES_SCHEMA))


def selector_rows(boxes: pl.DataFrame, cands: pl.DataFrame) -> pl.DataFrame:
    """(query_id, selector, size_bucket, iou, cand_idx) for every selector present in the run."""
    queries = boxes.filter(pl.col("size_bucket").is_not_null()).select("query_id", "size_bucket")
    frames = []
    always = {"greedy", "random", "logprob", "vote"}  # computed for every processed query
    for sel, col in SELECTOR_COLUMNS.items():
        if col not in cands.columns:
            continue
        scored = cands[col].drop_nulls().drop_nans().len() > 0
        if not scored and sel not in always:
            continue
        valid = cands.filter(pl.col(col).is_not_null() & pl.col(col).is_not_nan())
        chosen = (valid.sort(["query_id", col, "cand_idx"], descending=[False, True, False])
                  .group_by("query_id", maintain_order=True).first()
                  .select("query_id", "cand_idx", pl.col("iou").fill_null(0.0)))
        frames.append(queries.join(chosen, on="query_id", how="left")
                      .with_columns(pl.lit(sel).alias("selector"), pl.col("iou").fill_null(0.0)))
    if not frames:
        return pl.DataFrame(schema={"query_id": pl.String, "size_bucket": pl.String, "cand_idx": pl.Int32,
                                    "iou": pl.Float64, "selector": pl.String})
    return pl.concat(frames, how="vertical_relaxed")


def attach_gt(boxes: pl.DataFrame, cands: pl.DataFrame, gt_json: str, storage_options: dict | None = None):
    """Ground truth from a COCO file for runs made without it (manifest or shard inputs): matched on
    (image id or file stem, category name); only single-instance pairs, as in METHOD.md."""
    from .inputs import list_coco
    from .metrics import size_bucket

    gts = list_coco(gt_json, "", storage_options)
    table = {}
    for q in gts:
        if q.get("pre_status"):
            continue
        stem = posixpath.splitext(posixpath.basename(q["image_uri"] or ""))[0]
        for key in (q["image_id"], stem):
            table[(str(key), q["category"])] = q
    rows = []
    for r in boxes.select("query_id", "image_id", "image_uri", "category").iter_rows(named=True):
        stem = posixpath.splitext(posixpath.basename((r["image_uri"] or "").split("#")[-1]))[0]
        q = table.get((str(r["image_id"]), r["category"])) or table.get((stem, r["category"]))
        if q:
            area = q["gt_area"] or (q["gt_x2"] - q["gt_x1"]) * (q["gt_y2"] - q["gt_y1"])
            rows.append({"query_id": r["query_id"], "gt_x1": q["gt_x1"], "gt_y1": q["gt_y1"], "gt_x2": q["gt_x2"],
                         "gt_y2": q["gt_y2"], "gt_area": area, "size_bucket": str(size_bucket(area))})
    gt = pl.DataFrame(rows, schema={"query_id": pl.String, "gt_x1": pl.Float64, "gt_y1": pl.Float64,
                                    "gt_x2": pl.Float64, "gt_y2": pl.Float64, "gt_area": pl.Float64,
                                    "size_bucket": pl.String})
    boxes = boxes.drop("gt_x1", "gt_y1", "gt_x2", "gt_y2", "gt_area", "size_bucket").join(gt, on="query_id", how="left")
    cands = cands.join(gt.select("query_id", "gt_x1", "gt_y1", "gt_x2", "gt_y2"), on="query_id", how="left")
    # The same IoUs `acs label` writes when it has the ground truth: with a box, its IoU; without
    # one (a failed query or candidate), 0.0, a miss; null only where the query has no match.
    return _with_iou(boxes), _with_iou(cands).drop("gt_x1", "gt_y1", "gt_x2", "gt_y2")


def _with_iou(frame: pl.DataFrame) -> pl.DataFrame:
    import numpy as np

    from .metrics import paired_iou

    pred = frame.select("x1", "y1", "x2", "y2").cast(pl.Float64).fill_null(float("nan")).to_numpy()
    g = frame.select("gt_x1", "gt_y1", "gt_x2", "gt_y2").cast(pl.Float64).fill_null(float("nan")).to_numpy()
    has_gt, has_box = np.isfinite(g).all(1), np.isfinite(pred).all(1)
    iou = np.full(frame.height, np.nan)
    iou[has_gt] = 0.0
    both = has_gt & has_box
    if both.any():
        iou[both] = paired_iou(pred[both], g[both])
    return frame.with_columns(pl.Series("iou", iou, dtype=pl.Float64).fill_nan(None))


LABEL_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7)  # low ones too: a weak regressor predicts low IoUs


def label_quality(with_gt: pl.DataFrame, thresholds=LABEL_THRESHOLDS) -> dict:
    """"Keep only labels I can trust": the run's selected boxes kept where their predicted IoU
    (ACS-Learned's, else the normalised `confidence`) reaches each threshold. Per bucket: how many
    are kept, their precision (share with true IoU >= 0.5) and recall (correct kept labels over
    all queries of the bucket, failed ones included, so a strict filter pays in recall)."""
    import numpy as np

    from .metrics import ALL, BUCKETS

    by = "predicted_iou" if with_gt["predicted_iou"].drop_nulls().len() else "confidence"
    has_box = with_gt["x1"].is_not_null().to_numpy()
    iou = with_gt["iou"].cast(pl.Float64).fill_null(0.0).fill_nan(0.0).to_numpy()
    conf = with_gt[by].fill_null(-1.0).to_numpy().astype(float)  # no box / no score: never kept
    conf[~has_box] = -1.0
    bucket = with_gt["size_bucket"].fill_null("").to_numpy().astype(str)
    rows = []
    for t in thresholds:
        for name in (*BUCKETS, ALL):
            m = np.ones(len(bucket), bool) if name == ALL else bucket == name
            n = int(m.sum())
            kept = m & (conf >= t)
            correct = kept & (iou >= 0.5)
            rows.append({"threshold": t, "size_bucket": name, "n": n, "kept": int(kept.sum()),
                         "precision": float(correct.sum() / kept.sum()) if kept.any() else None,
                         "recall": float(correct.sum() / n) if n else None})
    return {"by": by, "rows": rows}


def format_label_quality(lq: dict) -> str:
    """Markdown: one row per threshold, kept / precision / recall per bucket."""
    from .metrics import ALL, BUCKETS

    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    cells = {(r["threshold"], r["size_bucket"]): r for r in lq["rows"]}
    head = [f"{lq['by']} >=", *(f"{b}: kept of n: precision P, recall R" for b in (*BUCKETS, ALL))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in dict.fromkeys(r["threshold"] for r in lq["rows"]):
        row = [f"{t:g}"]
        for b in (*BUCKETS, ALL):
            r = cells[(t, b)]
            row.append(f"{r['kept']} of {r['n']}: P {f(r['precision'])}, R {f(r['recall'])}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def evaluate_run(url: str, gt_json: str | None = None, storage_options: dict | None = None) -> dict:
    """Everything `acs evaluate` reports; JSON-serialisable."""
    import numpy as np

    from .metrics import coco_ap, pearson, reliability, selector_table, spearman, xyxy_to_xywh

    boxes, cands = load_tables(url, storage_options)
    if gt_json:
        boxes, cands = attach_gt(boxes, cands, gt_json, storage_options)
    out: dict = {"run": url, "queries": boxes.height, "candidates": cands.height,
                 "status": dict(boxes.group_by("status").len().iter_rows())}
    with_gt = boxes.filter(pl.col("gt_x1").is_not_null())
    out["queries_with_gt"] = with_gt.height
    if with_gt.height == 0:
        out["note"] = "no ground truth: pass --gt COCO_JSON to evaluate"
        return out
    rows = selector_rows(with_gt, cands)
    out["table"] = selector_table(rows)
    out["selectors"] = sorted(rows["selector"].unique().to_list())
    ok = cands.filter(pl.col("status") == "ok")
    # The regressor's quality, where one scored the run.
    if "score_acs_learned" in ok.columns and ok["score_acs_learned"].drop_nulls().drop_nans().len() > 1:
        v = ok.filter(pl.col("score_acs_learned").is_not_null() & pl.col("iou").is_not_null())
        p, t = v["score_acs_learned"].to_numpy(), v["iou"].to_numpy()
        rel = {k: ([None if not np.isfinite(x) else float(x) for x in v] if isinstance(v, np.ndarray) else v)
               for k, v in reliability(p, t).items()}  # eval.json holds numbers, not numpy reprs
        out["regressor"] = {"pearson": pearson(p, t), "spearman": spearman(p, t), "n": int(len(p)),
                            "reliability": rel}
    # No-box share of sampled candidates (diversity without garbage). Candidates adaptive K did
    # not sample (`skipped`) are neither boxes nor failures: they are left out, not counted as no-box.
    drawn = cands.filter((pl.col("cand_idx") > 0) & (pl.col("status") != "skipped"))
    out["no_box_share"] = {
        "greedy": float((cands.filter(pl.col("cand_idx") == 0)["status"] != "ok").mean()),
        "sampled": float((drawn["status"] != "ok").mean()) if drawn.height else None}
    # Sampling cost, so adaptive K's saving is read next to its accuracy: candidates actually
    # sampled per query (adaptive K marks the ones it did not need `skipped`).
    sampled = cands.filter(pl.col("cand_idx") > 0)
    if sampled.height:
        per_q = sampled.group_by("query_id").agg((pl.col("status") != "skipped").sum().alias("n"),
                                                 pl.len().alias("k"))
        out["sampling"] = {
            "sampled_per_query_max": int(per_q["k"].max()),
            "sampled_per_query_mean": float(per_q["n"].mean()),
            "skipped_share": float((sampled["status"] == "skipped").mean()),
            "queries_stopped_early": int((per_q["n"] < per_q["k"]).sum())}
    # COCO AP of the selected boxes, the confidence as score (auto-label quality).
    cat_ids = {c: i + 1 for i, c in enumerate(sorted(with_gt["category"].unique().to_list()))}
    img_ids = {c: i + 1 for i, c in enumerate(sorted(with_gt["image_id"].cast(pl.String).unique().to_list()))}
    det = with_gt.filter(pl.col("x1").is_not_null())
    gt_xyxy = with_gt.select("gt_x1", "gt_y1", "gt_x2", "gt_y2").to_numpy().astype(float)
    det_xyxy = det.select("x1", "y1", "x2", "y2").to_numpy().astype(float)
    out["coco_ap"] = coco_ap(
        xyxy_to_xywh(gt_xyxy), [img_ids[str(i)] for i in with_gt["image_id"]],
        [cat_ids[c] for c in with_gt["category"]], with_gt["gt_area"].to_numpy(),
        xyxy_to_xywh(det_xyxy) if det.height else np.zeros((0, 4)), [img_ids[str(i)] for i in det["image_id"]],
        [cat_ids[c] for c in det["category"]],
        det["confidence"].fill_null(0.0).to_numpy() if det.height else np.zeros(0))
    out["coco_ap"]["selector"] = boxes["selector"].drop_nulls()[0] if boxes.height else None
    out["label_quality"] = label_quality(with_gt)
    return out
