"""`acs train-regressor OUT... --calib OUT --output DIR`: the ACS-Learned IoU regressor.

The OUT runs must be `acs label --dump-maps` runs with ground truth on the train split; `--calib`
(a calib-split run) is used for early stopping. Writes DIR/regressor.safetensors + regressor.json.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="acs train-regressor", description=__doc__)
    ap.add_argument("runs", nargs="+", help="train-split labelled runs (with --dump-maps)")
    ap.add_argument("--calib", required=True, help="calib-split labelled run for early stopping")
    ap.add_argument("--output", required=True, help="regressor directory to write")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-id", default=None)
    args = ap.parse_args(argv)

    from pipeline.evaluate import read_table
    from pipeline.train_regressor import train_and_save

    model_id = args.model_id or read_table(args.runs[0], "boxes")["model_id"].drop_nulls()[0]
    try:
        m = train_and_save(args.runs, args.calib, args.output, model_id, epochs=args.epochs, lr=args.lr,
                           seed=args.seed)
    except ValueError as e:
        print(f"acs train-regressor: {e}", file=sys.stderr)
        return 2
    print(f"regressor -> {args.output}: calib Pearson r {m['calib_pearson']:.3f}, Spearman {m['calib_spearman']:.3f} "
          f"({m['train_candidates']} train / {m['calib_candidates']} calib candidates, {m['epochs_run']} epochs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
