"""What the organism can do, measured during training on held-out calib scenes: the premise
metrics that decide when a recipe has done its job (greedy and best-of-N Acc@0.5 per bucket, room
on small objects, head Spearman, no-box share) and whether the model looks at the image at all.

These read the model; none of them feeds the loss (the organism is trained only to ground).
"""

from __future__ import annotations

import numpy as np
import torch


@torch.inference_mode()
def greedy_boxes(adapter, queries: list, seed: int = 0) -> np.ndarray:
    """Greedy box per `pipeline.ground.Query` (N, 4) xyxy in image pixels, NaN where the answer has
    none; 16 queries a batch, the model in eval mode for the call. Full decoding in the training
    probes: every evaluation of a lineage decodes the same way (box-only decoding came in
    mid-lineage; it gives the same greedy boxes, measured in tests)."""
    from ..sampling import SamplingConfig, sample

    was_training = adapter.model.training
    adapter.model.eval()
    boxes = []
    for b in range(0, len(queries), 16):
        chunk = queries[b:b + 16]
        enc = adapter.encode([q.image for q in chunk], [q.category for q in chunk])
        gen = sample(adapter, enc, SamplingConfig(num_candidates=0, max_new_tokens=40, seed=seed, decode="full"),
                     [q.query_id for q in chunk])
        for j in range(len(chunk)):
            _, parsed = adapter.parse(gen.tokens[j], enc.input_sizes[j], enc.orig_sizes[j])
            boxes.append(parsed.box if parsed.box is not None else (float("nan"),) * 4)
    adapter.model.train(was_training)
    return np.array(boxes, dtype=float).reshape(-1, 4)


def greedy_eval(adapter, variant: str, split: str, n: int, seed: int = 0, max_objects: int | None = None) -> dict:
    """Greedy Acc@0.5 / mean IoU by size bucket on the first `n` queries of a held-out split (of its
    curriculum scenes of 1 to `max_objects` objects, if given: where it localises vs. which object)."""
    from ..metrics import answer_outcomes, outcome_table, paired_iou, size_bucket, summarize
    from .scenes import scene_queries

    items = scene_queries(variant, split, n, max_objects=max_objects)
    boxes = greedy_boxes(adapter, [q for q, _, _ in items], seed=seed)
    gts = np.array([q.gt for q, _, _ in items])
    has_box = np.isfinite(boxes).all(1)
    ious = np.where(has_box, paired_iou(np.where(has_box[:, None], boxes, 0.0), gts), 0.0)
    buckets = np.array([size_bucket(area) for _, area, _ in items])
    out = summarize(ious, buckets)
    out["no_box_share"] = float((~has_box).sum()) / n
    # Which object the answer boxed: the target, another object of the scene, near, nowhere.
    out["outcomes"] = outcome_table(answer_outcomes(boxes, gts, [o for _, _, o in items]), buckets)
    return out


def _coordinate_ce(adapter, enc, conts) -> torch.Tensor:
    """(items, 4) cross-entropy of each answer's x1, y1, x2, y2 tokens, prompts `enc` followed by
    the answers `conts`: the answer's last four number tokens ("bbox_2d" holds a "2" too)."""
    from .batcher import training_inputs

    number_ids = torch.tensor(adapter.tokenizer.convert_tokens_to_ids([str(v) for v in range(1024)]))
    inputs, labels = training_inputs(enc, conts, adapter.pad_token_id)
    logits = adapter.model(**inputs).logits[:, :-1].float()
    lab = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                           ignore_index=-100, reduction="none").reshape(lab.shape)
    return torch.stack([ce[i][torch.isin(lab[i], number_ids)][-4:] for i in range(lab.shape[0])])


@torch.inference_mode()
def query_dependence(adapter, n: int = 48, seed: int = 0, max_objects: int | None = None) -> dict:
    """Does the model read the query? Cross-entropy of each box coordinate of `n` calib answers
    with the right category in the prompt and with another object's category *of the same scene*
    (the same image, the same answer). The gap is what knowing which object was asked for is
    worth, in nats per coordinate: 0 means the model boxes some object whatever the query says
    (the shipped step-2,480 organism: about 0.2, against 2-6 for image dependence)."""
    from .scenes import make_scene

    was_training = adapter.model.training
    adapter.model.eval()
    ad = adapter
    rows, i = [], 0
    while len(rows) < n:
        scene = make_scene("shapes", "calib", i, seed=seed, max_objects=max_objects)
        qs = scene.queries()
        if len(qs) >= 2:  # a swap needs another unambiguous object in the same scene
            k = i % len(qs)
            cat, o = qs[k]
            other = qs[(k + 1) % len(qs)][0]
            rows.append((scene.image, cat, other, o.xyxy))
        i += 1
    eos = ad.eos_token_ids[:1]

    def coord_ce(cats) -> torch.Tensor:
        out = []
        for b in range(0, n, 16):
            chunk = rows[b:b + 16]
            enc = ad.encode([r[0] for r in chunk], cats[b:b + 16])
            # The answer is the target's box (and its own label, which follows the coordinates).
            conts = [ad.tokenizer(ad.answer_text(ad.from_original(r[3], isz, osz), r[1]),
                                  add_special_tokens=False)["input_ids"] + eos
                     for r, isz, osz in zip(chunk, enc.input_sizes, enc.orig_sizes)]
            out.append(_coordinate_ce(ad, enc, conts))
        return torch.cat(out).mean(0)

    right = coord_ce([r[1] for r in rows])
    swapped = coord_ce([r[2] for r in rows])
    adapter.model.train(was_training)
    names = ("x1", "y1", "x2", "y2")
    return {"coord_ce_right_query": right.mean().item(), "coord_ce_swapped_query": swapped.mean().item(),
            "gap": (swapped - right).mean().item(),
            "gap_per_coordinate": {k: round(float(v), 4) for k, v in zip(names, swapped - right)}}


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
    from .batcher import Batcher

    was_training = adapter.model.training
    adapter.model.eval()
    enc, conts, *_ = Batcher(adapter, split="calib", seed=seed, turns=1, max_objects=max_objects).batch(0, n)

    def coord_ce() -> list[float]:
        return _coordinate_ce(adapter, enc, conts).mean(0).tolist()

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

    from ..ground import GroundConfig, Grounder
    from ..metrics import answer_outcomes, mean_within_group_spearman, outcome_table, size_bucket, summarize
    from ..sampling import SamplingConfig
    from .scenes import scene_queries

    was_training = adapter.model.training
    adapter.model.eval()
    scened = scene_queries(variant, split, n)
    items = [(q, area) for q, area, _ in scened]
    buckets = np.array([str(size_bucket(a)) for _, a in items])
    out = {}
    for t in temperatures:
        g = Grounder(adapter, GroundConfig(sampling=SamplingConfig(num_candidates=num_candidates, temperature=t,
                                                                   decode="full")))
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
        nan4 = (float("nan"),) * 4
        outcomes = {}
        for name, pick in (("greedy", lambda c: c.cand_idx == 0), ("sampled", lambda c: c.cand_idx > 0)):
            rows = [(c.box or nan4, q.gt, others, bk) for r, (q, _, others), bk in zip(res, scened, buckets)
                    for c in r.candidates if pick(c)]
            outcomes[name] = outcome_table(answer_outcomes(np.array([r[0] for r in rows]).reshape(-1, 4),
                                                           np.array([r[1] for r in rows]).reshape(-1, 4),
                                                           [r[2] for r in rows]), np.array([r[3] for r in rows]))
        out[str(t)] = {
            "greedy": per["greedy"], "oracle": per["oracle"],
            "oracle_room_small": per["oracle"]["small"]["acc50"] - per["greedy"]["small"]["acc50"],
            "no_box_share_sampled": sum(c.status != "ok" for c in sampled) / max(1, len(sampled)),
            "outcomes": outcomes,
            "best_head_spearman": float(np.nanmax(rho)) if rho and np.isfinite(rho).any() else None,
            "median_head_spearman": float(np.nanmedian(rho)) if rho and np.isfinite(rho).any() else None}
    adapter.model.train(was_training)
    return out


def checkpoint_premise(path: str, n: int = 96, temperatures=(0.7, 1.0, 1.3)) -> dict:
    """Premise metrics and image dependence of a saved checkpoint (a run's `ckpt/` or the shipped
    organism), loaded as `acs label` loads it."""
    import json
    from pathlib import Path

    from ..models.base import load_adapter, resolve_model

    adapter = load_adapter(path, device="cpu", dtype="fp32")
    meta = Path(resolve_model(path)) / "acs_model.json"
    step = json.loads(meta.read_text()).get("steps") if meta.exists() else None
    return {"checkpoint": str(path), "step": step,
            "premise (shapes/calib)": premise_eval(adapter, n=n, temperatures=tuple(temperatures)),
            "image_dependence": image_dependence(adapter), "query_dependence": query_dependence(adapter)}
