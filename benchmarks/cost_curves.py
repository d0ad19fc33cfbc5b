"""What a query costs as N and the image grow: wall time and peak memory per query, capture on/off.

    python -m benchmarks.cost_curves [--model organism] [--queries 16] [--ns 1,5,10,20]
        [--sizes 640x480,1024x768,1280x960] [--size-layers 2] [--device cpu|cuda] [--dtype ...]

Two curves, each through `Grounder` exactly as `acs label` runs a batch (box-only decoding):
  N curve     the model (default: the organism) on `--queries` shapes/test queries in batches of
              `--batch-size`, for each N with `--capture none` and `--capture all`.
  image curve a random-weight Qwen2.5-VL-7B-shaped model (`--size-layers` text layers,
              `--size-vision-layers` vision blocks; real widths and heads) at each image size, N = 10, one batch of
              `--size-queries`. Random weights never close a box, so every candidate decodes
              `--size-tokens` tokens: roughly a fenced box's length for Qwen's digit-split numbers.
Each setting runs once untimed, then `--reps` timed; the median per query is reported, with the
peak memory growth of the batch (RSS on CPU, allocated on CUDA). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time


def _time_setting(grounder, batches, reps: int, device: str) -> dict:
    import torch

    from pipeline.memory import PeakMemory

    def run():
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = 0
        for b in batches:
            tokens += sum(r.timings.get("generated_tokens", 0) for r in grounder.ground(b))
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, tokens

    run()  # warm-up: allocator, kernels, the capture function's first use
    times, peaks, tokens = [], [], 0
    for _ in range(reps):
        with PeakMemory(device) as mem:
            s, tokens = run()
        times.append(s)
        peaks.append(mem.delta / 2**20)
    n = sum(len(b) for b in batches)
    return {"queries": n, "s_per_query": statistics.median(times) / n, "peak_mb": max(peaks),
            "tokens_per_query": tokens / n}


def n_curve(args) -> list[dict]:
    from pipeline.assets import default_temperature
    from pipeline.ground import GroundConfig, Grounder
    from pipeline.models.base import load_adapter
    from pipeline.organism.scenes import grounding_queries
    from pipeline.sampling import SamplingConfig

    adapter = load_adapter(args.model, device=args.device, dtype=args.dtype)
    items = [q for q, _ in grounding_queries("shapes", "test", args.queries)]
    batches = [items[b:b + args.batch_size] for b in range(0, len(items), args.batch_size)]
    t = default_temperature(args.model, None)
    rows = []
    for n in [int(x) for x in args.ns.split(",")]:
        for capture in ("none", "all"):
            g = Grounder(adapter, GroundConfig(sampling=SamplingConfig(num_candidates=n, temperature=t),
                                               capture=capture))
            r = {"curve": "N", "model": args.model, "N": n, "capture": capture,
                 **_time_setting(g, batches, args.reps, args.device)}
            print(f"N={n:<3} capture {capture:<4}: {1000 * r['s_per_query']:8.1f} ms/query, "
                  f"peak +{r['peak_mb']:7.1f} MB, {r['tokens_per_query']:.0f} tokens/query", flush=True)
            rows.append(r)
    return rows


def size_curve(args, tmp: str) -> list[dict]:
    from pipeline.ground import GroundConfig, Grounder
    from pipeline.models.base import load_adapter
    from pipeline.models.tiny import make_tiny_model
    from pipeline.organism.scenes import grounding_queries
    from pipeline.sampling import SamplingConfig

    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    # Room for the largest image: the processor scales anything above max_pixels down.
    max_pixels = max(math.ceil(w / 28) * 28 * math.ceil(h / 28) * 28 for w, h in sizes)
    build_dtype = {"bf16": "bf16", "fp32": "fp32"}.get(args.dtype)  # auto: the builder's own default
    path = make_tiny_model(tmp, shape="7b", layers=args.size_layers,
                           vision_layers=args.size_vision_layers or args.size_layers,
                           dtype=build_dtype, max_pixels=max_pixels)
    adapter = load_adapter(str(path), device=args.device, dtype=args.dtype)
    base = [q for q, _ in grounding_queries("shapes", "test", args.size_queries)]
    rows = []
    for w, h in sizes:
        for q in base:
            q.image = q.image.resize((w, h))
        for capture in ("none", "all"):
            g = Grounder(adapter, GroundConfig(sampling=SamplingConfig(num_candidates=10,
                                                                       max_new_tokens=args.size_tokens),
                                               capture=capture))
            r = {"curve": "image", "model": f"7b shape, {args.size_layers} layers", "size": f"{w}x{h}",
                 "visual_tokens": round(w / 28) * round(h / 28), "N": 10, "capture": capture,
                 **_time_setting(g, [base], args.reps, args.device)}
            print(f"{w}x{h} ({r['visual_tokens']} visual tokens) capture {capture:<4}: "
                  f"{r['s_per_query']:8.2f} s/query, peak +{r['peak_mb']:8.1f} MB", flush=True)
            rows.append(r)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cost_curves", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism")
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ns", default="1,5,10,20")
    ap.add_argument("--sizes", default="640x480,1024x768,1280x960", help="empty: skip the image curve")
    ap.add_argument("--size-layers", type=int, default=2, help="text layers of the 7B shape")
    ap.add_argument("--size-vision-layers", type=int, default=None,
                    help="vision blocks of the 7B shape (default: as many as --size-layers; the real 7B has 32)")
    ap.add_argument("--size-queries", type=int, default=1)
    ap.add_argument("--size-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--device", default=None, help="default: cuda if available")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args(argv)

    import torch

    from benchmarks.common import emit

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = n_curve(args) if args.ns else []
    if args.sizes:
        with tempfile.TemporaryDirectory(prefix="acs-cost-") as tmp:
            rows += size_curve(args, tmp)

    def ratio(row):  # capture all over capture none, same setting
        base = next(r for r in rows if r["curve"] == row["curve"] and r["capture"] == "none"
                    and r.get("N") == row.get("N") and r.get("size") == row.get("size"))
        return row["s_per_query"] / base["s_per_query"]

    for r in rows:
        if r["capture"] == "all":
            r["capture_ratio"] = ratio(r)
    emit({"benchmark": "cost_curves", "device": args.device, "dtype": args.dtype, "reps": args.reps, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
