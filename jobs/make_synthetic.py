"""CLI: generate the synthetic shapes benchmark (``acs make-synthetic`` / ``python -m jobs.make_synthetic``)."""

from __future__ import annotations

import argparse
import sys

from pipeline.organism.scenes import SPLIT_ID, VARIANT_ID, make_synthetic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="acs make-synthetic", description=__doc__)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--variant", required=True, choices=list(VARIANT_ID))
    parser.add_argument("--split", required=True, choices=list(SPLIT_ID))
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=256, help="images per Parquet shard")
    args = parser.parse_args(argv)
    try:
        s = make_synthetic(args.out, args.variant, args.split, args.n, args.seed, args.shard_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shares = s["size_shares"]
    rows = [
        ("variant / split", f"{s['variant']} / {s['split']} (seed {s['seed']})"),
        ("images", s["n_images"]),
        ("annotations", s["n_annotations"]),
        ("queries", s["n_queries"]),
        ("query sizes", "  ".join(f"{b} {shares[b]:.1%}" for b in ("small", "medium", "large"))),
        ("annotations.json", s["paths"]["annotations"]),
        ("shards", f"{len(s['paths']['shards'])} in {args.out}/shards"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
