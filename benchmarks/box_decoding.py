"""Box-only vs full decoding on the same queries, side by side in one run: decode steps per
candidate, queries/s and Acc@0.5 per size bucket.

    python -m benchmarks.box_decoding [--model organism] [--queries 96] [--num-candidates 10]
        [--variant shapes --split test] [--batch-size 8] [--repeats 2]

`--model` may be a hub id, a local directory (e.g. `acs make-tiny-model DIR --shape 7b --layers 4`:
the 7B shape's decode cost with random weights, whose accuracy is meaningless) or `organism`.
In-process (no Ray), the two modes alternated `--repeats` times on identical inputs so that
machine noise hits both; ends with one JSON line.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def run_mode(grounder, items, batch_size: int) -> tuple[list, float]:
    t0 = time.perf_counter()
    results = []
    for b in range(0, len(items), batch_size):
        results += grounder.ground([q for q, _ in items[b:b + batch_size]])
    return results, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.box_decoding", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism")
    ap.add_argument("--queries", type=int, default=96)
    ap.add_argument("--num-candidates", type=int, default=10)
    ap.add_argument("--variant", default="shapes")
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="alternations of the two modes (timing only)")
    ap.add_argument("--temperature", type=float, default=None, help="default: the model's shipped one, else 1.0")
    ap.add_argument("--selector", default="acs-free")
    args = ap.parse_args(argv)

    from benchmarks.common import benchmark_queries, emit, selector_metrics
    from pipeline.ground import GroundConfig, Grounder
    from pipeline.sampling import SamplingConfig

    adapter, profile, regressor, items, buckets = benchmark_queries(args.model, args.variant, args.split,
                                                                    args.queries)
    temp = args.temperature or 1.0
    grounders = {mode: Grounder(adapter, GroundConfig(
        sampling=SamplingConfig(num_candidates=args.num_candidates, temperature=temp, decode=mode),
        profile_path=profile, regressor_path=regressor)) for mode in ("full", "box")}
    run_mode(grounders["box"], items[:args.batch_size], args.batch_size)  # warm-up: first-call costs
    walls = {m: [] for m in grounders}
    results = {}
    for _ in range(max(1, args.repeats)):
        for mode, g in grounders.items():
            results[mode], wall = run_mode(g, items, args.batch_size)
            walls[mode].append(wall)
    k = args.num_candidates + 1
    res = {}
    for mode, rs in results.items():
        steps = sum(r.timings.get("generated_tokens", 0) for r in rs)
        per_sel = selector_metrics(rs, buckets, ("greedy", args.selector, "oracle"))
        wall = float(np.median(walls[mode]))
        res[mode] = {"steps_per_candidate": steps / (len(rs) * k), "wall_s": wall, "walls": walls[mode],
                     "queries_per_s": len(rs) / wall, "metrics": per_sel,
                     "no_box": sum(c.status == "no_box" for r in rs for c in r.candidates) / (len(rs) * k)}
    same_greedy = sum(a.candidates[0].box == b.candidates[0].box for a, b in zip(results["full"], results["box"]))
    print(f"{args.model}: {len(items)} queries of {args.variant}/{args.split}, N = {args.num_candidates}, "
          f"T = {temp:g}, batch {args.batch_size}, median of {args.repeats} alternated runs")
    print(f"{'decode':<6} {'steps/cand':>10} {'queries/s':>9} {'no-box':>6}  " +
          "  ".join(f"{s} Acc@0.5 s/m/l" for s in ("greedy", args.selector, "oracle")))
    for mode, r in res.items():
        m = r["metrics"]
        print(f"{mode:<6} {r['steps_per_candidate']:>10.1f} {r['queries_per_s']:>9.2f} {r['no_box']:>6.3f}  " +
              "  ".join("/".join(f"{m[s][b]['acc50']:.3f}" for b in ("small", "medium", "large"))
                        for s in ("greedy", args.selector, "oracle")))
    step_ratio = res["box"]["steps_per_candidate"] / max(1e-9, res["full"]["steps_per_candidate"])
    speedup = res["box"]["queries_per_s"] / res["full"]["queries_per_s"]
    print(f"box-only: {step_ratio:.2f}x the decode steps per candidate, {speedup:.2f}x the queries/s; "
          f"greedy box identical on {same_greedy}/{len(items)} queries")
    emit({"benchmark": "box_decoding", "model": args.model, "queries": len(items), "N": args.num_candidates,
          "temperature": temp, "split": f"{args.variant}/{args.split}", "step_ratio": step_ratio,
          "speedup": speedup, "same_greedy_box": same_greedy, **{f"{m}_{f}": v[f] for m, v in res.items()
                                                               for f in ("steps_per_candidate", "queries_per_s", "wall_s", "no_box")},
          "metrics": {m: v["metrics"] for m, v in res.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
