"""`acs evaluate OUT [--gt COCO_JSON]`: per-selector x size-bucket metrics of a labelled run.

Writes OUT/eval.json and prints a markdown table. Selectors are columns of candidates/, so this
re-scores without running the model.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import parse_storage_options


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="acs evaluate", description=__doc__)
    ap.add_argument("run", help="output prefix of a labelled run (local or fsspec URL)")
    ap.add_argument("--gt", default=None, help="COCO annotation JSON, for runs labelled without ground truth")
    ap.add_argument("--markdown", default=None, help="also write the table to this markdown file")
    ap.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                    help="fsspec storage option for the run and the annotation files (repeatable)")
    args = ap.parse_args(argv)
    storage_options = parse_storage_options(args.storage_option, "acs evaluate")

    from pipeline.evaluate import evaluate_run, format_label_quality, format_outcomes
    from pipeline.inputs import InputError
    from pipeline.metrics import format_table
    from pipeline.storage import Output

    try:
        result = evaluate_run(args.run, args.gt, storage_options)
    except InputError as e:  # --gt that is not a COCO file: say so, not a stack trace
        print(f"acs evaluate: {e}", file=sys.stderr)
        return 2
    if "table" not in result:
        print(f"acs evaluate: {result.get('note')}", file=sys.stderr)
        return 2
    Output(args.run, storage_options).write_json(result, "eval.json")
    table = format_table(result["table"])
    print(table)
    ap_ = result["coco_ap"]
    print(f"\nCOCO AP of the selected boxes ({ap_['selector']}, confidence as score): "
          f"AP {ap_['AP']:.3f}  AP50 {ap_['AP50']:.3f}  AP_small {ap_['AP_small']:.3f}")
    lq = format_label_quality(result["label_quality"])
    print(f"\nauto-label quality of the selected boxes, kept where {result['label_quality']['by']} reaches a "
          f"threshold (precision: IoU >= 0.5 among kept; recall: correct kept over all queries):\n{lq}")
    if "regressor" in result:
        r = result["regressor"]
        print(f"regressor: Pearson r {r['pearson']:.3f}, Spearman {r['spearman']:.3f} over {r['n']} candidates; "
              f"ECE {r['reliability']['ece']:.3f}")
    nb = result["no_box_share"]
    print(f"no_box share: greedy {nb['greedy']:.3f}, sampled "
          + ("-" if nb["sampled"] is None else f"{nb['sampled']:.3f}"))
    if "sampling" in result:
        sm = result["sampling"]
        print(f"sampling: {sm['sampled_per_query_mean']:.2f} of {sm['sampled_per_query_max']} candidates sampled per "
              f"query on average; {sm['queries_stopped_early']} queries stopped early (adaptive K)")
    # Where the answers landed: only with a COCO file (every object of an image); else why not.
    landing = format_outcomes(result["outcomes"]) if "outcomes" in result else None
    print(f"\n{landing}" if landing else f"where the answers landed: not computed: {result['outcomes_note']}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n\nAuto-label quality (selected boxes kept where "
                    f"{result['label_quality']['by']} reaches a threshold):\n\n{lq}\n")
            f.write(f"\n## Where the answers landed\n\n{landing or 'Not computed: ' + result['outcomes_note']}\n")
    print(f"wrote {args.run.rstrip('/')}/eval.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
