"""`acs export OUT --format coco|labelstudio|yolo --output FILE|DIR`: auto-labels with confidence.

coco and labelstudio write one JSON file; yolo writes a folder: labels/<image stem>.txt for every
image (`class cx cy w h`, normalised), data.yaml and classes.txt (class names in id order)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="acs export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="output prefix of a labelled run")
    ap.add_argument("--format", choices=["coco", "labelstudio", "yolo"], required=True)
    ap.add_argument("--output", required=True, help="JSON file to write, or a folder for yolo (local or fsspec URL)")
    ap.add_argument("--min-confidence", type=float, default=0.0, help="drop labels below this confidence")
    ap.add_argument("--classes", default=None,
                    help="yolo: comma-separated class names in id order (default: the run's categories, sorted); "
                         "give the same list to every run of one training set so their ids agree")
    args = ap.parse_args(argv)
    from pipeline.export import export, to_yolo

    try:
        if args.format != "yolo":
            n = export(args.run, args.format, args.output, min_confidence=args.min_confidence)
            print(f"wrote {n} labels ({args.format}) to {args.output}")
            return 0
        classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
        s = to_yolo(args.run, args.output, min_confidence=args.min_confidence, classes=classes)
    except ValueError as e:  # not a labelled run, a class list that misses categories, clashing names
        print(f"acs export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {s['labels']} labels for {s['images']} images ({len(s['classes'])} classes, yolo) to {args.output}; "
          f"not written: {s['below_min_confidence']} below --min-confidence {args.min_confidence}, "
          f"{s['without_box']} without a box (status not ok)")
    if s["unanswered_images"]:
        print(f"warning: {len(s['unanswered_images'])} image(s) have an empty label file but the model never "
              f"answered on them (image, model or query errors), e.g. {s['unanswered_images'][0]}: leave them out "
              "of training", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
