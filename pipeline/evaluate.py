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
    landing, why = _landing(url, boxes, cands, with_gt, rows, gt_json, storage_options)
    if landing:
        out["outcomes"] = landing
    else:
        out["outcomes_note"] = why
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


# ----------------------------------------------------------------- where the answers landed

def recorded_annotations(url: str, boxes: pl.DataFrame, storage_options: dict | None = None) -> str | None:
    """The COCO file a run was labelled from (`acs label --coco`): what its `_runs/RUN_ID.json`
    records, else the output's `_config.json` (written before the first shard, so a run that never
    finished has it too). None for runs labelled from a manifest or shards."""
    from .label import CONFIG_RECORD
    from .storage import SAFE_NAME, Output

    out = Output(url, storage_options)
    run_ids = sorted(boxes["run_id"].drop_nulls().unique().to_list()) if "run_id" in boxes.columns else []
    # Output refuses to write a record under any other name, so there is none to read.
    run_ids = [r for r in run_ids if SAFE_NAME.match(f"{r}.json")]
    records = [r for r in (out.read_json("_runs", f"{rid}.json") for rid in run_ids) if r]
    cocos = [(r.get("config") or {}).get("coco") for r in records]
    if not records:
        cocos = [(out.read_json(CONFIG_RECORD) or {}).get("coco")]
    # One output holds one configuration (`check_config_record` refuses another), so the runs agree.
    return next((c for c in cocos if c), None)


def image_objects(gt_json: str, storage_options: dict | None = None) -> tuple[dict, dict]:
    """Every annotation of a COCO file per image, as {image key: [(category, xyxy, iscrowd)]},
    keyed once by image id and once by file stem: the two keys `attach_gt` matches queries on."""
    from .inputs import _read_coco

    coco = _read_coco(gt_json, storage_options)
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    images = {im["id"]: im for im in coco["images"]}
    per_image: dict = {}
    for a in coco["annotations"]:
        if a["category_id"] not in cats or a["image_id"] not in images:
            continue  # `list_coco` makes these query_error rows; they name no object we can place
        x, y, w, h = a["bbox"]
        per_image.setdefault(a["image_id"], []).append((cats[a["category_id"]], (x, y, x + w, y + h),
                                                        bool(a.get("iscrowd", 0))))
    by_id = {str(i): objs for i, objs in per_image.items()}
    by_stem = {posixpath.splitext(posixpath.basename(images[i].get("file_name") or ""))[0]: objs
               for i, objs in per_image.items()}
    return by_id, by_stem


def query_objects(with_gt: pl.DataFrame, by_id: dict, by_stem: dict) -> dict[str, tuple]:
    """Per query with ground truth: (target xyxy, other instances of its category, objects of other
    categories), from every annotation of its image.

    The target is the image's one non-crowd annotation of the query's category that is the query's
    ground truth; a query without exactly that (its image is not in the file, or the file is not
    the one the run's ground truth came from) is left out. Crowd regions (iscrowd=1) are never a
    target, as in `list_coco`, but they are objects: an answer on a crowd of the query's category
    lands on "another instance"."""
    import numpy as np

    from .metrics import paired_iou

    out = {}
    for r in with_gt.select("query_id", "image_id", "image_uri", "category", "gt_x1", "gt_y1", "gt_x2",
                            "gt_y2").iter_rows(named=True):
        stem = posixpath.splitext(posixpath.basename((r["image_uri"] or "").split("#")[-1]))[0]
        objs = by_id.get(str(r["image_id"])) or by_stem.get(stem) or []
        gt = (r["gt_x1"], r["gt_y1"], r["gt_x2"], r["gt_y2"])
        targets = [i for i, (cat, _, crowd) in enumerate(objs) if cat == r["category"] and not crowd]
        if len(targets) != 1 or paired_iou([objs[targets[0]][1]], [gt])[0] < 0.9:
            continue
        t = targets[0]
        same = [box for i, (cat, box, _) in enumerate(objs) if i != t and cat == r["category"]]
        other = [box for cat, box, _ in objs if cat != r["category"]]
        out[r["query_id"]] = (gt, np.asarray(same, float).reshape(-1, 4), np.asarray(other, float).reshape(-1, 4))
    return out


def _outcome_rows(frame: pl.DataFrame, objects: dict, group: str, name_col: str | None, name: str | None) -> list:
    """`outcome_table` per name (per selector, or one name for a set of candidates), as flat rows:
    group, name, size_bucket, n, a count per outcome and `share` (None for an empty bucket)."""
    import numpy as np

    from .metrics import ALL, BUCKETS, OUTCOMES, _selector_order, answer_outcomes, outcome_table

    frame = frame.filter(pl.col("query_id").is_in(pl.Series(list(objects), dtype=pl.String).implode()))
    names = _selector_order(frame[name_col].to_list()) if name_col else [name]
    rows = []
    for nm in names:
        f = frame.filter(pl.col(name_col) == nm) if name_col else frame
        if f.height == 0:
            continue
        pred = f.select("x1", "y1", "x2", "y2").cast(pl.Float64).fill_null(float("nan")).to_numpy()
        q = [objects[qid] for qid in f["query_id"]]
        oc = answer_outcomes(pred, np.array([x[0] for x in q], float), [x[2] for x in q], [x[1] for x in q])
        table = outcome_table(oc, f["size_bucket"].to_numpy().astype(str))
        for b in (*BUCKETS, ALL):
            c = table[b]
            rows.append({"group": group, "name": nm, "size_bucket": b, **c,
                         "share": {o: (c[o] / c["n"] if c["n"] else None) for o in OUTCOMES}})
    return rows


def _landing(url, boxes, cands, with_gt, sel_rows, gt_json, storage_options) -> tuple[dict | None, str | None]:
    """`answer_landing` against the COCO file passed (--gt) or the one the run was labelled from;
    else (None, why in one line). Only a COCO file holds every object of an image: a manifest's or
    a shard's ground truth names the target alone, and "the answer boxed another object" cannot be
    told from "it boxed nothing"."""
    from .inputs import InputError

    ann = gt_json or recorded_annotations(url, boxes, storage_options)
    if ann is None:
        return None, "needs every object of each image: the run records no --coco file; pass --gt COCO_JSON"
    unreadable: tuple[type[BaseException], ...] = (OSError, InputError)
    try:  # s3fs raises most faults as OSError, but missing credentials as botocore's own error
        from botocore.exceptions import BotoCoreError

        unreadable += (BotoCoreError,)
    except ImportError:
        pass
    try:
        landing = answer_landing(with_gt, cands, sel_rows, ann, storage_options)
    except unreadable as e:  # the run's recorded file moved, went or is out of reach: the rest stands
        return None, f"{ann} could not be read ({type(e).__name__}: {e}); pass --gt COCO_JSON"
    if landing["queries"] == 0:
        return None, f"no query with ground truth matched an image and category of {ann}"
    landing["source"] = "--gt" if gt_json else "the run's --coco"
    return landing, None


def answer_landing(boxes: pl.DataFrame, cands: pl.DataFrame, sel_rows: pl.DataFrame, gt_json: str,
                   storage_options: dict | None = None) -> dict:
    """Where each answer landed among all the objects of its image (`metrics.answer_outcomes`): for
    every selector's chosen box (`sel_rows`, as `selector_rows` builds them), for greedy's candidate
    (cand 0) and for all sampled candidates (cand > 0). A selector that chose nothing and a failed
    candidate have no box: `no_box`, kept in the denominator like their IoU of 0. Candidates adaptive
    K did not sample (`skipped`) are left out, as in the no-box share."""
    by_id, by_stem = image_objects(gt_json, storage_options)
    with_gt = boxes.filter(pl.col("gt_x1").is_not_null() & pl.col("size_bucket").is_not_null())
    objects = query_objects(with_gt, by_id, by_stem)
    buckets = with_gt.select("query_id", "size_bucket")
    chosen = sel_rows.select("query_id", "selector", "size_bucket", "cand_idx").join(
        cands.select("query_id", "cand_idx", "x1", "y1", "x2", "y2"), on=["query_id", "cand_idx"], how="left")
    drawn = cands.filter(pl.col("status") != "skipped").join(buckets, on="query_id", how="inner")
    rows = (_outcome_rows(chosen, objects, "selected", "selector", None)
            + _outcome_rows(drawn.filter(pl.col("cand_idx") == 0), objects, "candidates", None, "greedy")
            + _outcome_rows(drawn.filter(pl.col("cand_idx") > 0), objects, "candidates", None, "sampled"))
    return {"annotations": gt_json, "queries": len(objects), "queries_left_out": with_gt.height - len(objects),
            "rows": rows}


OUTCOME_HEADERS = {"right": "right", "other_instance": "other instance", "other_object": "other object",
                   "near": "near", "nowhere": "nowhere", "no_box": "no box"}
CANDIDATE_ROWS = {"greedy": "cand 0 (greedy)", "sampled": "cands 1..N (sampled)"}


def outcome_row_name(r: dict) -> str:
    """A row's label: the selector, or which candidates (cand 0 is not the greedy selector's choice:
    that one falls back to the first candidate with a box)."""
    return CANDIDATE_ROWS.get(r["name"], r["name"]) if r["group"] == "candidates" else r["name"]


def format_outcomes(landing: dict) -> str:
    """Markdown: a line saying what is counted, then one table per size bucket: a row per selector
    (its chosen boxes) and per candidate set, "count (share)" per outcome."""
    from .metrics import ALL, BUCKETS, NEAR_IOU, OTHER_IOU, OUTCOMES, RIGHT_IOU

    lines = [f"Where the answers landed among all objects of their image ({landing['annotations']}, from "
             f"{landing['source']}; {landing['queries']} queries, {landing['queries_left_out']} without a match "
             f"left out), first that holds: right = IoU >= {RIGHT_IOU} with the target; other instance / other "
             f"object = IoU >= {OTHER_IOU} with another object of the query's category / of another category; "
             f"near = IoU >= {NEAR_IOU} with the target; nowhere; no box = no parseable box."]
    head = ["answers", "n", *(OUTCOME_HEADERS[o] for o in OUTCOMES)]
    for b in (*BUCKETS, ALL):
        rows = [r for r in landing["rows"] if r["size_bucket"] == b]
        n_q = max((r["n"] for r in rows if r["group"] == "selected"), default=0)
        if not any(r["n"] for r in rows):
            lines += ["", f"{b}: no queries"]
            continue
        # A zero is printed bare, so the outcomes that do occur stand out.
        body = [[outcome_row_name(r), str(r["n"]),
                 *(("-" if not r["n"] else f"{r[o]} ({r['share'][o]:.1%})" if r[o] else "0") for o in OUTCOMES)]
                for r in rows]
        widths = [max(3, *(len(x[i]) for x in [head, *body])) for i in range(len(head))]

        def render(row: list[str]) -> str:
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
            return "| " + " | ".join(cells) + " |"

        sep = "| " + " | ".join(["-" * widths[0]] + ["-" * (w - 1) + ":" for w in widths[1:]]) + " |"
        lines += ["", f"{b} ({n_q} quer{'y' if n_q == 1 else 'ies'})", "", render(head), sep, *map(render, body)]
    return "\n".join(lines)
