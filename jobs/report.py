"""`acs report OUT [--output report.html] [--profile PROFILE.json] [--max-gallery 24]`: one
self-contained static HTML page about a labelled run (no model is run).

The page holds the per-selector x size-bucket table, plots (Acc@0.5 by bucket, the ACS-Learned
reliability diagram, attention entropy by layer) and a gallery of queries where the selector
changed greedy's answer, with attention heatmaps when the run was labelled with --dump-maps.
Images are embedded, so the file opens anywhere without the run's storage.
"""

from __future__ import annotations

import argparse
import posixpath
import sys

from jobs.cli import parse_storage_options


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="acs report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="output prefix of a labelled run (local or fsspec URL)")
    ap.add_argument("--output", default=None, help="HTML file to write (default: OUT/report.html)")
    ap.add_argument("--profile", default=None,
                    help="head profile JSON (acs calibrate): its heads make the gallery heatmaps "
                         "(default: each candidate's 8 lowest-entropy heads)")
    ap.add_argument("--regressor", default=None,
                    help="ACS-Learned regressor directory: adds its saliency by layer and head (needs --dump-maps)")
    ap.add_argument("--markdown", default=None,
                    help="also write the analyses (ACS-Free by head count, entropy and saliency by layer) as tables")
    ap.add_argument("--max-gallery", type=int, default=24, help="most gallery queries (0: none)")
    ap.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                    help="fsspec storage option for the run, its images and the output (repeatable)")
    args = ap.parse_args(argv)
    if args.max_gallery < 0:
        ap.error("--max-gallery must be >= 0")

    from pipeline.report import build_report

    output = args.output or posixpath.join(args.run.rstrip("/"), "report.html")
    try:
        summary = build_report(args.run, output, profile_path=args.profile, max_gallery=args.max_gallery,
                               storage_options=parse_storage_options(args.storage_option, "acs report"),
                               regressor_path=args.regressor, markdown=args.markdown)
    except (ValueError, FileNotFoundError) as e:
        print(f"acs report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {output}: {summary['queries']} queries, selector {', '.join(summary['selectors_in_run'])}; "
          f"gallery {summary['gallery']} ({summary['gallery_helps']} helps, {summary['gallery_hurts']} hurts), "
          f"{summary['heatmaps']} heatmaps, plots: {', '.join(summary['plots']) or 'none'}; "
          f"{summary['bytes'] / 1e6:.1f} MB")
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
