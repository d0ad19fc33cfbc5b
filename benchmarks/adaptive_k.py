"""Adaptive K vs full N on the same queries: generated tokens and Acc@0.5 per size bucket.

    python -m benchmarks.adaptive_k [--model organism] [--queries 96] [--num-candidates 10]
        [--first 4] [--iou 0.7] [--variant shapes --split calib]

Runs in-process (no Ray) so the two settings see identical inputs; prints a table and one JSON line.
Tune --first/--iou on `calib`, report on `test`.
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.adaptive_k", description=__doc__)
    ap.add_argument("--model", default="organism")
    ap.add_argument("--queries", type=int, default=96)
    ap.add_argument("--num-candidates", type=int, default=10)
    ap.add_argument("--first", type=int, default=4)
    ap.add_argument("--iou", type=float, default=0.7)
    ap.add_argument("--variant", default="shapes")
    ap.add_argument("--split", default="calib")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--selector", default="acs-free")
    args = ap.parse_args(argv)

    from benchmarks.common import benchmark_queries, emit, selector_metrics
    from pipeline.ground import GroundConfig, Grounder
    from pipeline.sampling import SamplingConfig

    adapter, profile, regressor, items, buckets = benchmark_queries(args.model, args.variant, args.split,
                                                                    args.queries)
    res = {}
    for name, adaptive in (("full", False), ("adaptive", True)):
        cfg = GroundConfig(sampling=SamplingConfig(num_candidates=args.num_candidates), profile_path=profile,
                           regressor_path=regressor, adaptive=adaptive, adaptive_first=args.first,
                           adaptive_iou=args.iou)
        g = Grounder(adapter, cfg)
        t0 = time.perf_counter()
        results = []
        for b in range(0, len(items), args.batch_size):
            results += g.ground([q for q, _ in items[b:b + args.batch_size]])
        wall = time.perf_counter() - t0
        tokens = sum(r.timings.get("generated_tokens", 0) for r in results)
        per_sel = selector_metrics(results, buckets, ("greedy", args.selector, "oracle"))
        stopped = sum(r.candidates[-1].status == "skipped" for r in results)
        res[name] = {"tokens": tokens, "wall_s": wall, "stopped_early": stopped, "metrics": per_sel}
    saving = 1 - res["adaptive"]["tokens"] / max(1, res["full"]["tokens"])
    print(f"{'setting':<9} {'tokens':>8} {'wall s':>7} {'stopped':>7}  " +
          "  ".join(f"{s}: small/medium/large Acc@0.5" for s in ("greedy", args.selector)))
    for name, r in res.items():
        m = r["metrics"]
        print(f"{name:<9} {r['tokens']:>8.0f} {r['wall_s']:>7.1f} {r['stopped_early']:>7}  " + "  ".join(
            "/".join(f"{m[s][b]['acc50']:.3f}" for b in ("small", "medium", "large")) for s in ("greedy", args.selector)))
    d_small = (res["adaptive"]["metrics"][args.selector]["small"]["acc50"]
               - res["full"]["metrics"][args.selector]["small"]["acc50"])
    print(f"tokens saved {100 * saving:.1f}%; {args.selector} small-object Acc@0.5 change {100 * d_small:+.1f} points")
    emit({"benchmark": "adaptive_k", "model": args.model, "queries": len(items), "N": args.num_candidates,
          "first": args.first, "iou": args.iou, "split": f"{args.variant}/{args.split}", "token_saving": saving,
          "small_acc50_change": d_small, **{f"{k}_{f}": v[f] for k, v in res.items() for f in ("tokens", "wall_s")},
          "metrics": {k: v["metrics"] for k, v in res.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
