"""`acs label` end to end (Ray Data, local instance) vs a plain in-process loop, same queries/model/N.

    python -m benchmarks.pipeline_vs_loop [--model organism] [--images 12] [--num-candidates 10]
        [--actors 1 --cpus-per-actor 1]

Both write nothing the other reads; the loop calls the same `Grounder` in batches of the same size,
at the same (the model's own) temperature. Order alternates across --reps; medians; one JSON line
at the end. Besides the end-to-end ratio it reports the fixed costs apart: the loop's model load,
and the job's start-up (`timings.startup_s` of `acs label`: from the listing to the first batch
of results, less that batch's own compute: the actor process, its imports and its model load,
Ray Data's executor). `steady_ratio` divides what is left, the per-query cost that a long job pays.

    # profile the job at a size where fixed costs no longer dominate (py-spy is in the test extra):
    py-spy record --subprocesses --format raw -o out/job.txt -- \
        python -m benchmarks.pipeline_vs_loop --images 134 --reps 1 --only pipeline
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def cpu_times() -> tuple[float, float] | None:
    """(busy, idle) CPU-seconds of the whole machine so far, from /proc/stat (Linux; else None):
    whether a slower side left cores idle or fought for them."""
    import os

    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:8]]  # user nice system idle iowait irq softirq
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / tick, (v[3] + v[4]) / tick


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_vs_loop", description=__doc__)
    ap.add_argument("--model", default="organism")
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--num-candidates", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", choices=("loop", "pipeline"), default=None, help="run one side (for a profiler)")
    ap.add_argument("--actors", type=int, default=1, help="the job's ACS actors (acs label --actors)")
    ap.add_argument("--cpus-per-actor", type=float, default=1.0, help="acs label --cpus-per-actor")
    args = ap.parse_args(argv)

    from benchmarks.common import emit, median
    from pipeline.assets import default_paths, default_temperature
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
        # The job samples at the model's own temperature by default; the loop must too.
        sampling = SamplingConfig(num_candidates=args.num_candidates,
                                  temperature=default_temperature(args.model, None))

        def loop() -> tuple[float, float]:
            t0 = time.perf_counter()
            g = Grounder(load_adapter(args.model), GroundConfig(sampling=sampling, profile_path=profile,
                                                                 regressor_path=regressor))
            loaded = time.perf_counter() - t0
            for b in range(0, len(listed), args.batch_size):
                chunk = listed[b:b + args.batch_size]
                g.ground([Query(q["query_id"], read_image(q["image_uri"]), q["category"],
                                (q["gt_x1"], q["gt_y1"], q["gt_x2"], q["gt_y2"])) for q in chunk])
            return time.perf_counter() - t0, loaded

        def pipeline(rep: int) -> tuple[float, float]:
            t0 = time.perf_counter()
            summary = run_label(LabelConfig(output=str(tmp / f"out{rep}"), coco=str(tmp / "data" / "annotations.json"),
                                            images=str(tmp / "data"), model=args.model,
                                            num_candidates=args.num_candidates, batch_size=args.batch_size,
                                            actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                                            progress=False))
            return time.perf_counter() - t0, summary["timings"]["startup_s"]

        import ray

        ray.init(num_cpus=None, include_dashboard=False, log_to_driver=False)  # started outside the timing
        times = {"loop": [], "pipeline": []}
        cpu = {"loop": [], "pipeline": []}  # (busy, idle) CPU-s of the machine during each side
        sides = (args.only,) if args.only else ("loop", "pipeline")
        for rep in range(args.reps):
            order = sides if rep % 2 == 0 else sides[::-1]
            for name in order:
                c0 = cpu_times()
                times[name].append(loop() if name == "loop" else pipeline(rep))
                c1 = cpu_times()
                if c0 and c1:
                    cpu[name].append((c1[0] - c0[0], c1[1] - c0[1]))
        ray.shutdown()
        res = {"benchmark": "pipeline_vs_loop", "model": args.model, "queries": len(listed), "N": args.num_candidates,
               "temperature": sampling.temperature, "reps": args.reps, "actors": args.actors,
               "cpus_per_actor": args.cpus_per_actor}
        for name, runs in times.items():
            if runs:
                res[f"{name}_s"] = median([t for t, _ in runs])
                res[f"{name}_fixed_s"] = median([f for _, f in runs])  # loop: model load; job: start-up
            if cpu[name]:
                res[f"{name}_cpu_busy_s"] = median([b for b, _ in cpu[name]])
                res[f"{name}_cpu_idle_s"] = median([i for _, i in cpu[name]])
                print(f"{name}: the machine's CPUs busy {res[f'{name}_cpu_busy_s']:.1f} s, idle "
                      f"{res[f'{name}_cpu_idle_s']:.1f} s (CPU-seconds, median)")
        if len(times["loop"]) and len(times["pipeline"]):
            lm, pm = res["loop_s"], res["pipeline_s"]
            res.update(ratio=pm / lm, steady_ratio=(pm - res["pipeline_fixed_s"]) / (lm - res["loop_fixed_s"]),
                       queries_per_s_pipeline=len(listed) / pm)
            print(f"{len(listed)} queries, N={args.num_candidates}, T {sampling.temperature:g}, job with "
                  f"{args.actors} actor(s) x {args.cpus_per_actor:g} CPU: loop {lm:.1f} s "
                  f"(model load {res['loop_fixed_s']:.1f} s), pipeline {pm:.1f} s (start-up "
                  f"{res['pipeline_fixed_s']:.1f} s): ratio {res['ratio']:.2f}, without the fixed costs "
                  f"{res['steady_ratio']:.2f} (Ray start-up excluded)")
        emit(res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
