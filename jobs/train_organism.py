"""`acs train-organism`: train the shipped small Qwen2.5-VL by a committed recipe, on CPU, resumably.

    acs train-organism --recipe organism-v2 --out runs/organism       # from scratch, or resume
    acs train-organism --recipe organism-v2-tower1x --out runs/v1x --fork-from runs/organism --until 600
    acs train-organism --recipe organism-v2 --out runs/next --init-from pipeline/assets/organism
    acs train-organism --premise pipeline/assets/organism             # premise metrics of a checkpoint
    acs train-organism --out runs/organism --export pipeline/assets/organism   # ship it, with its card

A recipe (`pipeline/organism/recipes/NAME.json`, or a path) lists the phases: steps, curriculum,
what trains, learning rates; a variant names its base (`"extends"`, optionally `"branch_at"` a
step of one of its phases) and the phases it appends. Rerunning the same command resumes
mid-phase from OUT/ckpt; a run ends by itself at the recipe's end or when its stop bars are met
on calib. See
`pipeline/organism/train.py` for the run directory's layout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="acs train-organism", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", help="recipe name in pipeline/organism/recipes or a JSON file")
    ap.add_argument("--out", help="run directory (recipe, checkpoints, phase snapshots, log)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="stop after a checkpoint past this wall time; rerun to resume")
    ap.add_argument("--until", type=int, default=None, metavar="STEP",
                    help="stop after a checkpoint at this step (a short variant run, compared side by side)")
    ap.add_argument("--fork-from", default=None, metavar="RUN",
                    help="when OUT is new: start from RUN's checkpoint at the end of the last phase its recipe "
                         "shares with --recipe, instead of training those phases again")
    ap.add_argument("--init-from", default=None, metavar="CKPT",
                    help="when OUT is new: continue the recipe from an exported checkpoint (the shipped organism "
                         "records its recipe, step and log); the optimizer's moments start afresh")
    ap.add_argument("--premise", default=None, metavar="CKPT",
                    help="only evaluate a checkpoint's premise metrics on calib (per temperature) and print them")
    ap.add_argument("--eval-n", type=int, default=96, help="calib queries for --premise")
    ap.add_argument("--export", default=None, metavar="DIR",
                    help="write OUT's final model here in bf16 with a model card made from OUT's log")
    args = ap.parse_args(argv)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.premise:
        from pipeline.organism.probes import checkpoint_premise

        print(json.dumps(checkpoint_premise(args.premise, n=args.eval_n), indent=1))
        return 0
    if not args.out:
        ap.error("--out is required (unless --premise)")
    if args.export:
        from pipeline.organism.card import model_card
        from pipeline.organism.model import export_organism

        ckpt = Path(args.out) / "ckpt"
        if not (ckpt / "state.json").exists():
            raise SystemExit(f"acs train-organism: {args.out} has no checkpoint to export")
        export_organism(ckpt, args.export, card=model_card(Path(args.out)), run_dir=args.out)
        print(f"exported {ckpt} to {args.export}")
        return 0
    if not args.recipe:
        ap.error("--recipe is required to train")
    from pipeline.organism.recipe import load_recipe
    from pipeline.organism.train import train

    try:
        recipe = load_recipe(args.recipe)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"acs train-organism: {e}") from None
    state = train(recipe, args.out, threads=args.threads, max_minutes=args.max_minutes,
                  fork_from=args.fork_from, until_step=args.until, init_from=args.init_from, print_fn=lambda s: print(s, flush=True))
    print(json.dumps({"step": state["step"], "of": recipe.total_steps, "stopped": state.get("stopped"),
                      "final": state.get("final")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
