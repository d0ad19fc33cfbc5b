"""`acs make-tiny-model DIR --family qwen2.5-vl [--shape tiny|7b --layers K]`: offline random weights."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="acs make-tiny-model", description=__doc__)
    ap.add_argument("dir", help="output directory (loadable with AutoProcessor / AutoModelForImageTextToText)")
    ap.add_argument("--family", default="qwen2.5-vl", choices=["qwen2.5-vl"])
    ap.add_argument("--shape", default="tiny", choices=["tiny", "7b"],
                    help="tiny: a few hundred thousand parameters; 7b: Qwen2.5-VL-7B's real dimensions")
    ap.add_argument("--layers", type=int, default=None, help="text layers (default: the shape's own)")
    ap.add_argument("--vision-layers", type=int, default=None,
                    help="vision blocks (default: the shape's own; benchmarks of text attention may shorten it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                    help="saved dtype (default fp32 for tiny, bf16 for 7b)")
    args = ap.parse_args(argv)
    from pipeline.models.tiny import make_tiny_model

    out = make_tiny_model(args.dir, family=args.family, shape=args.shape, layers=args.layers,
                          seed=args.seed, dtype=args.dtype, vision_layers=args.vision_layers)
    print(f"wrote {args.family} ({args.shape}, random weights) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
