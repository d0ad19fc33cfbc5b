"""`acs label` end to end (Ray Data, local instance) vs a plain in-process loop, same queries/model/N.

    python -m benchmarks.pipeline_vs_loop [--model organism] [--images 12] [--num-candidates 10]

Both write nothing the other reads; the loop calls the same `Grounder` in batches of the same size.
Order alternates across --reps; medians; one JSON line at the end.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_vs_loop", description=__doc__)
    ap.add_argument("--model", default="organism")
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--num-candidates", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)

    from benchmarks.common import emit, median
    from pipeline.assets import default_paths
    from pipeline.ground import GroundConfig, Grounder, Query
    from pipeline.images import read_image
    from pipeline.inputs import list_coco
    from pipeline.label import LabelConfig, run_label
    from pipeline.models.base import load_adapter
    from pipeline.sampling import SamplingConfig
    from pipeline.organism.scenes import make_synthetic

    tmp = Path(tempfile.mkdtemp(prefix="acs-bench-"))
    try:
        make_synthetic(str(tmp / "data"), "shapes", "test", args.images, seed=0)
        listed = [q for q in list_coco(str(tmp / "data" / "annotations.json"), str(tmp / "data")) if not q["pre_status"]]
        profile, regressor = default_paths(args.model, None, None)
        sampling = SamplingConfig(num_candidates=args.num_candidates)

        def loop() -> float:
            t0 = time.perf_counter()
            g = Grounder(load_adapter(args.model), GroundConfig(sampling=sampling, profile_path=profile,
                                                                 regressor_path=regressor))
            for b in range(0, len(listed), args.batch_size):
                chunk = listed[b:b + args.batch_size]
                g.ground([Query(q["query_id"], read_image(q["image_uri"]), q["category"],
                                (q["gt_x1"], q["gt_y1"], q["gt_x2"], q["gt_y2"])) for q in chunk])
            return time.perf_counter() - t0

        def pipeline(rep: int) -> float:
            t0 = time.perf_counter()
            run_label(LabelConfig(output=str(tmp / f"out{rep}"), coco=str(tmp / "data" / "annotations.json"),
                                  images=str(tmp / "data"), model=args.model, num_candidates=args.num_candidates,
                                  batch_size=args.batch_size, progress=False))
            return time.perf_counter() - t0

        import ray

        ray.init(num_cpus=None, include_dashboard=False, log_to_driver=False)  # started outside the timing
        times = {"loop": [], "pipeline": []}
        for rep in range(args.reps):
            order = ("loop", "pipeline") if rep % 2 == 0 else ("pipeline", "loop")
            for name in order:
                times[name].append(loop() if name == "loop" else pipeline(rep))
        ray.shutdown()
        lm, pm = median(times["loop"]), median(times["pipeline"])
        print(f"{len(listed)} queries, N={args.num_candidates}: loop {lm:.1f} s, pipeline {pm:.1f} s, "
              f"ratio {pm / lm:.2f} (both include model load; Ray start-up excluded)")
        emit({"benchmark": "pipeline_vs_loop", "model": args.model, "queries": len(listed), "N": args.num_candidates,
              "loop_s": lm, "pipeline_s": pm, "ratio": pm / lm, "reps": args.reps,
              "queries_per_s_pipeline": len(listed) / pm})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
