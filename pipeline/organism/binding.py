"""Why does an organism box *an* object but not the one asked for? Probes of query binding, run on a
checkpoint (nothing is trained): each isolates one link of the chain from the query's words to the
answer's first coordinate.

- `linear_probe`: are colour and shape in the visual tokens at all (at the tower's output and in
  the language model's hidden states at the object's position)? If not, the tower is to blame.
- `pair_probe`: two-object scenes whose objects differ only in colour, or only in shape: does
  greedy pick the queried one? Chance is 1/2; which attribute is read shows here.
- `prompt_attention`: from the position that writes the first coordinate, how much attention goes
  to the query's colour word, its shape word, the rest of the prompt and the image, per layer?
- `target_probe`: does the answer's attention land on the queried object rather than the scene's
  others, and (query before the image) do the visual tokens themselves know they are the target?
- `rotary_table`: the radians each rotary pair turns per position: a pair that turns fast cannot
  match a word to the visual tokens of the same colour wherever they sit in the image.

`python -m pipeline.organism.binding CKPT` prints them all as one JSON object.
"""

from __future__ import annotations

import json

import numpy as np
import torch


def _words(adapter, category: str) -> tuple[list[int], list[int]]:
    """Token ids of the category's colour and shape words as they appear in the prompt (after a
    space)."""
    colour, shape = category.split(" ")
    tok = adapter.tokenizer
    return (tok(" " + colour, add_special_tokens=False)["input_ids"],
            tok(" " + shape, add_special_tokens=False)["input_ids"])


def _find(seq: list[int], sub: list[int], start: int = 0) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


def tokenization(adapter) -> dict:
    """Each colour and shape word's tokens in the prompt: a word split into pieces that other
    words share (or an unknown token) would make the query unreadable before any learning."""
    from .scenes import COLOURS, SHAPES

    tok = adapter.tokenizer
    words = {w: tok.convert_ids_to_tokens(tok(" " + w, add_special_tokens=False)["input_ids"])
             for w in (*COLOURS, *SHAPES)}
    return {"tokens": words, "all_single_token": all(len(v) == 1 for v in words.values()),
            "distinct": len({tuple(v) for v in words.values()}) == len(words)}


@torch.inference_mode()
def pair_probe(adapter, n: int = 96, seed: int = 0) -> dict:
    """Greedy answers on two-object scenes: objects of the same colour (only the shape tells them
    apart), of the same shape (only the colour does), and unconstrained, each queried for one of
    its two objects. `picks_target` = right / (right + other object): 0.5 is a coin toss."""
    from ..ground import Query
    from ..metrics import answer_outcomes
    from .probes import greedy_boxes
    from .scenes import make_scene

    out = {}
    for share in ("colour", "shape", None):
        items, i = [], 0
        while len(items) < n:
            scene = make_scene("shapes", "calib", i, seed=seed, max_objects=2,
                               confusers=share if share else None)
            qs = scene.queries()
            if len(qs) == 2:
                k = i % 2  # alternate which of the two is asked for
                boxes = [o.xyxy for _, o in qs]
                items.append((Query(f"pair-{share}-{i}", scene.image, qs[k][0], boxes[k]), [boxes[1 - k]]))
            i += 1
        pred = greedy_boxes(adapter, [q for q, _ in items], seed=seed)
        oc = answer_outcomes(pred, np.array([q.gt for q, _ in items]), [o for _, o in items])
        counts = {o: int((oc == o).sum()) for o in ("right", "other_object", "near", "nowhere", "no_box")}
        decided = counts["right"] + counts["other_object"]
        out[f"same_{share}" if share else "unconstrained"] = {
            **counts, "n": n, "picks_target": counts["right"] / decided if decided else None}
    return out


@torch.inference_mode()
def prompt_attention(adapter, n: int = 48, seed: int = 0) -> dict:
    """Attention from the position that writes x1 (the end of the answer's forced opening), per
    layer, averaged over heads and queries: shares on the query's colour word, its shape word, the
    rest of the prompt text, the image's tokens, and the answer's opening."""
    from .scenes import grounding_queries

    model = adapter.model
    was = model.training
    model.eval()
    text_cfg = model.config.get_text_config()
    impl = text_cfg._attn_implementation
    # The language model only (sdpa returns no weights); the tower keeps its own implementation.
    text_cfg._attn_implementation = "eager"
    try:
        items = grounding_queries("shapes", "calib", n, seed=seed)
        sums = None
        for b in range(0, n, 8):
            chunk = [q for q, _ in items[b:b + 8]]
            enc = adapter.encode([q.image for q in chunk], [q.category for q in chunk], opening=True)
            att = model(**enc.inputs, output_attentions=True).attentions  # per layer (B, H, T, T)
            ids = enc.inputs["input_ids"]
            mask = enc.inputs["attention_mask"]
            for j, q in enumerate(chunk):
                seq = ids[j].tolist()
                colour, shape = _words(adapter, q.category)
                c0 = _find(seq, colour)
                s0 = _find(seq, shape, max(c0, 0) + len(colour))
                vis = enc.visual_positions[j]
                first = int(mask[j].nonzero()[0])
                opening = len(enc.openings[j]) if enc.openings else 0
                seg = torch.zeros(len(seq), dtype=torch.long)  # 0 other prompt text
                seg[vis] = 1
                if c0 >= 0:
                    seg[c0:c0 + len(colour)] = 2
                if s0 >= 0:
                    seg[s0:s0 + len(shape)] = 3
                seg[len(seq) - opening:] = 4
                seg[:first] = 5  # padding: gets no attention
                rows = torch.stack([a[j, :, -1].float().mean(0) for a in att])  # (L, T)
                per = torch.stack([rows[:, seg == k].sum(1) for k in range(5)], 1)  # (L, 5)
                sums = per if sums is None else sums + per
        names = ("other_prompt", "image", "colour_word", "shape_word", "answer_opening")
        mean = (sums / n).tolist()
        return {"layers": [{k: round(v, 4) for k, v in zip(names, layer)} for layer in mean]}
    finally:
        text_cfg._attn_implementation = impl
        model.train(was)


def linear_probe(adapter, n_scenes: int = 300, seed: int = 0, layers=(1, 2, 4, 8)) -> dict:
    """Softmax-regression accuracy of colour and shape read from the visual token under each
    object's box centre: at the tower's output and at the language model's hidden states of that
    position after the given layers (75% / 25% split of the objects, by scene). Chance: 1/8 and
    1/6. The centre token of a large shape sees its flat interior, not its outline, so shape reads
    lower here than what several tokens together hold: `tower_object_mean` reads the mean of the
    tower's tokens over each object's cells (`batcher.cells_in_box`) for that."""
    from .batcher import cells_in_box
    from .probes import _visual_tokens
    from .scenes import COLOURS, SHAPES, make_scene

    model = adapter.model
    was = model.training
    model.eval()
    feats: dict[str, list] = {"tower": [], "tower_object_mean": []}
    feats.update({f"lm_layer_{k}": [] for k in layers})
    colours, shapes, scene_of = [], [], []
    for b in range(0, n_scenes, 8):
        scenes = [make_scene("shapes", "calib", i, seed=seed) for i in range(b, min(b + 8, n_scenes))]
        enc = adapter.encode([s.image for s in scenes], ["red circle"] * len(scenes))
        with torch.no_grad():  # not inference_mode: the probes below fit on these tensors
            vis = _visual_tokens(model, enc)
            hidden = model(**enc.inputs, output_hidden_states=True).hidden_states
        off = 0
        for j, s in enumerate(scenes):
            gh, gw = enc.grids[j]
            (ih, iw), (oh, ow) = enc.input_sizes[j], enc.orig_sizes[j]
            for o in s.objects:
                x, y, w, h = o.bbox
                col = min(gw - 1, int((x + w / 2) * iw / ow / (iw / gw)))
                row = min(gh - 1, int((y + h / 2) * ih / oh / (ih / gh)))
                t = row * gw + col
                feats["tower"].append(vis[off + t])
                cells = cells_in_box(o.xyxy, (gh, gw), (ih, iw), (oh, ow))
                feats["tower_object_mean"].append(vis[[off + c for c in cells]].mean(0))
                for k in layers:
                    feats[f"lm_layer_{k}"].append(hidden[k][j, enc.visual_positions[j][t]].float())
                c, sh = o.category.split(" ")
                colours.append(list(COLOURS).index(c))
                shapes.append(SHAPES.index(sh))
                scene_of.append(b + j)
            off += gh * gw
    model.train(was)
    scene_of = np.array(scene_of)
    rng = np.random.default_rng(seed)
    test_scenes = set(rng.choice(n_scenes, n_scenes // 4, replace=False).tolist())
    test = torch.tensor([s in test_scenes for s in scene_of])
    out = {"objects": int(len(scene_of)), "chance": {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES)}}
    for where, xs in feats.items():
        out[where] = _attribute_accuracy(torch.stack(xs), colours, shapes, test)
    return out


def _attribute_accuracy(x: torch.Tensor, colours: list[int], shapes: list[int], test: torch.Tensor) -> dict:
    """Held-out colour and shape accuracy of a linear read-out of features standardised on the fit split."""
    x = (x - x[~test].mean(0)) / x[~test].std(0).clamp_min(1e-6)
    return {name: round(_softmax_regression(x, torch.tensor(y), test), 3)
            for name, y in (("colour", colours), ("shape", shapes))}


def query_probe(adapter, n: int = 384, seed: int = 0, where: str = "answer") -> dict:
    """Softmax-regression accuracy of the *query's* colour and shape read from the hidden state of
    the position that writes x1 (`where="answer"`), or from the mean of the image's visual tokens
    (`where="image"`: with the query before the image, did its words reach the tokens that must
    match them?), after each layer (75% / 25% split by query). The words are in the prompt, so
    whatever reads them here was gathered from the text: high accuracy with no binding means the
    query arrives and the match against the image fails; chance means it never arrives."""
    if where not in ("answer", "image"):
        raise ValueError(f"query_probe: where must be 'answer' or 'image', not {where!r}")
    from .scenes import COLOURS, SHAPES, grounding_queries

    model = adapter.model
    was = model.training
    model.eval()
    items = grounding_queries("shapes", "calib", n, seed=seed)
    feats, colours, shapes = None, [], []
    for b in range(0, n, 16):
        chunk = [q for q, _ in items[b:b + 16]]
        enc = adapter.encode([q.image for q in chunk], [q.category for q in chunk], opening=True)
        with torch.no_grad():
            hidden = model(**enc.inputs, output_hidden_states=True).hidden_states
        if where == "image":
            last = torch.stack([torch.stack([h[j, enc.visual_positions[j]].float().mean(0) for j in range(len(chunk))])
                                for h in hidden], 1)  # (B, L + 1, D)
        else:
            last = torch.stack([h[:, -1].float() for h in hidden], 1)  # (B, L + 1, D)
        feats = last if feats is None else torch.cat([feats, last])
        for q in chunk:
            c, sh = q.category.split(" ")
            colours.append(list(COLOURS).index(c))
            shapes.append(SHAPES.index(sh))
    model.train(was)
    rng = np.random.default_rng(seed)
    test = torch.zeros(len(colours), dtype=torch.bool)
    test[rng.choice(len(colours), len(colours) // 4, replace=False)] = True
    out = {"queries": len(colours), "chance": {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES)}}
    for k in range(feats.shape[1]):
        out[f"after_layer_{k}"] = _attribute_accuracy(feats[:, k], colours, shapes, test)
    return out


@torch.inference_mode()
def ask_probe(adapter, n: int = 192, seed: int = 0) -> dict:
    """How well the organism names the object at a given box (the `ask_share` turn, teacher-forced
    after one grounding turn of the same scene, as in training): top-1 accuracy of its colour word
    and of its shape word. It measures the other half of binding: whether the visual tokens at a
    place carry what the words name, and whether the language model can read them out."""
    from .batcher import ask_prompt, training_inputs, user_turn
    from ..ground import Query
    from .scenes import make_scene

    model = adapter.model
    was = model.training
    model.eval()
    tok = adapter.tokenizer
    eos = adapter.eos_token_ids[:1]
    items, i = [], 0
    while len(items) < n:  # a grounding turn, then the name of another object of the scene
        scene = make_scene("shapes", "calib", i, seed=seed)
        qs = scene.queries()
        if qs and len(scene.objects) > 1:
            cat, obj = qs[0]
            other = scene.objects[(scene.objects.index(obj) + 1) % len(scene.objects)]
            items.append((Query(f"ask-{i}", scene.image, cat, obj.xyxy), [(other.category, other.xyxy)]))
        i += 1
    right = {"colour": 0, "shape": 0, "both": 0}
    for b in range(0, len(items), 16):
        chunk = items[b:b + 16]
        enc = adapter.encode([q.image for q, _ in chunk], [q.category for q, _ in chunk])
        conts = []
        for (q, others), isz, osz in zip(chunk, enc.input_sizes, enc.orig_sizes):
            cat, box = others[0]
            user = user_turn(ask_prompt(adapter.from_original(box, isz, osz)))
            conts.append([(tok(adapter.answer_text(adapter.from_original(q.gt, isz, osz), q.category),
                               add_special_tokens=False)["input_ids"] + eos, False),
                          (tok(user, add_special_tokens=False)["input_ids"], False),
                          (tok(cat, add_special_tokens=False)["input_ids"], True)])
        inputs, labels = training_inputs(enc, conts, tok.pad_token_id)
        pred = model(**inputs).logits[:, :-1].argmax(-1)
        lab = labels[:, 1:]
        for j in range(len(chunk)):
            pos = (lab[j] != -100).nonzero().flatten()
            ok = (pred[j, pos] == lab[j, pos]).tolist()
            c, s = ok[0], all(ok[1:])
            right["colour"] += c
            right["shape"] += s
            right["both"] += c and s
    model.train(was)
    return {"asked": len(items), **{k: round(v / len(items), 3) for k, v in right.items()}}


@torch.inference_mode()
def detect_probe(adapter, chats: int = 48, seed: int = 0) -> dict:
    """Top-1 accuracy of the colour and shape words in a detect-all turn's labels (`detect_share`),
    teacher-forced after one grounding turn, on calib chats: each label follows the box the
    model has just written, so this measures whether what boxes an object also carries what it is."""
    from .batcher import Batcher, training_inputs
    from .scenes import COLOURS, SHAPES

    model = adapter.model
    was = model.training
    model.eval()
    tok = adapter.tokenizer
    ids = {"colour": sorted({tok(c, add_special_tokens=False)["input_ids"][0] for c in COLOURS}),
           "shape": sorted({tok(" " + s, add_special_tokens=False)["input_ids"][0] for s in SHAPES})}
    batcher = Batcher(adapter, split="calib", seed=seed, turns=2, detect_share=1.0)
    right, seen = {k: 0 for k in ids}, {k: 0 for k in ids}
    for b in range(0, chats, 16):
        enc, conts, *_ = batcher.batch(b // 16 * 1000, min(16, chats - b))  # spread over the split
        # Labels on the detect turn only (a chat's last segment).
        conts = [[(seg, lab and j == len(segs) - 1) for j, (seg, lab) in enumerate(segs)] for segs in conts]
        inputs, labels = training_inputs(enc, conts, adapter.pad_token_id)
        pred, lab = model(**inputs).logits[:, :-1].argmax(-1), labels[:, 1:]
        for name, want in ids.items():
            m = torch.isin(lab, torch.tensor(want))
            right[name] += int((pred[m] == lab[m]).sum())
            seen[name] += int(m.sum())
    model.train(was)
    return {"labels": seen["colour"], **{k: round(right[k] / max(1, seen[k]), 3) for k in ids}}


def target_probe(adapter, n: int = 192, seed: int = 0) -> dict:
    """Does the model know which object is asked for before it writes the first coordinate?
    Per layer, on calib queries:
    - `target_attention`: of the attention that the position writing x1 gives to the scene's
      objects' visual tokens, the share on the queried object's own tokens (mean over heads and
      queries), against `uniform`, the share of those tokens that are the target's;
    - `knows_target`: held-out accuracy of a linear read-out, from the hidden state of the visual
      token under an object's centre, of whether that object is the one asked for (per query the
      target and one other object: chance 0.5; 75% / 25% split by scene). With the image before
      the query (causal attention) the visual tokens cannot see the query, so this is exactly
      chance; text first, it measures whether each token has worked out that it is the object
      asked for."""
    from .batcher import cells_in_box
    from .scenes import scene_queries

    model = adapter.model
    was = model.training
    model.eval()
    text_cfg = model.config.get_text_config()
    impl = text_cfg._attn_implementation
    text_cfg._attn_implementation = "eager"  # sdpa returns no attention weights
    items = [it for it in scene_queries("shapes", "calib", n, seed=seed) if it[2]]  # a scene of 2+ objects
    rng = np.random.default_rng(seed)
    share, uniform, feats, labels = None, [], [], []
    try:
        for b in range(0, len(items), 8):
            chunk = items[b:b + 8]
            enc = adapter.encode([q.image for q, _, _ in chunk], [q.category for q, _, _ in chunk], opening=True)
            with torch.no_grad():
                res = model(**enc.inputs, output_attentions=True, output_hidden_states=True)
            for j, (q, _, others) in enumerate(chunk):
                where = (enc.grids[j], enc.input_sizes[j], enc.orig_sizes[j])
                mine = set(cells_in_box(q.gt, *where))
                theirs = set().union(*(cells_in_box(o, *where) for o in others)) - mine
                vis = enc.visual_positions[j]
                t_pos, o_pos = vis[sorted(mine)], vis[sorted(theirs)] if theirs else vis[:0]
                rows = torch.stack([a[j, :, -1].float().mean(0) for a in res.attentions])  # (L, T)
                t_mass, o_mass = rows[:, t_pos].sum(1), rows[:, o_pos].sum(1)
                s = (t_mass / (t_mass + o_mass).clamp_min(1e-12)).unsqueeze(0)
                share = s if share is None else torch.cat([share, s])
                uniform.append(len(mine) / (len(mine) + len(theirs)))
                other = others[int(rng.integers(len(others)))]
                for box, lab in ((q.gt, 1), (other, 0)):
                    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                    t = cells_in_box((cx, cy, cx, cy), *where)[0]
                    feats.append(torch.stack([h[j, vis[t]].float() for h in res.hidden_states]))
                    labels.append(lab)
    finally:
        text_cfg._attn_implementation = impl
        model.train(was)
    x, y = torch.stack(feats), torch.tensor(labels)
    # Split by scene: a scene's other queries make its target another query's "other object", with
    # nearly the same features, and a split by query would score that leak (below chance).
    scene_of = [q.query_id.split(":")[0] for q, _, _ in items for _ in (0, 1)]
    scenes = sorted(set(scene_of))
    held = set(rng.choice(len(scenes), max(1, len(scenes) // 4), replace=False).tolist())
    test = torch.tensor([scenes.index(s) in held for s in scene_of])
    knows = []
    for k in range(x.shape[1]):
        xk = (x[:, k] - x[~test, k].mean(0)) / x[~test, k].std(0).clamp_min(1e-6)
        knows.append(round(_softmax_regression(xk, y, test), 3))
    return {"queries": len(items), "uniform": round(float(np.mean(uniform)), 3),
            "target_attention_in_layer": [round(v, 3) for v in share.mean(0).tolist()],
            "knows_target_after_layer": knows}


def _softmax_regression(x: torch.Tensor, y: torch.Tensor, test: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy of an L2-regularised linear classifier fitted by L-BFGS."""
    with torch.enable_grad():
        w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
        bias = torch.zeros(int(y.max()) + 1, requires_grad=True)
        opt = torch.optim.LBFGS([w, bias], max_iter=steps, line_search_fn="strong_wolfe")
        xt, yt = x[~test], y[~test]

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xt @ w + bias, yt) + 1e-3 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return float(((x[test] @ w + bias).argmax(1) == y[test]).float().mean())


def rotary_table(adapter) -> dict:
    """Radians per position of each rotary pair of a text head, and the section (t, h, w) that
    drives it: for the image's tokens t is constant, so a pair is free of image position only
    if it is in t's section or turns slowly (here: under 0.1 rad a position)."""
    cfg = adapter.model.config.get_text_config()
    rp = cfg.rope_parameters
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # The live module's frequencies: a re-timed rotary (`model.slow_rotary`) differs from theta's.
    inv = adapter.model.model.language_model.rotary_emb.inv_freq.double().numpy()
    sec = rp.get("mrope_section", [16, 24, 24])
    owner = [name for name, k in zip("thw", sec) for _ in range(k)]
    slow = [f for f, o in zip(inv, owner) if o != "t" and f < 0.1]
    return {"rope_theta": rp["rope_theta"], "rope_type": rp.get("rope_type", "default"),
            "mrope_section": list(sec), "head_dim": head,
            "rad_per_position": {o: [round(float(f), 3) for f, oo in zip(inv, owner) if oo == o] for o in "thw"},
            "pairs_free_of_image_position": sec[0] + len(slow)}


def wrong_object_probe(adapter, n: int = 192, seed: int = 0) -> dict:
    """Greedy answers on the first `n` calib queries that land on another object of the scene
    (`metrics.answer_outcomes` "other_object"), by what the object they overlap most shares with the
    query: its colour (another shape), its shape (another colour), or neither; and how many of
    those objects are larger than the target. Tells which word of the query the answer does not
    yet read."""
    from ..ground import Query
    from ..metrics import answer_outcomes, box_iou
    from .probes import greedy_boxes
    from .scenes import make_scene

    items, i = [], 0  # (query, target object, the scene's other objects)
    while len(items) < n:
        scene = make_scene("shapes", "calib", i, seed=seed)
        items += [(Query(f"wrong-{i}:{cat}", scene.image, cat, obj.xyxy), obj, [o for o in scene.objects if o is not obj])
                  for cat, obj in scene.queries()]
        i += 1
    items = items[:n]
    pred = greedy_boxes(adapter, [q for q, _, _ in items], seed=seed)
    oc = answer_outcomes(pred, np.array([q.gt for q, _, _ in items]), [[o.xyxy for o in others] for _, _, others in items])
    out = {"queries": n, "other_object": 0, "same_colour": 0, "same_shape": 0, "neither": 0, "larger": 0}
    for box, outcome, (q, obj, others) in zip(pred, oc, items):
        if outcome != "other_object":
            continue
        hit = others[int(np.argmax(box_iou(box[None], np.array([o.xyxy for o in others]))[0]))]
        (qc, qs), (hc, hs) = q.category.split(" "), hit.category.split(" ")
        out["other_object"] += 1
        out["same_colour" if qc == hc else "same_shape" if qs == hs else "neither"] += 1
        out["larger"] += hit.area > obj.area
    return out


def naming_probe(adapter, n_scenes: int = 64, seed: int = 0, layers=(0, 4)) -> dict:
    """How often an object's tokens name its colour and its shape through the model's own norm
    and tied head (`batcher.object_word_loss`'s read-out, no fitted probe): the mean of the
    object's cells' logits over the colour words, and over the shape words, argmax right, by the
    benchmark's size bucket, at each hidden state in `layers` (0: the tower's tokens; later ones
    have read the scene's first query, which comes first). Chance: 1/8 and 1/6. A model never
    trained to name its objects this way reads near chance here whatever its tokens hold."""
    from .batcher import cell_owners, object_word_logits, word_ids
    from .scenes import COLOURS, SHAPES, make_scene, size_bucket

    model = adapter.model
    was = model.training
    model.eval()
    words = {"colour": list(COLOURS), "shape": list(SHAPES)}
    heads = [model.lm_head.weight[word_ids(adapter.tokenizer, names)].float() for names in words.values()]
    hits = {k: {} for k in layers}  # layer -> "word/bucket" -> [right, n]
    for b in range(0, n_scenes, 16):
        scenes = [make_scene("shapes", "calib", i, seed=seed) for i in range(b, min(b + 16, n_scenes))]
        scenes = [s for s in scenes if s.queries()]
        enc = adapter.encode([s.image for s in scenes], [s.queries()[0][0] for s in scenes])
        with torch.inference_mode():
            hidden = model(**enc.inputs, output_hidden_states=True).hidden_states
        for i, s in enumerate(scenes):
            owner = cell_owners([o.xyxy for o in s.objects], enc.grids[i], enc.input_sizes[i], enc.orig_sizes[i])
            for layer in layers:
                for k, logits in object_word_logits(model, hidden[layer][i, enc.visual_positions[i]], owner, heads):
                    o = s.objects[k]
                    for (word, names), lg, truth in zip(words.items(), logits, o.category.split(" ")):
                        right = names[int(lg.mean(0).argmax())] == truth
                        for key in (f"{word}/{size_bucket(o.area)}", f"{word}/all"):
                            h = hits[layer].setdefault(key, [0, 0])
                            h[0] += int(right)
                            h[1] += 1
    model.train(was)
    return {"chance": {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES)},
            **{f"layer_{k}": {key: {"acc": round(r / n, 3), "n": n} for key, (r, n) in sorted(v.items())}
               for k, v in hits.items()}}


def run_all(path: str, n: int = 96, print_fn=None, only: list[str] | None = None) -> dict:
    """Every probe on one checkpoint (or those named in `only`); `print_fn` gets each result as it
    comes (the linear probe, last, is the slow one: ~300 forwards)."""
    from ..models.base import load_adapter

    probes = (("tokenization", tokenization), ("rotary", rotary_table),
              ("pairs", lambda a: pair_probe(a, n=n)),
              ("prompt_attention", lambda a: prompt_attention(a, n=min(n, 48))),
              ("query_probe", query_probe),
              ("query_at_image", lambda a: query_probe(a, where="image")),
              ("ask_probe", ask_probe), ("detect_probe", detect_probe), ("target_probe", target_probe),
              ("wrong_objects", lambda a: wrong_object_probe(a, n=2 * n)),
              ("naming", naming_probe), ("linear_probe", linear_probe))
    unknown = set(only or ()) - {name for name, _ in probes}
    if unknown:  # before loading anything
        raise ValueError(f"unknown probes {sorted(unknown)}; known: {[name for name, _ in probes]}")
    adapter = load_adapter(path, device="cpu", dtype="fp32")
    out = {"checkpoint": path}
    for name, fn in probes:
        if only and name not in only:
            continue
        out[name] = fn(adapter)
        if print_fn:
            print_fn(json.dumps({name: out[name]}))
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="The binding probes on one checkpoint, one JSON line each.")
    ap.add_argument("ckpt", nargs="?", default="pipeline/assets/organism")
    ap.add_argument("out", nargs="?", default=None, help="also write every result to this JSON file")
    ap.add_argument("--only", default=None, help="comma-separated probe names (e.g. pairs,wrong_objects)")
    args = ap.parse_args()
    res = run_all(args.ckpt, print_fn=print, only=args.only.split(",") if args.only else None)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
