"""`acs ground IMAGE --query TEXT`: one image, one query; every candidate with every score."""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="acs ground", description=__doc__)
    ap.add_argument("image", help="local path or fsspec URL of the image")
    ap.add_argument("--query", required=True, help="object to ground, e.g. 'red circle'")
    ap.add_argument("--model", default="organism", help="hub id, local directory, or `organism`")
    ap.add_argument("--selector", default="acs-free", help="selector whose choice is marked")
    ap.add_argument("--num-candidates", type=int, default=10, help="sampled candidates N (greedy on top)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="sampling temperature (default: the model's own from its acs_model.json, else 1.0)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--decode", choices=["box", "full"], default="box",
                    help="box: force the answer's opening, stop when the box closes; full: decode the whole answer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--capture", choices=["all", "profile", "none"], default="all")
    ap.add_argument("--profile", default=None, help="ACS-Free head profile JSON")
    ap.add_argument("--regressor", default=None, help="ACS-Learned regressor directory")
    ap.add_argument("--device", default=None)
    ap.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.query.strip():
        print("acs ground: --query is empty; name the object to ground", file=sys.stderr)
        return 2
    from pipeline.assets import default_paths, default_temperature
    from pipeline.ground import GroundConfig, Grounder, Query
    from pipeline.images import ImageError, read_image
    from pipeline.models.base import load_adapter
    from pipeline.sampling import SamplingConfig

    try:
        sampling = SamplingConfig(num_candidates=args.num_candidates,
                                  temperature=default_temperature(args.model, args.temperature),
                                  top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                  decode=args.decode)
        image = read_image(args.image)
        adapter = load_adapter(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
        profile, regressor = default_paths(args.model, args.profile, args.regressor)
        cfg = GroundConfig(sampling=sampling, capture=args.capture, profile_path=profile, regressor_path=regressor)
        grounder = Grounder(adapter, cfg)
    except (ImageError, ValueError, OSError) as e:
        print(f"acs ground: {e}", file=sys.stderr)
        return 2
    result = grounder.ground([Query("q0", image, args.query.strip())])[0]
    if result.status == "query_error":
        print(f"acs ground: {result.error}", file=sys.stderr)
        return 2
    chosen = result.selected.get(args.selector)
    if args.json:
        print(json.dumps({
            "image": args.image, "query": args.query, "model": adapter.model_id, "status": result.status,
            "error": result.error, "selector": args.selector, "selected": chosen, "selected_by": result.selected,
            "candidates": [{"cand_idx": c.cand_idx, "status": c.status, "box": c.box, "text": c.text,
                            "error": c.error, "mean_logprob": c.mean_logprob, "scores": c.scores}
                           for c in result.candidates]}, indent=2, default=float))
        return 0
    names = sorted({n for c in result.candidates for n in c.scores})
    print(f"{args.image}  query={args.query!r}  model={adapter.model_id}  status={result.status}")
    head = f"{'':2}{'idx':>3} {'status':<7} {'box (x1, y1, x2, y2)':<28} " + " ".join(f"{n:>9}" for n in names)
    print(head)
    for c in result.candidates:
        box = "-" if c.box is None else "(" + ", ".join(f"{v:.1f}" for v in c.box) + ")"
        mark = "*" if c.cand_idx == chosen else " "
        print(f"{mark:2}{c.cand_idx:>3} {c.status:<7} {box:<28} " + " ".join(f"{c.scores[n]:>9.4g}" for n in names))
    sel = "none (no candidate has a box)" if chosen is None else f"candidate {chosen}: {result.candidates[chosen].box}"
    print(f"selected by {args.selector}: {sel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
