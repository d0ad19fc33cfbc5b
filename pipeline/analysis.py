"""The paper's analyses of a labelled run, as numbers (the report draws them, `acs report --markdown`
writes them as tables for docs/results.md):

- ACS-Free as its head set grows: heads ranked on calib (the head profile's within-query Spearman
  per head), the top k used on this run, k = 1, 2, 4, ... all. The paper's claim is that a handful
  of heads carries the signal, so the curve should peak early and sag as weak heads join.
- Which layers and heads the regressor relies on: mean absolute input gradient of its prediction
  with respect to each (layer, head)'s maps, on this run's candidates (fitting stays on train/calib;
  reading a trained regressor's gradients on test is analysis, not tuning).
- Entropy by layer for high-, low- and zero-IoU candidates is `calibrate.layer_curves`.
- How large the chosen box is against the object (median area ratio per selector and bucket): a
  selector whose score prefers large boxes wins on large objects and loses on small ones, which a
  per-bucket accuracy table shows only as its effect.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from .metrics import ALL, BUCKETS, mean_within_group_spearman


def head_counts(n_heads: int) -> list[int]:
    ks, k = [], 1
    while k < n_heads:
        ks.append(k)
        k *= 2
    return ks + [n_heads]


def head_count_curve(frame: pl.DataFrame, ent: np.ndarray, ranking: np.ndarray, queries: pl.DataFrame,
                     ks: list[int] | None = None) -> list[dict]:
    """ACS-Free with the top-k heads of `ranking` (L, H; higher is better, NaN never chosen).

    `frame` (query_id, cand_idx, iou) describes the rows of `ent` (M, 4, L, H): candidates with a box.
    `queries` (query_id, size_bucket) lists every query with ground truth, the denominator: a query
    none of whose candidates is in `frame` is a miss. Per k: Acc@0.5 per bucket and the mean
    within-query Spearman of -entropy with IoU (how well those heads order candidates)."""
    m = ent.mean(1).reshape(len(frame), -1)  # over the 4 coordinates: (M, L*H)
    flat = ranking.ravel()
    order = [int(i) for i in np.argsort(-np.where(np.isfinite(flat), flat, -np.inf)) if np.isfinite(flat[i])]
    ks = [k for k in (ks or head_counts(len(order))) if 1 <= k <= len(order)]
    csum = np.cumsum(m[:, order], 1)
    qid, iou = frame["query_id"].to_numpy(), frame["iou"].to_numpy()
    out = []
    for k in ks:
        score = -csum[:, k - 1] / k
        chosen = (pl.DataFrame({"query_id": qid, "cand_idx": frame["cand_idx"].to_numpy(), "score": score,
                                "iou": iou})
                  .sort(["query_id", "score", "cand_idx"], descending=[False, True, False])
                  .group_by("query_id", maintain_order=True).first())
        per_q = queries.join(chosen.select("query_id", "iou"), on="query_id", how="left").with_columns(
            pl.col("iou").fill_null(0.0))
        row = {"k": k, "spearman": mean_within_group_spearman(score, iou, qid)}
        for b in (*BUCKETS, ALL):
            sub = per_q if b == ALL else per_q.filter(pl.col("size_bucket") == b)
            row[b] = float((sub["iou"] >= 0.5).mean()) if sub.height else None
            row[f"n_{b}"] = sub.height
        out.append(row)
    return out


def ranking_from_profile(meta: dict, layers: list[int], heads: list[int]) -> np.ndarray | None:
    """The calib ranking a profile made by `acs calibrate` keeps, on this run's (layers, heads) grid."""
    rho = meta.get("spearman_by_head")
    if rho is None or meta.get("layers") is None or meta.get("heads") is None:
        return None
    rho = np.asarray(rho, np.float64)
    out = np.full((len(layers), len(heads)), np.nan)
    li, hi = {l: i for i, l in enumerate(meta["layers"])}, {h: i for i, h in enumerate(meta["heads"])}
    for a, l in enumerate(layers):
        for b, h in enumerate(heads):
            if l in li and h in hi:
                out[a, b] = rho[li[l], hi[h]]
    return out


def regressor_saliency(url: str, regressor_dir: str, storage_options: dict | None = None,
                       max_rows: int | None = None) -> tuple[np.ndarray, list[int], list[int]]:
    """(L, H) mean |d prediction / d map| over the run's candidates with pooled maps (the first
    `max_rows` if given: the mean settles long before a large run's end), normalised to sum to 1."""
    import torch

    from .evaluate import read_table
    from .regressor import load_regressor

    attn = read_table(url, "attention", storage_options, columns=["layers", "heads", "maps"])
    if "maps" not in attn.columns or attn["maps"].null_count() == attn.height:
        raise ValueError(f"{url}: needs pooled maps (label with --dump-maps)")
    layers, heads = attn["layers"][0].to_list(), attn["heads"][0].to_list()
    model, meta = load_regressor(regressor_dir, len(layers), len(heads))
    g = meta["grid"]
    rows = attn.filter(pl.col("maps").is_not_null())
    rows = rows.head(max_rows) if max_rows else rows
    maps = torch.tensor(np.stack(rows["maps"].to_numpy()).astype(np.float32))
    maps = maps.reshape(-1, 4, len(layers), len(heads), g, g).requires_grad_(True)
    model(maps).sum().backward()
    sal = maps.grad.abs().mean((0, 1, 4, 5)).numpy().astype(np.float64)  # (L, H)
    return sal / max(sal.sum(), 1e-30), [int(x) for x in layers], [int(x) for x in heads]


def selected_size(boxes: pl.DataFrame, cands: pl.DataFrame) -> list[dict]:
    """Per selector, the median over queries of (chosen box area / ground-truth area) in each size
    bucket and over all; 1 is the object's size. Queries without a chosen box are left out."""
    from .evaluate import selector_rows

    rows = selector_rows(boxes, cands)
    area = cands.select("query_id", "cand_idx",
                        ((pl.col("x2") - pl.col("x1")) * (pl.col("y2") - pl.col("y1"))).alias("area"))
    gt = boxes.select("query_id", ((pl.col("gt_x2") - pl.col("gt_x1")) * (pl.col("gt_y2") - pl.col("gt_y1")))
                      .alias("gt_area"))
    j = (rows.join(area, on=["query_id", "cand_idx"], how="inner").join(gt, on="query_id")
         .filter(pl.col("area").is_not_null() & (pl.col("gt_area") > 0))
         .with_columns((pl.col("area") / pl.col("gt_area")).alias("ratio")))
    out = []
    for sel in rows["selector"].unique(maintain_order=True).to_list():
        r = j.filter(pl.col("selector") == sel)
        rec = {"selector": sel}
        for b in (*BUCKETS, ALL):
            v = r["ratio"] if b == ALL else r.filter(pl.col("size_bucket") == b)["ratio"]
            rec[b] = float(v.median()) if v.len() else None
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------- markdown


def _f(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def head_curve_markdown(curve: list[dict]) -> str:
    lines = ["| heads k | small Acc@0.5 | medium | large | all | within-query Spearman |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['k']} | {_f(r['small'])} | {_f(r['medium'])} | {_f(r['large'])} | {_f(r['all'])} | "
              f"{_f(r['spearman'])} |" for r in curve]
    return "\n".join(lines)


def layer_curves_markdown(curves: dict, layers: list[int]) -> str:
    names = [n for n, c in curves.items() if c.get("mean_entropy")]
    lines = ["| layer | " + " | ".join(f"{n}, n={curves[n]['n']}" for n in names) + " |",
             "|---:|" + "---:|" * len(names)]
    for i, l in enumerate(layers):
        lines.append(f"| {l} | " + " | ".join(_f(curves[n]["mean_entropy"][i]) for n in names) + " |")
    return "\n".join(lines)


def saliency_markdown(sal: np.ndarray, layers: list[int], heads: list[int], top: int = 8) -> str:
    by_layer = sal.sum(1)
    lines = ["| layer | share of saliency |", "|---:|---:|"]
    lines += [f"| {l} | {by_layer[i]:.3f} |" for i, l in enumerate(layers)]
    order = np.argsort(-sal, axis=None)[:top]
    best = ", ".join(f"L{layers[i // len(heads)]}H{heads[i % len(heads)]} {sal.flat[i]:.3f}" for i in order)
    return "\n".join(lines) + f"\n\nTop {top} heads by saliency share: {best}."


def selected_size_markdown(rows: list[dict]) -> str:
    lines = ["| selector | small | medium | large | all |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['selector']} | " + " | ".join(_f(r[b], ".2f") for b in (*BUCKETS, ALL)) + " |" for r in rows]
    return "\n".join(lines)
