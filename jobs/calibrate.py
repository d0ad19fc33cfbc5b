"""`acs calibrate OUT --output PROFILE.json`: the ACS-Free head profile from a labelled run.

Use a run on the calib split with ground truth. `--method saliency --regressor DIR` gives the
paper's variant (needs a run made with --dump-maps). The same profile also names the few
localization heads of the loc-heads baseline (`loc_heads`, `--loc-k` of them), chosen from the
prompt's attention that `--capture all` records; a run without it gets a profile without them.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="acs calibrate", description=__doc__)
    ap.add_argument("run", help="output prefix of a labelled run (local or fsspec URL)")
    ap.add_argument("--output", required=True, help="profile JSON to write")
    ap.add_argument("--k", type=int, default=8, help="heads to keep")
    ap.add_argument("--method", choices=["entropy", "saliency"], default="entropy")
    ap.add_argument("--regressor", default=None, help="regressor directory (saliency method)")
    ap.add_argument("--loc-k", type=int, default=3, help="localization heads to keep (loc-heads baseline; 0: none)")
    ap.add_argument("--model-id", default=None, help="model id recorded in the profile (default: from the run)")
    args = ap.parse_args(argv)

    from pipeline.calibrate import calibrate, loc_heads, saliency_profile
    from pipeline.evaluate import read_table

    model_id = args.model_id
    if model_id is None:
        boxes = read_table(args.run, "boxes")
        model_id = boxes["model_id"].drop_nulls()[0] if boxes.height else "unknown"
    try:
        if args.method == "saliency":
            if not args.regressor:
                print("acs calibrate: --method saliency needs --regressor DIR", file=sys.stderr)
                return 2
            profile = saliency_profile(args.run, args.regressor, model_id, args.k)
        else:
            profile, meta = calibrate(args.run, model_id, args.k)
            print(f"{meta['queries']} queries, {meta['candidates']} candidates; best head Spearman "
                  f"{meta['best_spearman']:.3f}, median {meta['median_spearman']:.3f}")
        if args.loc_k > 0:
            try:
                profile.loc_heads, profile.meta["loc_heads"] = loc_heads(args.run, args.loc_k)
                print(f"localization heads (loc-heads baseline): {json.dumps(profile.loc_heads)}")
            except ValueError as e:  # an older run, or --capture profile: ACS-Free's profile still stands
                print(f"acs calibrate: no localization heads: {e}", file=sys.stderr)
    except ValueError as e:
        print(f"acs calibrate: {e}", file=sys.stderr)
        return 2
    profile.save(args.output)
    print(f"wrote {args.method} profile with {len(profile.heads)} heads to {args.output}: "
          + json.dumps(profile.heads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
