"""`acs check-model MODEL`: preflight a checkpoint before a long `acs label` job.

Loads MODEL (hub id, local directory or `organism`) offline as `acs label` does, checks its
processor, chat template, special tokens and box format, runs one query on a generated scene,
estimates memory per batch, and ends with a one-line verdict. Exit code: 0 no check failed (warnings
allowed), 1 a check failed, 2 a usage error.

The hub is not contacted unless HF_HUB_OFFLINE=0 is set: label's Ray actors run offline by
default, so a model that only loads online would fail there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="acs check-model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="hub id, local directory, or `organism`")
    ap.add_argument("--num-candidates", type=int, default=10, help="sampled candidates N of the job (greedy on top)")
    ap.add_argument("--batch-size", type=int, default=8, help="queries per model batch of the job")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per candidate at most")
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                    help="auto: bf16 on CUDA, fp32 on CPU (as acs label)")
    ap.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Before transformers / huggingface_hub are imported: they read it once, at import.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipeline.check_model import check_model, format_report

    try:
        report = check_model(args.model, num_candidates=args.num_candidates, batch_size=args.batch_size,
                             device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                             max_new_tokens=args.max_new_tokens)
    except ValueError as e:  # invalid arguments only; the model's problems are check rows
        print(f"acs check-model: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), default=str))
    else:
        print(format_report(report))
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
