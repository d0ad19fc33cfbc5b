"""`make demo`: the main job on the embedded default, on any CPU.

Generates the synthetic `shapes/test` split deterministically (seed 0) under OUT/data, runs
`acs label` with the shipped organism on a local Ray instance into OUT/labels, and prints the
per-selector x size-bucket table, then writes the HTML report (`acs report`) to OUT/report.html:
table, plots and a gallery with attention heatmaps of the profile's heads (the demo stores pooled
maps, `--dump-maps`, for them). Rerunning resumes (finished shards are skipped).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def demo_actors(requested: int) -> tuple[int, float]:
    """(actors, CPUs reserved per actor) for the demo's local Ray instance. On CPU the organism's
    steps are small and bound by Python dispatch, so two single-threaded actors label faster than one
    with two threads: 1.52x on 2 cores (docs/performance.md, "The job vs a plain loop"). Each keeps
    its share of the CPUs minus one left for image decoding (`acs label` refuses to leave none)."""
    import os

    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    actors = requested or (2 if cpus >= 2 and not torch.cuda.is_available() else 1)
    return actors, (max(cpus - 1, 1) / actors if actors > 1 else 1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--n-images", type=int, default=48, help="test images to generate (about 3.5 queries each)")
    ap.add_argument("--model", default="organism")
    ap.add_argument("--num-candidates", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--actors", type=int, default=0,
                    help="ACS actors (0: two single-threaded ones on a CPU machine with 2+ cores, else one)")
    ap.add_argument("--no-report", action="store_true", help="skip writing OUT/report.html")
    args = ap.parse_args(argv)

    from pipeline.label import ConfigMismatch, LabelConfig, run_label, summary_text
    from pipeline.organism.scenes import GEOMETRY, make_synthetic
    from pipeline.report import build_report

    out = Path(args.out)
    data = out / "data"
    summary_file = data / "summary.json"
    old = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    # Regenerated when the size or the scene geometry differs (a folder from before the v2 scenes).
    if (old.get("n_images"), old.get("geometry")) != (args.n_images, GEOMETRY):
        make_synthetic(str(data), "shapes", "test", args.n_images, seed=0)
    actors, cpus_per_actor = demo_actors(args.actors)
    t0 = time.time()
    cfg = LabelConfig(output=str(out / "labels"), coco=str(data / "annotations.json"), images=str(data),
                      model=args.model, num_candidates=args.num_candidates, batch_size=args.batch_size,
                      shard_size=64, progress=sys.stderr.isatty(), actors=actors, cpus_per_actor=cpus_per_actor,
                      # The report's heatmaps are drawn from the stored pooled maps. Always on, even
                      # with --no-report: the setting is part of the run's configuration record, and a
                      # flip would make the demo relabel from scratch.
                      dump_maps=True)
    try:
        summary = run_label(cfg)
    except ConfigMismatch as e:
        # The demo owns its output folder: labels from another model or setting (say, an organism
        # retrained since) are replaced, not silently reused.
        print(f"demo: relabelling, {cfg.output} is from another configuration ({e})", file=sys.stderr)
        shutil.rmtree(cfg.output)
        summary = run_label(cfg)
    print(summary_text(summary, cfg.output))
    n = summary["counters"]["queries_pending"]
    print(f"\ndemo: {n} queries labelled in {time.time() - t0:.1f} s wall "
          f"({n / max(1e-9, time.time() - t0):.2f} queries/s) -> {cfg.output}")
    if not args.no_report:
        report = (out / "report.html").resolve()
        # The run's own head profile (the organism's shipped one), so the heatmaps show the heads
        # that ACS-Free decided with rather than each candidate's lowest-entropy ones.
        rep = build_report(cfg.output, str(report), profile_path=summary["profile"])
        print(f"demo: report has {rep['gallery']} gallery queries, {rep['heatmaps']} heatmaps, "
              f"plots: {', '.join(rep['plots']) or 'none'}")
        for note in rep["notes"]:
            print(f"demo: report note: {note}", file=sys.stderr)
        print(f"demo: report -> {report}  (open it in a browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
