"""Evaluation metrics: box IoU, COCO size buckets, Acc@0.5 / mIoU tables, COCO AP,
rank correlations and calibration.

Boxes are float xyxy in original-image pixels unless a name says xywh. A candidate
without a parseable box is a row of NaNs; it has IoU 0 with everything, so it
counts as a miss rather than being dropped.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

BUCKETS: tuple[str, str, str] = ("small", "medium", "large")
SMALL_MAX = 32**2
MEDIUM_MAX = 96**2
ALL = "all"

ArrayLike = Any  # anything np.asarray accepts


# --------------------------------------------------------------------------- boxes


def xywh_to_xyxy(boxes: ArrayLike) -> np.ndarray:
    """(..., 4) xywh -> (..., 4) xyxy, as float64."""
    b = np.asarray(boxes, dtype=np.float64)
    return np.concatenate([b[..., :2], b[..., :2] + b[..., 2:4]], axis=-1)


def xyxy_to_xywh(boxes: ArrayLike) -> np.ndarray:
    """(..., 4) xyxy -> (..., 4) xywh, as float64."""
    b = np.asarray(boxes, dtype=np.float64)
    return np.concatenate([b[..., :2], b[..., 2:4] - b[..., :2]], axis=-1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of broadcastable (..., 4) xyxy arrays; 0 where undefined (NaN box, zero union)."""
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.clip(iw, 0.0, None) * np.clip(ih, 0.0, None)
    # Inverted boxes (x2 < x1) get area 0 instead of a negative area that would
    # shrink the union.
    area_a = np.clip(a[..., 2] - a[..., 0], 0.0, None) * np.clip(a[..., 3] - a[..., 1], 0.0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0.0, None) * np.clip(b[..., 3] - b[..., 1], 0.0, None)
    union = area_a + area_b - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    # NaN comparisons are False, so NaN boxes and 0/0 both land on 0.
    return np.where(union > 0, iou, 0.0)


def _as_boxes(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1, 4)


def box_iou(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Pairwise IoU: a (N, 4), b (M, 4) xyxy -> (N, M). NaN or zero-union pairs give 0."""
    a, b = _as_boxes(a), _as_boxes(b)
    return _iou(a[:, None, :], b[None, :, :])


def paired_iou(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Row-wise IoU of two (N, 4) xyxy arrays -> (N,)."""
    a, b = _as_boxes(a), _as_boxes(b)
    if a.shape != b.shape:
        raise ValueError(f"paired_iou needs equal shapes, got {a.shape} and {b.shape}")
    return _iou(a, b)


# ----------------------------------------------------------------------- size buckets


def size_bucket(area: ArrayLike) -> np.ndarray | str:
    """COCO size bucket of ground-truth areas: small [0, 32^2), medium [32^2, 96^2),
    large [96^2, inf).

    Array in -> array of str of the same shape; a scalar in -> a plain str.
    NaN or negative areas raise ValueError: ground truth always has an area.
    """
    a = np.asarray(area, dtype=np.float64)
    if np.any(~(a >= 0)):
        raise ValueError("size_bucket needs finite, non-negative areas")
    out = np.where(a < SMALL_MAX, BUCKETS[0], np.where(a < MEDIUM_MAX, BUCKETS[1], BUCKETS[2]))
    return str(out) if out.ndim == 0 else out


def bucket_of_box_xyxy(boxes: ArrayLike) -> np.ndarray | str:
    """Size bucket from xyxy boxes using w*h (use `size_bucket(ann['area'])` when COCO gives one)."""
    b = np.asarray(boxes, dtype=np.float64)
    return size_bucket((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]))


# ------------------------------------------------------------------ where an answer landed

# What an answer boxed, read against every object of its image: the target (right), another
# object (the model found *an* object but not the one asked for), near the target (found it,
# mislocalised), or nothing. On data whose ground truth holds every object of an image (COCO, the
# synthetic scenes), this separates a binding failure from a localisation failure.
OUTCOMES: tuple[str, ...] = ("right", "other_instance", "other_object", "near", "nowhere", "no_box")
RIGHT_IOU = 0.5  # Acc@0.5's threshold
OTHER_IOU = 0.3  # sits on another object: clearly boxing it, though not tightly
NEAR_IOU = 0.1  # overlaps the target: found it, badly localised


def answer_outcomes(pred: ArrayLike, target: ArrayLike, others: Sequence[ArrayLike],
                    others_same_category: Sequence[ArrayLike] | None = None) -> np.ndarray:
    """One of `OUTCOMES` per answer, in priority order: `right` (IoU >= 0.5 with the target);
    `other_instance` / `other_object` (IoU >= 0.3 with another object of the image of the query's
    category / of another category); `near` (IoU 0.1-0.5 with the target); `nowhere`; `no_box`
    (NaN box).

    pred, target: (N, 4) xyxy. others[i]: (K_i, 4) xyxy boxes of the image's other objects of
    other categories; others_same_category[i] (optional): other instances of the query's category.
    """
    pred, target = _as_boxes(pred), _as_boxes(target)
    n = pred.shape[0]
    if target.shape != pred.shape or len(others) != n or (others_same_category is not None
                                                           and len(others_same_category) != n):
        raise ValueError(f"answer_outcomes: {n} answers need {n} targets and {n} lists of other objects")
    same = others_same_category if others_same_category is not None else [()] * n
    t_iou = paired_iou(pred, target)
    # Best IoU with any other object, all answers at once: the other objects flattened, each tagged
    # with its answer's row (a per-row loop costs ~0.1 ms an answer, a minute on COCO val).
    same_best, other_best = _best_iou_per_row(pred, same), _best_iou_per_row(pred, others)
    has_box = np.isfinite(pred).all(1)
    out = np.full(n, "nowhere", dtype=object)
    # Lowest priority first, so each later assignment overrides.
    out[t_iou >= NEAR_IOU] = "near"
    out[other_best >= OTHER_IOU] = "other_object"
    out[same_best >= OTHER_IOU] = "other_instance"
    out[t_iou >= RIGHT_IOU] = "right"
    out[~has_box] = "no_box"
    return out.astype(str)


def _best_iou_per_row(pred: np.ndarray, groups: Sequence[ArrayLike]) -> np.ndarray:
    boxes = [np.asarray(g, dtype=np.float64).reshape(-1, 4) for g in groups]
    rows = np.repeat(np.arange(len(boxes)), [b.shape[0] for b in boxes])
    best = np.zeros(len(boxes))
    if rows.size:
        ious = _iou(pred[rows], np.concatenate(boxes))
        np.maximum.at(best, rows, np.nan_to_num(ious, nan=0.0))
    return best


def outcome_table(outcomes: ArrayLike, buckets: ArrayLike) -> dict[str, dict[str, int]]:
    """{bucket: {outcome: count, ..., "n": total}} for small, medium, large and "all"."""
    oc = np.asarray(outcomes).astype(str).ravel()
    bk = np.asarray(buckets).astype(str).ravel()
    if oc.shape != bk.shape:
        raise ValueError(f"{oc.size} outcomes but {bk.size} buckets")
    out = {}
    for name in (*BUCKETS, ALL):
        sel = oc if name == ALL else oc[bk == name]
        out[name] = {o: int((sel == o).sum()) for o in OUTCOMES} | {"n": int(sel.size)}
    return out


# ------------------------------------------------------------------ accuracy tables


def _clean_ious(ious: ArrayLike) -> np.ndarray:
    # NaN IoU means "no box": a miss with IoU 0, never excluded from the denominator.
    return np.nan_to_num(np.asarray(ious, dtype=np.float64).ravel(), nan=0.0)


def accuracy_at(ious: ArrayLike, thr: float = 0.5) -> float:
    """Share of IoUs >= thr (NaN counts as a miss); NaN for no input."""
    x = _clean_ious(ious)
    return float(np.mean(x >= thr)) if x.size else math.nan


def _stats(x: np.ndarray) -> dict[str, float | int]:
    if x.size == 0:
        return {"n": 0, "acc50": math.nan, "miou": math.nan}
    return {"n": int(x.size), "acc50": float(np.mean(x >= 0.5)), "miou": float(np.mean(x))}


def summarize(ious: ArrayLike, buckets: ArrayLike) -> dict[str, dict[str, float | int]]:
    """{bucket: {"n", "acc50", "miou"}} for small, medium, large and "all".

    Rates are NaN for an empty bucket. NaN IoUs count as 0.
    """
    x = _clean_ious(ious)
    bk = np.asarray(buckets).astype(str).ravel()
    if bk.shape != x.shape:
        raise ValueError(f"{x.size} ious but {bk.size} buckets")
    out = {name: _stats(x[bk == name]) for name in BUCKETS}
    out[ALL] = _stats(x)
    return out


def relative_gain(method: float, greedy: float) -> float:
    """(method - greedy) / greedy; NaN when greedy is 0 or either side is missing."""
    if method is None or greedy is None:
        return math.nan
    m, g = float(method), float(greedy)
    if g == 0 or math.isnan(g) or math.isnan(m):
        return math.nan
    return (m - g) / g


BOOT_SAMPLES = 2000
BOOT_SEED = 0  # fixed: the same run gives the same intervals every time it is evaluated
BOOT_MAX_RESAMPLED = 20_000  # queries up to which the mIoU difference is resampled query by query


def paired_bootstrap(method_iou: ArrayLike, greedy_iou: ArrayLike, thr: float = 0.5,
                     n_boot: int = BOOT_SAMPLES, seed: int = BOOT_SEED, level: float = 0.95) -> dict[str, Any]:
    """A selector against greedy on the same queries: percentile intervals from resampling
    queries (both selectors' IoUs of a query move together, so query difficulty cancels).

    Returns n, won / lost (queries the method hits at `thr` and greedy misses, and the reverse),
    the Acc@thr difference with its interval (`acc_diff`, `acc_diff_ci`), the relative gain's
    interval (`gain_ci`; None when some resample has greedy at 0, where it is unbounded), the
    mIoU difference's interval (`miou_diff_ci`), and `verdict`: "better" / "worse" when the
    Acc@thr interval excludes 0, else "no measurable difference".
    """
    m, g = _clean_ious(method_iou), _clean_ious(greedy_iou)
    if m.shape != g.shape:
        raise ValueError(f"paired bootstrap needs the same queries: {m.size} vs {g.size} IoUs")
    n = int(m.size)
    if n == 0:
        return {"n": 0, "won": 0, "lost": 0, "acc_diff": math.nan, "acc_diff_ci": None, "gain_ci": None,
                "miou_diff_ci": None, "verdict": "no measurable difference"}
    hm, hg = (m >= thr), (g >= thr)
    rng = np.random.default_rng(seed)
    # Accuracy depends only on how many resampled queries fall in each (method hit, greedy hit)
    # cell, so the bootstrap draws those four counts: exact, and O(n_boot) at any n (a labelling
    # run's summary may pair millions of queries).
    cells = np.array([(~hm & ~hg).sum(), (~hm & hg).sum(), (hm & ~hg).sum(), (hm & hg).sum()], np.float64)
    counts = rng.multinomial(n, cells / n, size=n_boot)  # (B, 4): 00, 01 (lost), 10 (won), 11
    am, ag = (counts[:, 2] + counts[:, 3]) / n, (counts[:, 1] + counts[:, 3]) / n
    d = m - g
    if n <= BOOT_MAX_RESAMPLED:
        dmiou = np.stack([d[rng.integers(0, n, n)].mean() for _ in range(n_boot)])
    else:  # past that, the mean IoU difference is normal to well within the percentile's own noise
        dmiou = d.mean() + d.std(ddof=1) / math.sqrt(n) * rng.standard_normal(n_boot)
    lo_q, hi_q = 50 * (1 - level), 50 * (1 + level)

    def ci(x: np.ndarray) -> list[float]:
        return [float(np.percentile(x, lo_q)), float(np.percentile(x, hi_q))]

    diff = am - ag
    d_ci = ci(diff)
    gain_ci = ci((am - ag) / ag) if np.all(ag > 0) else None
    verdict = "better" if d_ci[0] > 0 else "worse" if d_ci[1] < 0 else "no measurable difference"
    return {"n": n, "won": int(cells[2]), "lost": int(cells[1]),
            "acc_diff": float(hm.mean() - hg.mean()), "acc_diff_ci": d_ci, "gain_ci": gain_ci,
            "miou_diff_ci": ci(dmiou), "verdict": verdict}


def _selector_order(names: Iterable[str]) -> list[str]:
    """greedy first, oracle last, the rest in first-seen order."""
    seen = list(dict.fromkeys(names))
    middle = [s for s in seen if s not in ("greedy", "oracle")]
    return [s for s in ("greedy",) if s in seen] + middle + [s for s in ("oracle",) if s in seen]


def selector_table(rows: Any) -> list[dict[str, Any]]:
    """Per (selector, bucket) accuracy with gains against the `greedy` selector.

    `rows` is a polars DataFrame or an iterable of mappings with `selector`,
    `size_bucket` (one of BUCKETS) and `iou` (null/NaN = missing box = 0).
    Returns, for every selector (greedy first, oracle last) and every bucket in
    (small, medium, large, all), a dict with keys selector, size_bucket, n, acc50,
    miou, gain_acc50_vs_greedy, gain_miou_vs_greedy. Gains are None when there is
    no greedy selector, NaN when greedy's number is 0 or its bucket is empty.

    With a `query_id` column the gains are paired: each non-greedy row also has `vs_greedy`,
    the `paired_bootstrap` of its queries against greedy's IoUs on the same queries (None for
    greedy itself, or when the selector lacks some of greedy's queries).
    """
    import polars as pl

    df = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(list(rows))
    if df.height == 0:
        return []
    paired = "query_id" in df.columns
    df = df.select(
        pl.col("selector").cast(pl.Utf8),
        pl.col("size_bucket").cast(pl.Utf8),
        pl.col("iou").cast(pl.Float64).fill_nan(0.0).fill_null(0.0),
        *([pl.col("query_id").cast(pl.Utf8)] if paired else []),
    )
    bad = set(df["size_bucket"].unique().to_list()) - set(BUCKETS)
    if bad:
        raise ValueError(f"unknown size buckets {sorted(map(str, bad))}")

    aggs = [
        pl.len().alias("n"),
        (pl.col("iou") >= 0.5).mean().alias("acc50"),
        pl.col("iou").mean().alias("miou"),
    ]
    per_bucket = df.group_by("selector", "size_bucket").agg(aggs)
    overall = df.group_by("selector").agg(aggs).with_columns(pl.lit(ALL).alias("size_bucket"))
    found = {
        (r["selector"], r["size_bucket"]): r
        for r in pl.concat([per_bucket, overall], how="diagonal").iter_rows(named=True)
    }

    selectors = _selector_order(df["selector"].to_list())
    has_greedy = "greedy" in selectors
    empty = {"n": 0, "acc50": math.nan, "miou": math.nan}
    vs_greedy = _paired_vs_greedy(df, selectors) if paired and has_greedy else {}
    out = []
    for sel in selectors:
        for bucket in (*BUCKETS, ALL):
            r = found.get((sel, bucket), empty)
            g = found.get(("greedy", bucket), empty)
            extra = {"vs_greedy": vs_greedy.get((sel, bucket))} if paired else {}
            out.append(
                {
                    **extra,
                    "selector": sel,
                    "size_bucket": bucket,
                    "n": int(r["n"]),
                    "acc50": float(r["acc50"]),
                    "miou": float(r["miou"]),
                    "gain_acc50_vs_greedy": relative_gain(r["acc50"], g["acc50"]) if has_greedy else None,
                    "gain_miou_vs_greedy": relative_gain(r["miou"], g["miou"]) if has_greedy else None,
                }
            )
    return out


def _paired_vs_greedy(df: Any, selectors: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    import polars as pl

    g = df.filter(pl.col("selector") == "greedy").select("query_id", "size_bucket", pl.col("iou").alias("g"))
    out = {}
    for sel in selectors:
        if sel == "greedy":
            continue
        j = g.join(df.filter(pl.col("selector") == sel).select("query_id", "iou"), on="query_id", how="left")
        if j["iou"].null_count():
            continue  # not the same queries: a paired interval would mean nothing
        for bucket in (*BUCKETS, ALL):
            b = j if bucket == ALL else j.filter(pl.col("size_bucket") == bucket)
            if b.height:
                out[(sel, bucket)] = paired_bootstrap(b["iou"].to_numpy(), b["g"].to_numpy())
    return out


def gain_text(r: Mapping[str, Any]) -> str:
    """A table cell: the relative Acc@0.5 gain with its paired 95% interval and queries won / lost,
    or "no measurable difference" where the interval of the difference crosses zero."""
    gain, vs = r.get("gain_acc50_vs_greedy"), r.get("vs_greedy")
    if r.get("selector") == "greedy" or vs is None:
        return _fmt(gain, "+.1%")
    won_lost = f"{vs['won']}/{vs['lost']}"
    if vs["verdict"] == "no measurable difference":
        return f"no measurable difference ({_fmt(gain, '+.1%')}, {won_lost})"
    ci = vs["gain_ci"]
    interval = f"[{ci[0]:+.0%}, {ci[1]:+.0%}]" if ci else f"[{vs['acc_diff_ci'][0]:+.3f}, {vs['acc_diff_ci'][1]:+.3f} abs]"
    return f"{_fmt(gain, '+.1%')} {interval}, {won_lost}"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or math.isnan(x) else format(x, spec)


def format_table(table_rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown pipe table of `selector_table` output, padded to fixed width.

    One row per selector (greedy first, oracle last); one "Acc@0.5 / mIoU" column
    per bucket and for all, then the relative Acc@0.5 gains vs greedy on small objects and on
    all (`gain_text`: with their paired intervals where the rows had query ids). Missing
    numbers print as "-".
    """
    cells = {(r["selector"], r["size_bucket"]): r for r in table_rows}
    header = ["selector", *(f"{b} Acc@0.5 / mIoU" for b in (*BUCKETS, ALL)), "small Acc@0.5 gain vs greedy",
              "all Acc@0.5 gain vs greedy"]
    body = []
    for sel in _selector_order(r["selector"] for r in table_rows):
        line = [sel]
        for b in (*BUCKETS, ALL):
            r = cells.get((sel, b))
            line.append("-" if r is None else f"{_fmt(r['acc50'], '.3f')} / {_fmt(r['miou'], '.3f')}")
        for b in ("small", ALL):
            c = cells.get((sel, b))
            line.append("-" if c is None else gain_text(c))
        body.append(line)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        # Left-align the name, right-align numbers so decimals line up.
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "| " + " | ".join(parts) + " |"

    sep = "| " + " | ".join(["-" * widths[0]] + ["-" * (w - 1) + ":" for w in widths[1:]]) + " |"
    return "\n".join([render(header), sep, *map(render, body)])


# -------------------------------------------------------------------------- COCO AP

_AP_KEYS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


def coco_ap(
    gt_boxes_xywh: ArrayLike,
    gt_image_ids: ArrayLike,
    gt_category_ids: ArrayLike,
    gt_areas: ArrayLike | None,
    det_boxes_xywh: ArrayLike,
    det_image_ids: ArrayLike,
    det_category_ids: ArrayLike,
    det_scores: ArrayLike,
) -> dict[str, float]:
    """COCO bbox AP (COCOeval.stats[0:6]) from in-memory arrays.

    `gt_areas` may be None, and NaN entries fall back to w*h. pycocotools' -1
    ("no ground truth in this area range") is returned as NaN, and everything is
    NaN when there is no ground truth. With no detections the evaluation still
    runs, so every range that has ground truth gets 0.0. Note that COCOeval's
    area ranges are closed at both ends, unlike `size_bucket`; at most 100
    detections per image count, as in COCO.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_boxes = np.asarray(gt_boxes_xywh, dtype=np.float64).reshape(-1, 4)
    n_gt = len(gt_boxes)
    if n_gt == 0:
        return {k: math.nan for k in _AP_KEYS}
    gt_img = np.asarray(gt_image_ids).astype(np.int64).ravel()
    gt_cat = np.asarray(gt_category_ids).astype(np.int64).ravel()
    wh_area = gt_boxes[:, 2] * gt_boxes[:, 3]
    areas = wh_area if gt_areas is None else np.asarray(gt_areas, dtype=np.float64).ravel()
    areas = np.where(np.isnan(areas), wh_area, areas)

    det_boxes = np.asarray(det_boxes_xywh, dtype=np.float64).reshape(-1, 4)
    det_img = np.asarray(det_image_ids).astype(np.int64).ravel()
    det_cat = np.asarray(det_category_ids).astype(np.int64).ravel()
    scores = np.asarray(det_scores, dtype=np.float64).ravel()
    if not (len(gt_img) == len(gt_cat) == len(areas) == n_gt):
        raise ValueError("ground-truth arrays differ in length")
    if not (len(det_img) == len(det_cat) == len(scores) == len(det_boxes)):
        raise ValueError("detection arrays differ in length")

    image_ids = sorted(set(gt_img.tolist()) | set(det_img.tolist()))
    cat_ids = sorted(set(gt_cat.tolist()) | set(det_cat.tolist()))
    base = {
        "images": [{"id": i} for i in image_ids],
        "categories": [{"id": c, "name": str(c)} for c in cat_ids],
    }

    def make(annotations: list[dict]) -> COCO:
        c = COCO()
        c.dataset = {**base, "annotations": annotations}
        c.createIndex()
        return c

    # Annotation ids start at 1: COCOeval uses id 0 to mean "unmatched".
    gt_anns = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": a, "iscrowd": 0}
        for k, (i, c, b, a) in enumerate(zip(gt_img.tolist(), gt_cat.tolist(), gt_boxes.tolist(), areas.tolist()))
    ]
    dt_anns = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "score": s, "iscrowd": 0}
        for k, (i, c, b, s) in enumerate(zip(det_img.tolist(), det_cat.tolist(), det_boxes.tolist(), scores.tolist()))
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        # Built directly rather than via loadRes, which fails on an empty list.
        ev = COCOeval(make(gt_anns), make(dt_anns), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (math.nan if v < 0 else float(v)) for k, v in zip(_AP_KEYS, ev.stats[:6])}


# ---------------------------------------------------------------- rank correlations


def _finite_pairs(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"lengths differ: {x.size} vs {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / den if den > 0 else math.nan


def rankdata(x: ArrayLike) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy's 'average')."""
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    block = np.cumsum(new) - 1
    starts = np.r_[np.flatnonzero(new), x.size]
    avg = 0.5 * (starts[:-1] + starts[1:] - 1) + 1  # mean of 1-based positions in each tie block
    ranks = np.empty(x.size)
    ranks[order] = avg[block]
    return ranks


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson r over finite pairs; NaN for < 2 pairs or a constant side."""
    return _pearson(*_finite_pairs(x, y))


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rho (Pearson of average ranks) over finite pairs; NaN as for pearson."""
    x, y = _finite_pairs(x, y)
    return _pearson(rankdata(x), rankdata(y))


def _group_ranks(key: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks of `key` within each group (group = dense ints), plus each
    group's number of distinct key values."""
    order = np.lexsort((key, group))
    k, g = key[order], group[order]
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_block = new_group | np.r_[True, k[1:] != k[:-1]]
    pos = np.arange(k.size) - np.maximum.accumulate(np.where(new_group, np.arange(k.size), 0))
    block = np.cumsum(new_block) - 1
    avg = np.bincount(block, weights=pos + 1.0) / np.bincount(block)
    ranks = np.empty(k.size)
    ranks[order] = avg[block]
    n_distinct = np.bincount(g, weights=new_block, minlength=int(group.max()) + 1)
    return ranks, n_distinct


def mean_within_group_spearman(values: ArrayLike, targets: ArrayLike, groups: ArrayLike) -> float:
    """Mean over groups of Spearman(values, targets) computed within each group.

    Only groups with >= 2 members and >= 2 distinct targets count (others have no
    order to recover). A group whose values are all equal scores 0, not NaN: a
    head that cannot tell candidates apart should not be rewarded by dropping
    the groups it fails on. Non-finite value/target pairs are dropped first.
    NaN when no group qualifies. Vectorised, so it is cheap per attention head.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    t = np.asarray(targets, dtype=np.float64).ravel()
    g_raw = np.asarray(groups).ravel()
    if not (v.size == t.size == g_raw.size):
        raise ValueError("values, targets and groups must have equal lengths")
    ok = np.isfinite(v) & np.isfinite(t)
    if not ok.any():
        return math.nan
    v, t = v[ok], t[ok]
    _, g = np.unique(g_raw[ok], return_inverse=True)
    g = g.ravel()
    rv, nv = _group_ranks(v, g)
    rt, nt = _group_ranks(t, g)

    def gsum(w: np.ndarray) -> np.ndarray:
        return np.bincount(g, weights=w, minlength=nt.size)

    n = gsum(np.ones_like(rv))
    sv, st = gsum(rv), gsum(rt)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = gsum(rv * rt) - sv * st / n
        var_v = gsum(rv * rv) - sv * sv / n
        var_t = gsum(rt * rt) - st * st / n
        rho = cov / np.sqrt(var_v * var_t)
    rho = np.where(nv >= 2, rho, 0.0)
    qualifies = (n >= 2) & (nt >= 2)
    return float(np.mean(np.clip(rho[qualifies], -1.0, 1.0))) if qualifies.any() else math.nan


# ---------------------------------------------------------------------- calibration


def reliability(pred: ArrayLike, target: ArrayLike, n_bins: int = 10) -> dict[str, Any]:
    """Reliability diagram for predicted IoU.

    Predictions are clipped to [0, 1] and put in `n_bins` equal-width bins (the
    last bin includes 1.0). Returns bin_edges (n_bins + 1,), mean_pred and
    mean_target (n_bins,; NaN for empty bins), count (n_bins,) and
    ece = sum_b count_b * |mean_pred_b - mean_target_b| / total (NaN if no data).
    Non-finite pairs are dropped.
    """
    p, t = _finite_pairs(pred, target)
    p = np.clip(p, 0.0, 1.0)
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(idx, weights=p, minlength=n_bins) / count
        mean_target = np.bincount(idx, weights=t, minlength=n_bins) / count
    gap = np.abs(mean_pred - mean_target)
    ece = float(np.sum(count[count > 0] * gap[count > 0]) / count.sum()) if count.sum() else math.nan
    return {
        "bin_edges": np.linspace(0.0, 1.0, n_bins + 1),
        "mean_pred": mean_pred,
        "mean_target": mean_target,
        "count": count,
        "ece": ece,
    }
