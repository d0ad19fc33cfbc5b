"""`acs train-organism`: train the shipped small Qwen2.5-VL on `shapes/train`, on CPU, resumably.

    acs train-organism --out runs/organism --steps 3000 --batch-size 16

Checkpoints go to OUT/ckpt (model, processor, optimizer moments in safetensors, `state.json`);
rerunning the same command resumes from there. `--export DIR` writes the final model where the
package ships it. Logs one JSON line per log interval to OUT/train_log.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch


def _adapter(model, processor):
    from pipeline.models.qwen2_5_vl import Qwen25VLAdapter

    return Qwen25VLAdapter(model, processor, "organism")


def build(seed: int, oc=None):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pipeline.models.tokenizer import build_tokenizer
    from pipeline.organism import OrganismConfig, init_number_embeddings, organism_configs

    tokenizer = build_tokenizer()
    config, processor = organism_configs(oc or OrganismConfig(), tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    init_number_embeddings(model, tokenizer)
    return model, processor


def _save_opt(opt, model, path: Path) -> None:
    from safetensors.torch import save_file

    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                tensors[f"{names[id(p)]}::exp_avg"] = st["exp_avg"].contiguous()
                tensors[f"{names[id(p)]}::exp_avg_sq"] = st["exp_avg_sq"].contiguous()
                tensors[f"{names[id(p)]}::step"] = torch.as_tensor(st["step"]).float().reshape(1)
    save_file(tensors, str(path))


def _load_opt(opt, model, path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    for name, p in params.items():
        if f"{name}::exp_avg" in tensors:
            opt.state[p] = {"exp_avg": tensors[f"{name}::exp_avg"], "exp_avg_sq": tensors[f"{name}::exp_avg_sq"],
                            "step": tensors[f"{name}::step"].reshape(())}


@torch.inference_mode()
def greedy_eval(adapter, variant: str, split: str, n: int, seed: int = 0, max_objects: int | None = None) -> dict:
    """Greedy Acc@0.5 / mean IoU by size bucket on the first `n` queries of a held-out split (of its
    curriculum scenes of 1 to `max_objects` objects, if given: where it localises vs. which object)."""
    import numpy as np

    from pipeline.metrics import paired_iou, size_bucket, summarize
    from pipeline.sampling import SamplingConfig, sample
    from pipeline.synthetic import grounding_queries

    was_training = adapter.model.training
    adapter.model.eval()
    items = grounding_queries(variant, split, n, max_objects=max_objects)
    ious, buckets, nobox = [], [], 0
    for b in range(0, n, 16):
        chunk = items[b:b + 16]
        enc = adapter.encode([q.image for q, _ in chunk], [q.category for q, _ in chunk])
        gen = sample(adapter, enc, SamplingConfig(num_candidates=0, max_new_tokens=40, seed=seed),
                     [q.query_id for q, _ in chunk])
        for j, (q, area) in enumerate(chunk):
            _, parsed = adapter.parse(gen.tokens[j], enc.input_sizes[j], enc.orig_sizes[j])
            nobox += parsed.box is None
            ious.append(0.0 if parsed.box is None else float(paired_iou(np.array([parsed.box]), np.array([q.gt]))[0]))
            buckets.append(size_bucket(area))
    adapter.model.train(was_training)
    out = summarize(np.array(ious), np.array(buckets))
    out["no_box_share"] = nobox / n
    return out


def _visual_tokens(model, enc) -> torch.Tensor:
    """The visual tokens the language model receives for an encoded batch, as one (tokens, dim)."""
    vis = model.model.get_image_features(enc.inputs["pixel_values"], enc.inputs["image_grid_thw"])
    vis = getattr(vis, "pooler_output", vis)
    return (torch.cat(list(vis)) if isinstance(vis, (list, tuple)) else vis).float()


def _content(vis: torch.Tensor) -> float:
    """Spread of visual tokens around their mean token, over the mean's norm (near 0: the tower
    sends one constant vector)."""
    center = vis.mean(0)
    return ((vis - center).norm(dim=-1).mean() / center.norm().clamp_min(1e-9)).item()


@torch.inference_mode()
def image_dependence(adapter, n: int = 16, seed: int = 0, max_objects: int | None = None) -> dict:
    """Does the model look at the image? Cross-entropy of each box coordinate (x1, y1, x2, y2) of
    `n` calib answers with their own images and with the images rotated by one within the batch.
    Equal values mean the coordinates ignore the image (this organism's plateau: see its model
    card); a gap on x2/y2 only means the model reads the object's size but not its position.
    `max_objects` measures on the curriculum's scenes instead of the real calib distribution."""
    from pipeline.organism import Batcher, training_inputs

    was_training = adapter.model.training
    adapter.model.eval()
    enc, conts, _ = Batcher(adapter, split="calib", seed=seed, turns=1, max_objects=max_objects).batch(0, n)
    number_ids = torch.tensor(adapter.tokenizer.convert_tokens_to_ids([str(i) for i in range(1024)]))

    def coord_ce() -> list[float]:
        inputs, labels = training_inputs(enc, conts, adapter.pad_token_id)
        logits = adapter.model(**inputs).logits[:, :-1].float()
        lab = labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                               ignore_index=-100, reduction="none").reshape(lab.shape)
        # The coordinates are the answer's last four number tokens ("bbox_2d" holds a "2" too).
        coords = [ce[i][torch.isin(lab[i], number_ids)][-4:] for i in range(n)]
        return torch.stack(coords).mean(0).tolist()

    own = coord_ce()
    # The visual tokens the language model receives: their mean norm, and their spread around the
    # batch's mean token relative to that mean (near 0: the tower sends one constant vector).
    vis = _visual_tokens(adapter.model, enc)
    pv = enc.inputs["pixel_values"]
    per = pv.shape[0] // n  # same-size images: equal patch counts per image
    enc.inputs["pixel_values"] = torch.cat([pv[((i + 1) % n) * per:((i + 1) % n + 1) * per] for i in range(n)])
    swapped = coord_ce()
    enc.inputs["pixel_values"] = pv
    adapter.model.train(was_training)
    names = ("x1", "y1", "x2", "y2")
    own_mean, swapped_mean = sum(own) / 4, sum(swapped) / 4
    return {"coord_ce_own_image": own_mean, "coord_ce_other_image": swapped_mean,
            "gap": swapped_mean - own_mean,
            "gap_per_coordinate": {k: round(b - a, 4) for k, a, b in zip(names, own, swapped)},
            "visual_token_norm": vis.norm(dim=-1).mean().item(), "visual_content": _content(vis)}


@torch.inference_mode()
def premise_eval(adapter, variant: str = "shapes", split: str = "calib", n: int = 96,
                 temperatures=(0.7, 1.0, 1.3), num_candidates: int = 10) -> dict:
    """What ACS needs from the organism, per sampling temperature, on held-out queries:
    oracle room on small objects (best-of-N minus greedy Acc@0.5), no-box share, and the best
    within-query Spearman of any head's entropy with IoU."""
    import numpy as np

    from pipeline.ground import GroundConfig, Grounder
    from pipeline.metrics import mean_within_group_spearman, size_bucket, summarize
    from pipeline.sampling import SamplingConfig
    from pipeline.synthetic import grounding_queries

    was_training = adapter.model.training
    adapter.model.eval()
    items = grounding_queries(variant, split, n)
    buckets = np.array([str(size_bucket(a)) for _, a in items])
    out = {}
    for t in temperatures:
        g = Grounder(adapter, GroundConfig(sampling=SamplingConfig(num_candidates=num_candidates, temperature=t)))
        res = []
        for b in range(0, len(items), 8):
            res += g.ground([q for q, _ in items[b:b + 8]])
        per = {sel: summarize(np.array([r.candidates[r.selected[sel]].iou if r.selected.get(sel) is not None
                                        else 0.0 for r in res]), buckets) for sel in ("greedy", "oracle")}
        ent, iou, grp = [], [], []
        for qi, r in enumerate(res):
            for c in r.candidates:
                if c.entropy is not None and c.iou is not None:
                    ent.append(c.entropy.mean(0)), iou.append(c.iou), grp.append(qi)
        rho = []
        if ent:
            e = np.stack(ent)  # (M, L, H)
            rho = [mean_within_group_spearman(-e[:, l, h], np.array(iou), np.array(grp))
                   for l in range(e.shape[1]) for h in range(e.shape[2])]
        sampled = [c for r in res for c in r.candidates if c.cand_idx > 0]
        out[str(t)] = {
            "greedy": per["greedy"], "oracle": per["oracle"],
            "oracle_room_small": per["oracle"]["small"]["acc50"] - per["greedy"]["small"]["acc50"],
            "no_box_share_sampled": sum(c.status != "ok" for c in sampled) / max(1, len(sampled)),
            "best_head_spearman": float(np.nanmax(rho)) if rho and np.isfinite(rho).any() else None,
            "median_head_spearman": float(np.nanmedian(rho)) if rho and np.isfinite(rho).any() else None}
    adapter.model.train(was_training)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="acs train-organism", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="run directory (checkpoints, logs)")
    ap.add_argument("--steps", type=int, default=3000, help="total optimiser steps")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=96, help="calib queries per periodic evaluation")
    ap.add_argument("--max-minutes", type=float, default=0, help="stop (after a checkpoint) past this wall time")
    ap.add_argument("--init-from", default=None,
                    help="start from a saved organism (e.g. pipeline/assets/organism) when OUT has no checkpoint: "
                         "weights and step count carry over, the optimizer starts fresh (it is not shipped)")
    ap.add_argument("--premise", action="store_true",
                    help="only evaluate the checkpoint's premise metrics on calib (per temperature) and exit")
    ap.add_argument("--rope-theta", type=float, default=0,
                    help="text rotary base (default: OrganismConfig's 3 for a new model, the checkpoint's with "
                         "--init-from; the shipped organism trained at 30 for 700 steps, then 3: see its model card)")
    ap.add_argument("--reinit-vision", action="store_true",
                    help="with --init-from: keep the language model, start the vision tower and merger afresh")
    ap.add_argument("--text-lr-scale", type=float, default=1.0,
                    help="learning-rate multiplier of the language model")
    ap.add_argument("--vision-lr-scale", type=float, default=1.0,
                    help="learning-rate multiplier of the vision tower and merger")
    ap.add_argument("--freeze-vision-steps", type=int, default=0,
                    help="keep the vision tower fixed for the first N steps of this schedule, so the language "
                         "model learns to read its features before they can change (trained jointly from the "
                         "start, the tower collapsed to one constant vector and the model ignored the image)")
    ap.add_argument("--visual-norm", type=float, default=0,
                    help="at the start of this run, rescale the merger's output layer so the visual tokens' "
                         "mean norm is this (text embeddings sit near 0.6; the from-scratch tower sent ~8.5, "
                         "leaving the language model's updates a small share of each visual token)")
    ap.add_argument("--turns", type=int, default=4,
                    help="queries per training scene, as a multi-turn chat whose first turn is the inference prompt")
    ap.add_argument("--max-objects", type=int, default=None,
                    help="curriculum: training scenes of 1 to K objects instead of 2 to 6 (evaluation uses the "
                         "real calib split, and also reports greedy and image dependence on calib scenes "
                         "of 1 to K objects)")
    ap.add_argument("--input", default=None, metavar="WxH",
                    help="model input size in pixels (default 192x144, or the checkpoint's; changing it keeps the "
                         "weights, which do not depend on resolution, and resizes the processor; what the "
                         "model learnt about positions does not carry over, see the model card)")
    ap.add_argument("--export", default=None, help="write the final model here (e.g. pipeline/assets/organism)")
    args = ap.parse_args(argv)

    from pipeline.organism import Batcher, OrganismConfig, save_checkpoint, set_input_size, training_inputs

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt = out / "ckpt"
    log_path = out / "train_log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    # `schedule_start`: the step this run's warm-up + cosine schedule began (0 from scratch, the
    # prior step count with --init-from, where the optimizer is fresh and needs its own warm-up).
    state = {"step": 0, "next_index": 0, "wall_s": 0.0, "schedule_start": 0}
    if (ckpt / "state.json").exists():
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        state = json.loads((ckpt / "state.json").read_text())
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(ckpt)
        print(f"resuming at step {state['step']}", flush=True)
    elif args.init_from:
        from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration

        config = AutoConfig.from_pretrained(args.init_from)
        if args.rope_theta:  # rotary frequencies are recomputed from the config at load
            config.text_config.rope_parameters["rope_theta"] = args.rope_theta
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.init_from, config=config,
                                                                   dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(args.init_from)
        prior = json.loads((Path(args.init_from) / "acs_model.json").read_text())
        state.update(step=int(prior.get("steps", 0)), next_index=int(prior.get("next_index", 0)),
                     wall_s=float(prior.get("wall_s", 0.0)), schedule_start=int(prior.get("steps", 0)))
        print(f"continuing from {args.init_from} at step {state['step']} (fresh optimizer)", flush=True)
    else:
        new_cfg = OrganismConfig()
        if args.rope_theta:
            new_cfg.rope_theta = args.rope_theta
        model, processor = build(args.seed, new_cfg)
    source = ckpt if (ckpt / "state.json").exists() else Path(args.init_from) if args.init_from else None
    oc = OrganismConfig(**json.loads((source / "acs_model.json").read_text())["organism_config"]) \
        if source is not None else OrganismConfig()
    oc.rope_theta = model.config.text_config.rope_parameters["rope_theta"]
    if args.input:
        w, h = (int(v) for v in args.input.lower().split("x"))
        oc.input_width, oc.input_height = w, h
    set_input_size(processor, oc.input_width, oc.input_height)
    model.config.get_text_config()._attn_implementation = "sdpa"
    adapter = _adapter(model, processor)
    if args.premise:
        result = {"step": state["step"], "premise (shapes/calib)": premise_eval(adapter, n=args.eval_n),
                  "image_dependence": image_dependence(adapter)}
        print(json.dumps(result, indent=1), flush=True)
        with log_path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        return 0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"organism: {n_params / 1e6:.2f}M parameters", flush=True)
    if args.reinit_vision and not (ckpt / "state.json").exists():
        # A fresh vision tower + merger (seeded) under the loaded language model: see --reinit-vision.
        fresh, _ = build(args.seed)
        model.model.visual.load_state_dict(fresh.model.visual.state_dict())
        del fresh
        print("vision tower and merger re-initialised", flush=True)
    if args.visual_norm and not (ckpt / "state.json").exists():
        enc0, _, _ = Batcher(adapter, seed=args.seed, turns=1).batch(0, 8)
        with torch.no_grad():
            factor = args.visual_norm / _visual_tokens(model, enc0).norm(dim=-1).mean().item()
            last = model.model.visual.merger.mlp[-1]
            last.weight.mul_(factor)
            last.bias.mul_(factor)
        print(f"visual tokens rescaled by {factor:.4f} to mean norm {args.visual_norm}", flush=True)
    visual = [p for n, p in model.named_parameters() if ".visual." in f".{n}"]
    vis_ids = {id(p) for p in visual}
    text = [p for p in model.parameters() if id(p) not in vis_ids]
    opt = torch.optim.AdamW([{"params": text, "scale": args.text_lr_scale},
                             {"params": visual, "scale": args.vision_lr_scale, "vision": True}],
                            lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    # How much of the image reaches the language model: per visual token, the norm of its deviation
    # from the batch's mean visual token over the mean's norm. A vision tower that collapses to one
    # constant vector shows here (it happened twice: 0.047 at step 822 and 0.007 at step 1,300,
    # against 2 at initialisation; the coordinates were then independent of the image).
    vstats: list[float] = []

    def _vision_hook(_m, _inp, out):
        vstats.append(_content(out.detach().float()))

    model.model.visual.merger.register_forward_hook(_vision_hook)
    if (ckpt / "optimizer.safetensors").exists():
        _load_opt(opt, model, ckpt / "optimizer.safetensors")

    def lr_at(step: int) -> float:
        start = state.get("schedule_start", 0)
        step -= start
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - start - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    batcher = Batcher(adapter, seed=args.seed, turns=args.turns, max_objects=args.max_objects)
    batcher.rng.seed(args.seed * 1_000_003 + state["step"])  # resume picks the same queries
    model.train()
    t_start = time.time()
    wall0 = state["wall_s"]
    losses = []
    pad = adapter.pad_token_id

    def checkpoint():
        state["wall_s"] = wall0 + time.time() - t_start
        save_checkpoint(model, processor, ckpt, {"model_id": "organism", "family": "qwen2.5-vl",
                                                  "organism_config": asdict(oc),
                                                  "steps": state["step"], "next_index": state["next_index"],
                                                  "wall_s": state["wall_s"]})
        _save_opt(opt, model, ckpt / "optimizer.safetensors")
        (ckpt / "state.json").write_text(json.dumps(state))

    while state["step"] < args.steps:
        step = state["step"]
        enc, answers, nxt = batcher.batch(state["next_index"], args.batch_size)
        inputs, labels = training_inputs(enc, answers, pad)
        frozen = step < state.get("schedule_start", 0) + args.freeze_vision_steps
        if visual and visual[0].requires_grad == frozen:  # a frozen tower needs no backward pass
            for p in visual:
                p.requires_grad_(not frozen)
        for g in opt.param_groups:
            g["lr"] = 0.0 if (frozen and g.get("vision")) else lr_at(step) * g["scale"]
        outputs = model(**inputs)
        logits = outputs.logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        state["step"] = step + 1
        state["next_index"] = nxt
        if state["step"] % 20 == 0:
            rec = {"step": state["step"], "loss": sum(losses) / len(losses), "lr": lr_at(step),
                   "vision_content": round(sum(vstats) / max(1, len(vstats)), 4),
                   "wall_s": round(wall0 + time.time() - t_start, 1)}
            losses = []
            vstats.clear()
            print(json.dumps(rec), flush=True)
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        if state["step"] % args.eval_every == 0 or state["step"] == args.steps:
            ev = greedy_eval(adapter, "shapes", "calib", args.eval_n)
            rec = {"step": state["step"], "eval": "shapes/calib greedy", **{
                k: v for k, v in ev.items()}, "image_dependence": image_dependence(adapter)}
            if args.max_objects:
                rec["image_dependence_curriculum"] = image_dependence(adapter, max_objects=args.max_objects)
                rec["curriculum_greedy"] = greedy_eval(adapter, "shapes", "calib", args.eval_n,
                                                       max_objects=args.max_objects)
            print(json.dumps(rec), flush=True)
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        if state["step"] % args.ckpt_every == 0 or state["step"] == args.steps:
            checkpoint()
        if args.max_minutes and (time.time() - t_start) > args.max_minutes * 60:
            checkpoint()
            print("stopping at the wall-time limit; rerun the same command to resume", flush=True)
            break

    if args.export and state["step"] >= args.steps:
        meta = json.loads((ckpt / "acs_model.json").read_text())
        save_checkpoint(model, processor, Path(args.export), meta)
        print(f"exported to {args.export}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
