#!/usr/bin/env bash
# One prepared GPU run (about 8 minutes on one H200): the Qwen2.5-VL-7B-shaped random model in
# bf16, N=10, ~1,000 visual tokens. Prints the capture overhead ratios, peak GPU memory, the ACS
# stage's queries per second, the cost curves (N 1/5/10/20 on the organism; the 7B shape at three
# image sizes, capture on and off) and box-only vs full decoding on the organism; every figure
# also as JSON lines in $OUT (default ./out/gpu).
#   bash benchmarks/gpu.sh [TEXT_LAYERS]
set -euo pipefail
LAYERS=${1:-28}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PY:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# Real dimensions, all 28 text layers by default; the full 32-block vision tower.
$PY -m jobs.make_tiny_model "$OUT/qwen7b-shape" --shape 7b --layers "$LAYERS" --dtype bf16
# Fused attention (SDPA) for everything not captured; capture only for the coordinate rows.
$PY -m benchmarks.capture_overhead --model "$OUT/qwen7b-shape" --device cuda --dtype bf16 \
    --queries 8 --num-candidates 10 --max-new-tokens 48 --image-size 896x868 --reps 3 \
    | tee "$OUT/capture_overhead.txt" | tail -n 1 > "$OUT/capture_overhead.json"
# ACS stage throughput (sampling + capture + scoring) over 64 queries, batch 8.
$PY - "$OUT/qwen7b-shape" <<'PY' | tee "$OUT/throughput.json"
import json, sys, time, torch
from pipeline.organism.scenes import grounding_queries
from pipeline.ground import GroundConfig, Grounder
from pipeline.models.base import load_adapter
from pipeline.sampling import SamplingConfig
ad = load_adapter(sys.argv[1], device="cuda", dtype="bf16")
items = [q for q, _ in grounding_queries("shapes", "test", 64)]
for q in items:
    q.image = q.image.resize((896, 868))
g = Grounder(ad, GroundConfig(sampling=SamplingConfig(num_candidates=10, max_new_tokens=48)))
g.ground(items[:8])  # warm-up
torch.cuda.reset_peak_memory_stats(); torch.cuda.synchronize(); t0 = time.perf_counter()
for b in range(0, len(items), 8):
    g.ground(items[b:b + 8])
torch.cuda.synchronize(); dt = time.perf_counter() - t0
print(json.dumps({"benchmark": "acs_stage_gpu", "queries": len(items), "seconds": dt,
                  "queries_per_s": len(items) / dt, "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30}))
PY
# Cost curves: N on the organism, image size on the full-depth 7B shape, capture on and off.
$PY -m benchmarks.cost_curves --device cuda --dtype bf16 --queries 32 --reps 2 --size-layers "$LAYERS" --size-vision-layers 32 \
    --size-queries 4 --sizes 640x480,1024x768,1280x960 | tee "$OUT/cost_curves.txt" | tail -n 1 > "$OUT/cost_curves.json"
# Box-only vs full decoding on the organism (the 7B's random weights never close a box).
$PY -m benchmarks.box_decoding --queries 96 --repeats 2 | tee "$OUT/box_decoding.txt" | tail -n 1 > "$OUT/box_decoding.json"
