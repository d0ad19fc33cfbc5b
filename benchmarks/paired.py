"""One selector against others on the same queries of a labelled run: paired bootstrap 95% interval
of the Acc@0.5 difference per size bucket, with queries won / lost (`acs evaluate` pairs every
selector with greedy; this pairs any two, e.g. ACS-Free against the other training-free ones).

    python -m benchmarks.paired out/results/runs/shapes-test --a acs-free \
        --b loc-heads,logprob,vote,random,loc-mass,greedy
"""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.paired", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--a", default="acs-free")
    ap.add_argument("--b", default="loc-heads,logprob,vote,random,loc-mass,greedy")
    args = ap.parse_args(argv)

    import polars as pl

    from benchmarks.common import emit
    from pipeline.evaluate import load_tables, selector_rows
    from pipeline.metrics import paired_bootstrap

    rows = selector_rows(*load_tables(args.run))
    out = []
    print(f"{args.run}: {args.a} minus each, Acc@0.5 difference [95% interval], won/lost")
    for b in args.b.split(","):
        cells = []
        for bucket in ("small", "medium", "large", "all"):
            sel = rows if bucket == "all" else rows.filter(pl.col("size_bucket") == bucket)
            pair = (sel.filter(pl.col("selector") == args.a).select("query_id", pl.col("iou").alias("a"))
                    .join(sel.filter(pl.col("selector") == b).select("query_id", pl.col("iou").alias("b")),
                          on="query_id"))
            if not pair.height:
                raise SystemExit(f"{args.run}: no queries with both {args.a} and {b}")
            r = paired_bootstrap(pair["a"].to_numpy(), pair["b"].to_numpy())
            out.append({"a": args.a, "b": b, "bucket": bucket, **r})
            lo, hi = r["acc_diff_ci"]
            cells.append(f"{bucket} {r['acc_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] {r['won']}/{r['lost']}")
        print(f"  vs {b:<10} " + "; ".join(cells))
    emit({"benchmark": "paired", "run": args.run, "rows": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
