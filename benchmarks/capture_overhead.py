"""What attention capture costs on top of candidate sampling, against a naive `generate`.

Four variants run on the same encoded batch of Q queries, each producing K = N + 1 rows of
exactly T generated tokens per query:

  sample           `sample()`: one prefill per query, KV cache repeated to K rows, decode loop
  capture_profile  sample + `capture_rows` for the ACS-Free profile (`--profile`, else
                   `HeadProfile.default`)
  capture_all      sample + `capture_rows` for every layer x head
  naive_eager      a second, eager-attention instance of the same model:
                   `generate(num_return_sequences=K, output_attentions=True, ...)`

Repetitions are interleaved and the variant order rotates each repetition, so drift (thermal,
other load, allocator state) spreads over all variants; medians are reported. Peak memory is
`torch.cuda.max_memory_allocated` growth on CUDA and peak RSS growth (sampled from
/proc/self/statm) on CPU; the attention bytes each variant materialises are computed analytically
as a cross-check. The last stdout line is one JSON object with every figure.

Fairness assumptions, checked at run time:
* Every variant generates exactly T tokens per row: `sample` gets an adapter whose EOS id can never
  be drawn, `generate` gets `min_new_tokens=T`. Per-row token counts are printed and asserted.
* Random-weight models write no boxes, so the parser finds no coordinate tokens. Capture instead
  reads a fixed set of rows per candidate (`wanted_positions`): R (default 4) generated-token
  indices spread evenly over the T tokens, the last one always included. `capture_rows` feeds
  tokens up to the last wanted index, so including T - 1 makes the capture pass feed all T tokens:
  an upper bound on the capture cost of a real box (whose coordinates end before the label).
* All three `sample` variants run through the installed capture attention function ("acs_capture",
  SDPA plus a context-variable lookup), as `Grounder` does; only capture_* activate it.

Run `python -m benchmarks.capture_overhead --help`; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.memory import PeakMemory

VARIANTS = ("sample", "capture_profile", "capture_all", "naive_eager")
DEFAULT_IMAGE_SIZE = {"tiny": "448x448", "7b": "896x868"}  # 16x16 = 256 and 32x31 = 992 visual tokens
DEFAULT_LAYERS = {"tiny": None, "7b": 2}  # None: the shape's own
DEFAULT_VISION_LAYERS = {"tiny": None, "7b": 2}
MERGED_PX = 28  # Qwen2.5-VL: 14-px patches merged 2x2 -> one visual token per 28x28 px


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.capture_overhead",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["tiny", "7b"], default="7b",
                    help="random-weight model shape to build (ignored with --model)")
    ap.add_argument("--layers", type=int, default=None, help="text layers (default: 2 for 7b, 4 for tiny)")
    ap.add_argument("--vision-layers", type=int, default=None,
                    help="vision blocks (default: 2 for 7b, the shape's own for tiny); the vision "
                         "tower is identical across the sampling variants, shortening it keeps CPU runs short")
    ap.add_argument("--model", default=None, help="existing model directory (skips building one)")
    ap.add_argument("--profile", default=None,
                    help="ACS-Free head profile JSON for capture_profile (default: the layer-based default profile)")
    ap.add_argument("--num-candidates", type=int, default=10, help="sampled candidates N (K = N + 1)")
    ap.add_argument("--queries", type=int, default=4, help="queries Q in the batch")
    ap.add_argument("--image-size", default=None,
                    help="WxH the synthetic images are resized to (default 896x868 for 7b, 448x448 for tiny)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed repetitions per variant first")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="tokens T generated per row")
    ap.add_argument("--wanted-rows", type=int, default=4, help="rows R captured per candidate")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                    help="default bf16 on cuda, fp32 on cpu (bf16 matmuls on CPU are slow)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.layers is None:
        args.layers = DEFAULT_LAYERS[args.shape]
    if args.vision_layers is None:
        args.vision_layers = DEFAULT_VISION_LAYERS[args.shape]
    w, _, h = (args.image_size or DEFAULT_IMAGE_SIZE[args.shape]).lower().partition("x")
    args.width, args.height = int(w), int(h)
    if min(args.num_candidates, args.queries, args.reps, args.max_new_tokens, args.wanted_rows) < 1:
        ap.error("--num-candidates, --queries, --reps, --max-new-tokens and --wanted-rows must be >= 1")
    return args


# ---- inputs ---------------------------------------------------------------------------------------
def build_queries(n: int, size: tuple[int, int]) -> tuple[list, list[str], list[str]]:
    """Images, categories and keys of the first `n` synthetic test scenes that have a query."""
    from pipeline.organism.scenes import make_scene

    images, cats, keys = [], [], []
    i = 0
    while len(images) < n:
        scene = make_scene("shapes", "test", i)
        qs = scene.queries()
        if qs:  # a scene whose categories all repeat has no valid query
            images.append(scene.image.resize(size))
            cats.append(qs[0][0])
            keys.append(f"shapes/test/{i}")
        i += 1
    return images, cats, keys


def wanted_positions(t: int, r: int) -> list[int]:
    """R generated-token indices spread evenly over 0..t-1, ending at t-1 (fewer if t < r)."""
    return sorted({round(t - 1 - j * (t - 1) / r) for j in range(r)})


class NeverEos:
    """An adapter view whose EOS id is -1, which no token has: `sample` then always runs T steps."""

    eos_token_ids = [-1]

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)


# ---- measurement ----------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _malloc_trim() -> None:
    # Give freed heap back to the OS so one variant's leftovers do not hide the next one's growth.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _settle(device: str) -> None:
    """Before a measured block: free what the previous variant left, so it does not count."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


@contextmanager
def count_forwards(model):
    """Count top-level forward calls (prefill + decode steps + capture pass)."""
    box = [0]
    handle = model.register_forward_pre_hook(lambda *_: box.__setitem__(0, box[0] + 1))
    try:
        yield box
    finally:
        handle.remove()


# ---- variants -------------------------------------------------------------------------------------
def run_variant(name: str, ctx: dict) -> dict:
    """One timed run of a variant; returns wall time, peak memory and what it generated."""
    from pipeline.sampling import capture_rows, sample

    dev, enc, t = ctx["device"], ctx["enc"], ctx["T"]
    rec: dict = {}
    model = ctx["eager"].model if name == "naive_eager" else ctx["adapter"].model
    _settle(dev)
    with PeakMemory(dev) as mem, count_forwards(model) as fwd:
        _sync(dev)
        t0 = time.perf_counter()
        if name == "naive_eager":
            torch.manual_seed(ctx["seed"])  # same samples every repetition
            out = model.generate(**enc.inputs, do_sample=True, num_return_sequences=ctx["K"],
                                 output_attentions=True, return_dict_in_generate=True,
                                 max_new_tokens=t, min_new_tokens=t, top_k=0,
                                 top_p=ctx["cfg"].top_p, temperature=ctx["cfg"].temperature)
            _sync(dev)
            t1 = time.perf_counter()
            prompt_len = enc.inputs["input_ids"].shape[1]
            rec["tokens_per_row"] = sorted({out.sequences.shape[1] - prompt_len})
            rec["rows"] = out.sequences.shape[0]
            rec["attn_steps"] = len(out.attentions)
            rec["attn_retained_bytes"] = sum(a.numel() * a.element_size()
                                             for step in out.attentions for a in step)
        else:
            gen = sample(ctx["never_eos"], enc, ctx["cfg"], ctx["keys"])
            _sync(dev)
            t1 = time.perf_counter()
            rec["tokens_per_row"] = sorted({len(x) for x in gen.tokens})
            rec["rows"] = len(gen.tokens)
            if name != "sample":
                layers, heads = ctx["layers_heads"][name]
                wanted = [ctx["wanted"]] * len(gen.tokens)
                maps = capture_rows(ctx["adapter"], enc, gen, wanted, layers, heads)
                _sync(dev)
                rec["capture_only_s"] = time.perf_counter() - t1
                t1 = time.perf_counter()
                rec["maps_shape"] = list(maps[0].shape)
                del maps
            del gen
        rec["s"] = t1 - t0
        if name == "naive_eager":
            del out
    rec["peak_mb"] = mem.delta / 2**20
    rec["forwards"] = fwd[0]
    return rec


def analytic_bytes(ctx: dict) -> dict[str, int]:
    """Attention bytes each variant materialises, from the shapes alone.

    naive: every step keeps L x H x rows x q_len x k_len weights in the model dtype (prefill
    q_len = k_len = P, then q_len = 1, k_len = P + t); text layers only, vision attention not counted.
    capture: rows x R x L_sel x H_sel x V float32 probabilities (the scores before the softmax are
    the same size again, transiently).
    """
    p, t, rows = ctx["P"], ctx["T"], ctx["Q"] * ctx["K"]
    nl, nh = ctx["L"], ctx["H"]
    elem = torch.finfo(ctx["eager"].model.dtype).bits // 8
    naive = nl * nh * rows * (p * p + sum(p + s for s in range(1, t))) * elem
    out = {"naive_eager": naive, "sample": 0}
    for name in ("capture_profile", "capture_all"):
        layers, heads = ctx["layers_heads"][name]
        out[name] = rows * len(ctx["wanted"]) * len(layers) * len(heads) * ctx["V"] * 4
    return out


# ---- report ---------------------------------------------------------------------------------------
def _ratio(a, b):
    return None if a is None or b is None or b <= 0 else a / b


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def log(args, msg: str) -> None:
    if not args.json_only:
        print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.json_only:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight loading/saving bars would clutter stderr
        hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="acs-bench-") as tmp:
        return _run(args, tmp)


def _run(args, tmp: str) -> int:
    from pipeline.capture import install
    from pipeline.models.base import load_adapter
    from pipeline.sampling import SamplingConfig
    from pipeline.scoring import HeadProfile

    t_setup = time.perf_counter()
    if args.model:
        model_dir = args.model
        meta = Path(model_dir) / "acs_model.json"  # written by make_tiny_model; absent for real checkpoints
        shape = json.loads(meta.read_text()).get("shape", "custom") if meta.exists() else "custom"
    else:
        from pipeline.models.tiny import make_tiny_model

        # Room for the requested image: the processor scales anything above max_pixels down.
        max_pixels = (math.ceil(args.width / MERGED_PX) * MERGED_PX) * (math.ceil(args.height / MERGED_PX) * MERGED_PX)
        log(args, f"building a random {args.shape} model (layers={args.layers or 'default'}, "
                  f"vision_layers={args.vision_layers or 'default'}, {args.dtype}) in {tmp}")
        model_dir = str(make_tiny_model(tmp, shape=args.shape, layers=args.layers, dtype=args.dtype,
                                        vision_layers=args.vision_layers, seed=args.seed,
                                        max_pixels=max(max_pixels, 56 * 56)))
        shape = args.shape
    adapter = load_adapter(model_dir, device=args.device, dtype=args.dtype)
    eager = load_adapter(model_dir, device=args.device, dtype=args.dtype, attn_implementation="eager")
    install(adapter.model)  # as Grounder does: sample and capture share the capture attention function
    text_cfg = adapter.model.config.get_text_config()
    nl, nh = adapter.num_layers, adapter.num_heads

    images, cats, keys = build_queries(args.queries, (args.width, args.height))
    enc = adapter.encode(images, cats)
    vis = [int(p.numel()) for p in enc.visual_positions]
    expected_vis = round(args.width / MERGED_PX) * round(args.height / MERGED_PX)
    if vis[0] != expected_vis:
        log(args, f"warning: {vis[0]} visual tokens per image, expected {expected_vis} for "
                  f"{args.width}x{args.height}; the model dir's processor max_pixels may be smaller")

    # A fitted profile's heads spread over the layers: capture reads the layers x heads they span,
    # as Grounder does with --capture profile.
    profile = HeadProfile.load(args.profile, nl, nh) if args.profile else HeadProfile.default(adapter.model_id, nl, nh)
    dev = adapter.model.device
    cfg = SamplingConfig(num_candidates=args.num_candidates, max_new_tokens=args.max_new_tokens,
                         seed=args.seed)
    ctx = dict(device=args.device, enc=enc, T=args.max_new_tokens, K=args.num_candidates + 1,
               Q=args.queries, P=enc.inputs["input_ids"].shape[1], V=max(vis), L=nl, H=nh,
               cfg=cfg, keys=keys, seed=args.seed, adapter=adapter, eager=eager,
               never_eos=NeverEos(adapter), wanted=wanted_positions(args.max_new_tokens, args.wanted_rows),
               layers_heads={
                   "capture_profile": (profile.layers,
                                       torch.tensor(sorted({h for _, h in profile.heads}), device=dev)),
                   "capture_all": (list(range(nl)), torch.arange(nh, device=dev)),
               })
    setup_s = time.perf_counter() - t_setup
    log(args, f"setup {setup_s:.1f}s: L={nl} H={nh} KVH={text_cfg.num_key_value_heads} "
              f"hidden={text_cfg.hidden_size} Q={args.queries} K={ctx['K']} T={ctx['T']} "
              f"P={ctx['P']} visual/query={vis[0]} wanted={ctx['wanted']} "
              f"profile layers={profile.layers} device={args.device} dtype={args.dtype}")

    recs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    total = args.warmup + args.reps
    for rep in range(total):
        order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]
        for name in order:
            rec = run_variant(name, ctx)
            timed = rep >= args.warmup
            log(args, f"  {'rep' if timed else 'warmup'} {rep - args.warmup if timed else rep}: "
                      f"{name:<16} {rec['s']:.3f}s peak {_fmt(rec['peak_mb'], '.1f')} MB")
            if timed:
                recs[name].append(rec)

    # Equal work: every variant generated exactly T tokens in every row.
    tokens = {v: sorted({n for r in recs[v] for n in r["tokens_per_row"]}) for v in VARIANTS}
    rows = {v: sorted({r["rows"] for r in recs[v]}) for v in VARIANTS}
    bad = {v: (tokens[v], rows[v]) for v in VARIANTS
           if tokens[v] != [ctx["T"]] or rows[v] != [ctx["Q"] * ctx["K"]]}
    if bad:
        raise RuntimeError(f"unequal work: expected {ctx['Q'] * ctx['K']} rows of {ctx['T']} tokens, "
                           f"got (tokens per row, rows) {bad}")

    med = {v: _median([r["s"] for r in recs[v]]) for v in VARIANTS}
    cap = {v: _median([r.get("capture_only_s") for r in recs[v]]) for v in VARIANTS}
    mem = {v: _median([r["peak_mb"] for r in recs[v]]) for v in VARIANTS}
    fwd = {v: recs[v][-1]["forwards"] for v in VARIANTS}
    attn = analytic_bytes(ctx)
    retained = recs["naive_eager"][-1]["attn_retained_bytes"]

    if not args.json_only:
        hdr = (f"{'variant':<16} {'median s':>9} {'x sample':>8} {'capture s':>9} {'peak MB':>9} "
               f"{'x sample':>8} {'attn MB':>9} {'fwd':>4} {'tok/row':>7}")
        print(f"capture_overhead: shape={shape} L={nl} H={nh} visual_tokens={vis[0]} Q={args.queries} "
              f"N={args.num_candidates} T={ctx['T']} reps={args.reps} device={args.device} dtype={args.dtype}")
        print(hdr)
        print("-" * len(hdr))
        for v in VARIANTS:
            print(f"{v:<16} {med[v]:>9.4f} {_fmt(_ratio(med[v], med['sample']), '.2f'):>8} "
                  f"{_fmt(cap[v], '.4f'):>9} {_fmt(mem[v], '.1f'):>9} "
                  f"{_fmt(_ratio(mem[v], mem['sample']), '.2f'):>8} {attn[v] / 2**20:>9.1f} "
                  f"{fwd[v]:>4} {','.join(map(str, tokens[v])):>7}")
        print(f"naive attentions retained {retained / 2**20:.1f} MB over {recs['naive_eager'][-1]['attn_steps']} "
              f"steps (analytic {attn['naive_eager'] / 2**20:.1f} MB); memory = "
              f"{'CUDA max_memory_allocated' if args.device == 'cuda' else 'peak RSS'} growth")

    result = {
        "benchmark": "capture_overhead", "shape": shape, "model_dir": args.model, "layers": nl, "heads": nh,
        "kv_heads": text_cfg.num_key_value_heads, "hidden": text_cfg.hidden_size,
        "vision_layers": adapter.model.config.vision_config.depth,
        "visual_tokens": vis[0], "prompt_len": ctx["P"], "image_size": [args.width, args.height],
        "queries": args.queries, "N": args.num_candidates, "K": ctx["K"], "T": ctx["T"],
        "wanted_rows": ctx["wanted"], "profile_layers": profile.layers,
        "profile_heads": len(ctx["layers_heads"]["capture_profile"][1]),
        "device": args.device, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
        "reps": args.reps, "warmup": args.warmup,
        "sample_s": med["sample"], "capture_profile_s": med["capture_profile"],
        "capture_all_s": med["capture_all"], "naive_eager_s": med["naive_eager"],
        "capture_only_profile_s": cap["capture_profile"], "capture_only_all_s": cap["capture_all"],
        "ratio_profile": _ratio(med["capture_profile"], med["sample"]),
        "ratio_all": _ratio(med["capture_all"], med["sample"]),
        "ratio_naive": _ratio(med["naive_eager"], med["sample"]),
        "speedup_vs_naive": _ratio(med["naive_eager"], med["capture_all"]),
        "speedup_profile_vs_naive": _ratio(med["naive_eager"], med["capture_profile"]),
        "memory_source": "cuda_max_memory_allocated" if args.device == "cuda" else "peak_rss_growth",
        "sample_peak_mb": mem["sample"], "capture_profile_peak_mb": mem["capture_profile"],
        "capture_all_peak_mb": mem["capture_all"], "naive_eager_peak_mb": mem["naive_eager"],
        "mem_ratio_profile": _ratio(mem["capture_profile"], mem["sample"]),
        "mem_ratio_all": _ratio(mem["capture_all"], mem["sample"]),
        "mem_ratio_vs_naive": _ratio(mem["naive_eager"], mem["capture_all"]),
        "attn_analytic_mb": {v: attn[v] / 2**20 for v in VARIANTS},
        "naive_attn_retained_mb": retained / 2**20,
        "forward_passes": fwd, "tokens_per_row": tokens,
        "times_s": {v: [r["s"] for r in recs[v]] for v in VARIANTS},
        "setup_s": setup_s,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
