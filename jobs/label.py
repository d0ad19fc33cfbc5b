"""`acs label`: the Ray Data job. Queries in (COCO, manifest or image shards), Parquet tables out.

    acs label --coco ann.json --images ROOT --output OUT [--model organism] [--selector auto]
    ray job submit --working-dir . -- python -m jobs.label --shards s3://bucket/shards/ --output s3://bucket/out

Rerunning the same command resumes: finished shards are skipped, none is written twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jobs.cli import parse_storage_options
from pipeline.label import LabelConfig

_FLAGS = {"coco", "images", "queries", "shards", "output"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="acs label", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(LabelConfig):
        if f.name in ("storage_options", "run_id", "progress", "categories"):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if f.type in ("bool", bool):
            ap.add_argument(flag, action="store_true", help=help_)
        else:
            typ = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            default = None if f.default is dataclasses.MISSING else f.default
            ap.add_argument(flag, type=typ, default=default, required=f.name == "output",
                            help=f"{help_} (default: {default})" if default is not None else help_)
    ap.add_argument("--categories", default=None, help="comma-separated categories to query in every shard image")
    ap.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                    help="fsspec storage option (repeatable), e.g. endpoint_url=http://127.0.0.1:9000; "
                         "credentials are best left to the environment; values are never logged")
    ap.add_argument("--run-id", default="", help="name of this run (default: timestamp + random)")
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return ap


def config_from_args(argv: list[str] | None) -> LabelConfig:
    args = build_parser().parse_args(argv)
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(LabelConfig)
              if hasattr(args, f.name) and f.name not in ("categories", "storage_options", "run_id")}
    # `--categories ""` stays an (empty) list, which the listing refuses, rather than None, which
    # would quietly mean "each image's own categories"; blanks from a trailing comma are dropped.
    categories = None if args.categories is None else [c.strip() for c in args.categories.split(",") if c.strip()]
    return LabelConfig(**kwargs, storage_options=parse_storage_options(args.storage_option, "acs label"),
                       categories=categories, run_id=args.run_id, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    from pipeline.label import ShardsFailed, run_label, summary_text
    from pipeline.storage import StorageError

    cfg = config_from_args(argv)
    try:
        summary = run_label(cfg)
    except (ValueError, FileNotFoundError) as e:  # a wrong input (InputError, NoQueries) or setting
        print(f"acs label: {e}", file=sys.stderr)
        return 2
    except (ShardsFailed, StorageError) as e:  # storage faults after the retries: a rerun resumes
        print(f"acs label: {e}", file=sys.stderr)
        return 1
    print(summary_text(summary, cfg.output, cfg.storage_options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
