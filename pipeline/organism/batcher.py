"""Training batches made on the fly from the scene generator: multi-turn chats whose labels are
exactly the answers (the organism is trained only to ground)."""

from __future__ import annotations

import random
from typing import NamedTuple

import torch


class Batch(NamedTuple):
    enc: object  # `models.base.Encoded`: the first-turn prompts
    conts: list  # per example, (token ids, is-label) continuation segments
    next_index: int  # the scene index the next batch starts at
    # per example, (the first query's box, the scene's other objects' boxes), original pixels, xyxy
    targets: list
    # per example, every object of the scene as (category, box), in drawing order (later on top)
    objects: list


class Batcher:
    """Training examples made on the fly from `shapes/train` scenes (an endless train split).

    Each scene becomes one multi-turn conversation: the first turn is exactly the single-query
    prompt used at inference; up to `turns - 1` further unambiguous queries of the same scene
    follow as later user turns. The image is encoded once and supervises several answers, which
    is most of the signal per CPU-second (the prefill over the visual tokens is the cost).
    """

    def __init__(self, adapter, variant: str = "shapes", split: str = "train", seed: int = 0,
                 turns: int = 1, max_objects: int | None = None, size_mix=None, confusers=None,
                 ask_share: float | None = None, detect_share: float | None = None):
        self.adapter = adapter
        self.ask_share = ask_share
        self.detect_share = detect_share
        self.max_objects = max_objects
        self.confusers = confusers
        self.size_mix = size_mix
        self.variant, self.split, self.seed = variant, split, seed
        self.turns = max(1, turns)
        self.rng = random.Random(seed)

    def example(self, index: int):
        from .scenes import make_scene

        scene = make_scene(self.variant, self.split, index, seed=self.seed, max_objects=self.max_objects,
                           size_mix=self.size_mix, confusers=self.confusers)
        queries = scene.queries()
        if not queries:
            return None
        picked = self.rng.sample(queries, min(self.turns, len(queries)))
        # Every object of the scene too, for a detect-all turn.
        return scene.image, [(cat, o.xyxy) for cat, o in picked], [(o.category, o.xyxy) for o in scene.objects]

    def batch(self, start: int, size: int) -> Batch:
        """`size` chats from scene `start` on. Labels cover the answers and their end-of-turn token only."""
        ad = self.adapter
        images, turns, scenes = [], [], []
        i = start
        while len(images) < size:
            ex = self.example(i)
            i += 1
            if ex is None:
                continue
            images.append(ex[0])
            turns.append(ex[1])
            scenes.append(ex[2])
        enc = ad.encode(images, [t[0][0] for t in turns])
        tok = ad.tokenizer
        eos = ad.eos_token_ids[:1]
        conts = []
        for qs, objects, isz, osz in zip(turns, scenes, enc.input_sizes, enc.orig_sizes):
            segs, detected = [], False
            for k, (cat, box) in enumerate(qs):
                model_box = ad.from_original(box, isz, osz)
                # A later turn may ask for every object instead (`detect_share`): each box followed by
                # its label, so the label must be read from the visual tokens just boxed, not copied
                # from the prompt. It ties what the tower sees to the words (output and input
                # embeddings are tied), the link a query needs to find its object.
                # At most one per chat: a second would be copied from the first.
                detect = bool(k and not detected and self.detect_share and self.rng.random() < self.detect_share)
                detected |= detect
                # Or ask the other way round (`ask_share`): the box given, the category to name.
                # Still grounding, read backwards. The first turn is always the inference prompt.
                ask = bool(k and not detect and self.ask_share and self.rng.random() < self.ask_share)
                if k:
                    q = DETECT_PROMPT if detect else ask_prompt(model_box) if ask else ad.prompt(cat)
                    segs.append((tok(user_turn(q), add_special_tokens=False)["input_ids"], False))
                if detect:
                    answer = ad.answers_text(sorted(((ad.from_original(b, isz, osz), c) for c, b in objects),
                                                    key=lambda it: (it[0][0], it[0][1])))
                else:
                    answer = cat if ask else ad.answer_text(model_box, cat)
                segs.append((tok(answer, add_special_tokens=False)["input_ids"] + eos, True))
            conts.append(segs)
        return Batch(enc, conts, i, [(t[0][1], [b for _, b in objs if b != t[0][1]]) for t, objs in zip(turns, scenes)],
                     scenes)


# The detect-all turn's question; its answer lists every object left to right (by x1, then y1).
DETECT_PROMPT = "Detect every object in the image. Output their bbox_2d and labels in JSON."


def user_turn(question: str) -> str:
    """A later user turn of a chat, after the previous answer's end-of-turn token."""
    return f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def ask_prompt(box) -> str:
    """The auxiliary turn's question: what is at this box (model coordinates, as the answers write them)."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return f"What is at [{x1}, {y1}, {x2}, {y2}] in the image? Answer with its name."


def cells_in_box(box, grid, input_size, orig_size) -> list[int]:
    """Raster indices of the merged-grid cells whose centre lies inside `box` (xyxy, original
    pixels); the cell under the box's centre when none does (an object smaller than a cell)."""
    (gh, gw), (ih, iw), (oh, ow) = grid, input_size, orig_size
    sx, sy = iw / ow / (iw / gw), ih / oh / (ih / gh)  # original pixels -> cells
    x1, y1, x2, y2 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    inside = [r * gw + c for r in range(gh) for c in range(gw) if x1 <= c + 0.5 < x2 and y1 <= r + 0.5 < y2]
    centre = min(gh - 1, int((y1 + y2) / 2)) * gw + min(gw - 1, int((x1 + x2) / 2))
    return inside or [centre]


def cell_owners(boxes, grid, input_size, orig_size) -> torch.Tensor:
    """Per merged-grid cell, the index of the box that owns it (`cells_in_box`), -1 for none.
    Boxes are in drawing order: where they overlap, the later one (drawn on top) owns the cell."""
    owner = torch.full((grid[0] * grid[1],), -1, dtype=torch.long)
    for k, box in enumerate(boxes):
        owner[cells_in_box(box, grid, input_size, orig_size)] = k
    return owner


def target_cell_loss(model, hidden_states, enc, targets, marker_ids) -> torch.Tensor:
    """`Phase.target_cells`: each visual token of the first turn's image says, through the model's
    own norm and (tied) output head after the middle layer, whether it lies inside the box of the
    object the query names: the logit of `marker_ids[1]` ("1") over `marker_ids[0]` ("0"), binary
    cross-entropy averaged within three groups that count equally: the target's cells, the other
    objects' cells and the background. (Two groups, target and the rest, would be met by marking
    every object: the other objects are a few cells among a hundred.) Grounding supervision, per
    token and in one step: text first, a token can learn to match the query's words against its
    own features directly, which the answer then only has to look up. Nothing is added to the
    model, and nothing reads attention."""
    h = hidden_states[len(hidden_states) // 2]  # after the middle layer: later layers can read it
    w = model.lm_head.weight[marker_ids[1]] - model.lm_head.weight[marker_ids[0]]
    norm = model.model.language_model.norm
    total = h.new_zeros(())
    for i, ((box, others), pos) in enumerate(zip(targets, enc.visual_positions)):
        where = (enc.grids[i], enc.input_sizes[i], enc.orig_sizes[i])
        group = torch.zeros(len(pos), dtype=torch.long)  # 0 background, 1 another object, 2 the target
        for other in others:
            group[cells_in_box(other, *where)] = 1
        group[cells_in_box(box, *where)] = 2
        bce = torch.nn.functional.binary_cross_entropy_with_logits(norm(h[i, pos]).float() @ w.float(),
                                                                   (group == 2).float(), reduction="none")
        parts = [bce[group == g].mean() for g in range(3) if (group == g).any()]
        total = total + sum(parts) / len(parts)
    return total / len(targets)


def word_ids(tokenizer, words) -> list[int]:
    """The token of each word as the prompt spells it (after a space); each must be one token."""
    ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"each word must be one token after a space: {dict(zip(words, ids))}")
    return [i[0] for i in ids]


def object_word_loss(model, hidden_states, enc, objects, colour_ids, shape_ids, layer: int = 0) -> torch.Tensor:
    """`Phase.object_words`: each visual token of the first turn's image that lies in an object's
    box names that object, through the model's own norm and (tied) output head applied to the
    hidden state `layer` (0: the tower's tokens as the language model receives them): a
    cross-entropy over the colour words and one over the shape words, each object's cells
    averaged and the objects counting equally (a small object's one cell as much as a large
    one's dozens). Where boxes overlap the object drawn later (on top) owns the cell.

    Why: the target-cell loss taught the model to match the query's colour word, never its shape
    word. A linear probe read shape from an object's token at chance after the tower, and scenes
    of one colour left the target-cell loss at its floor: the tokens did not carry the shape that
    a match needs. With tied embeddings this asks for exactly what the match uses, a visual token
    that resembles the words that name it. Grounding supervision (dense naming); nothing reads
    attention, and nothing is added to the model."""
    from .scenes import COLOURS, SHAPES

    if not 0 <= layer < len(hidden_states):
        raise ValueError(f"object_words_layer {layer}: the model has hidden states 0 to {len(hidden_states) - 1}")
    h = hidden_states[layer]
    heads = [model.lm_head.weight[list(ids)].float() for ids in (colour_ids, shape_ids)]
    index = [{w: k for k, w in enumerate(names)} for names in (COLOURS, SHAPES)]
    total, count = h.new_zeros(()), 0
    for i, (objs, pos) in enumerate(zip(objects, enc.visual_positions)):
        owner = cell_owners([box for _, box in objs], enc.grids[i], enc.input_sizes[i], enc.orig_sizes[i])
        for k, logits in object_word_logits(model, h[i, pos], owner, heads):
            for lg, names, word in zip(logits, index, objs[k][0].split(" ")):
                target = torch.full((len(lg),), names[word], dtype=torch.long)
                total = total + torch.nn.functional.cross_entropy(lg, target) / 2
            count += 1
    return total / max(1, count)


def object_word_logits(model, visual_hidden, owner, heads):
    """The read-out `object_word_loss` trains and the `naming` probe measures: one image's visual
    hidden states (a row per merged cell) through the model's final norm, against each of `heads`
    (rows of the tied output head, one per word). Yields (object index, one (cells, words) logits
    tensor per head) for each object that owns a cell (`cell_owners`); an object wholly covered
    by those drawn over it has none and is skipped."""
    x = model.model.language_model.norm(visual_hidden).float()
    for k in range(int(owner.max()) + 1):
        cells = owner == k
        if cells.any():
            yield k, [x[cells] @ head.T for head in heads]


def training_inputs(enc, conts, pad_id: int):
    """Append continuations to left-padded prompts; right-pad; labels only on answer segments.

    `conts[i]` is a list of (ids, is_label) segments, or a plain list of answer ids (one turn)."""
    ids, mask = enc.inputs["input_ids"], enc.inputs["attention_mask"]
    b = ids.shape[0]
    conts = [c if c and isinstance(c[0], tuple) else [(list(c), True)] for c in conts]
    flat = [[t for seg, _ in c for t in seg] for c in conts]
    is_label = [[lab for seg, lab in c for _ in seg] for c in conts]
    t = max(len(a) for a in flat)
    ans = torch.full((b, t), pad_id, dtype=ids.dtype)
    amask = torch.zeros(b, t, dtype=mask.dtype)
    lab = torch.full((b, t), -100, dtype=ids.dtype)
    for i, (a, m) in enumerate(zip(flat, is_label)):
        ans[i, : len(a)] = torch.tensor(a)
        amask[i, : len(a)] = 1
        lab[i, : len(a)] = torch.where(torch.tensor(m), torch.tensor(a), -100)
    labels = torch.cat([torch.full_like(ids, -100), lab], 1)
    inputs = dict(enc.inputs)
    inputs["input_ids"] = torch.cat([ids, ans], 1)
    inputs["attention_mask"] = torch.cat([mask, amask], 1)
    inputs["mm_token_type_ids"] = torch.cat([enc.inputs["mm_token_type_ids"], torch.zeros_like(ans)], 1)
    return inputs, labels
