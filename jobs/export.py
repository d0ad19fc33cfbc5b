"""`acs export OUT --format coco|labelstudio --output FILE`: auto-labels with confidence."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="acs export", description=__doc__)
    ap.add_argument("run", help="output prefix of a labelled run")
    ap.add_argument("--format", choices=["coco", "labelstudio"], required=True)
    ap.add_argument("--output", required=True, help="JSON file to write (local or fsspec URL)")
    ap.add_argument("--min-confidence", type=float, default=0.0, help="drop labels below this confidence")
    args = ap.parse_args(argv)
    from pipeline.export import export

    n = export(args.run, args.format, args.output, min_confidence=args.min_confidence)
    print(f"wrote {n} labels ({args.format}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
