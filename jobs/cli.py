"""`acs`: one console script, one module per subcommand (each also runs as `python -m jobs.<name>`)."""

from __future__ import annotations

import importlib
import json
import sys

COMMANDS = {
    "ground": ("jobs.ground", "one image, one query: every candidate with its scores"),
    "label": ("jobs.label", "the Ray Data job: queries in, Parquet tables out"),
    "evaluate": ("jobs.evaluate", "per-selector x size-bucket metrics of a labelled run"),
    "calibrate": ("jobs.calibrate", "ACS-Free head profile from a labelled run"),
    "train-regressor": ("jobs.train_regressor", "ACS-Learned IoU regressor"),
    "report": ("jobs.report", "static HTML report of a labelled run"),
    "export": ("jobs.export", "auto-labels as COCO or Label Studio JSON, or YOLO txt"),
    "make-synthetic": ("jobs.make_synthetic", "synthetic COCO-format benchmark"),
    "make-tiny-model": ("jobs.make_tiny_model", "random-weight model of a real architecture, offline"),
    "train-organism": ("jobs.train_organism", "train the shipped small Qwen2.5-VL"),
    "check-model": ("jobs.check_model", "preflight a checkpoint before a long job"),
}


def parse_storage_options(items: list[str], prog: str = "acs") -> dict:
    """`--storage-option KEY=VALUE` items -> fsspec options (values parsed as JSON when they are)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{prog}: --storage-option expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        print("usage: acs COMMAND [options]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<{width}}  {help_}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"acs: unknown command {name!r}; see `acs --help`", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:
        if e.name == COMMANDS[name][0]:
            print(f"acs: {name} is not available in this version", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
