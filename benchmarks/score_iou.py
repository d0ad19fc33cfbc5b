"""How well each selector's score tracks a candidate's IoU in a labelled run, two ways: Pearson r
over all candidates pooled (what the paper reports for its regressor), and the mean within-query
Spearman (what choosing among one query's candidates needs). A score can predict which queries are
easy (large objects: high IoU) and still not rank the boxes of one query.

    python -m benchmarks.score_iou out/results/runs/shapes-test
"""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.score_iou", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--scores", default="acs_learned,acs_free,logprob,vote,loc_mass,loc_heads")
    args = ap.parse_args(argv)

    import polars as pl

    from benchmarks.common import emit
    from pipeline.metrics import mean_within_group_spearman, pearson

    cands = pl.read_parquet(f"{args.run.rstrip('/')}/candidates/").filter(pl.col("iou").is_not_null())
    if not cands.height:
        raise SystemExit(f"{args.run}: no candidates with an IoU (labelled without ground truth?)")
    out = []
    print(f"{args.run}: score against IoU, pooled Pearson r / mean within-query Spearman")
    for name in args.scores.split(","):
        col = f"score_{name}"
        if col not in cands.columns:
            raise SystemExit(f"{args.run}: no column {col}")
        d = cands.filter(pl.col(col).is_not_null() & pl.col(col).is_finite())
        r = pearson(d[col].to_numpy(), d["iou"].to_numpy())
        rho = mean_within_group_spearman(d[col].to_numpy(), d["iou"].to_numpy(), d["query_id"].to_numpy())
        out.append({"score": name, "candidates": d.height, "pearson": r, "within_query_spearman": rho})
        print(f"  {name:<12} r {r:.3f}  within-query {rho:.3f}  ({d.height} candidates)")
    emit({"benchmark": "score_iou", "run": args.run, "rows": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
