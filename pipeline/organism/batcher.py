"""Training batches made on the fly from the scene generator: multi-turn chats whose labels are
exactly the answers (the organism is trained only to ground)."""

from __future__ import annotations

import random

import torch


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
        xyxy = lambda o: (o.bbox[0], o.bbox[1], o.bbox[0] + o.bbox[2], o.bbox[1] + o.bbox[3])  # noqa: E731
        # Every object of the scene too, for a detect-all turn.
        return scene.image, [(cat, xyxy(o)) for cat, o in picked], [(o.category, xyxy(o)) for o in scene.objects]

    def batch(self, start: int, size: int):
        """(encoded first-turn prompts, per example a list of (token ids, is-label) continuation
        segments, next scene index). Labels cover the answers and their end-of-turn token only."""
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
        return enc, conts, i


# The detect-all turn's question; its answer lists every object left to right (by x1, then y1).
DETECT_PROMPT = "Detect every object in the image. Output their bbox_2d and labels in JSON."


def user_turn(question: str) -> str:
    """A later user turn of a chat, after the previous answer's end-of-turn token."""
    return f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def ask_prompt(box) -> str:
    """The auxiliary turn's question: what is at this box (model coordinates, as the answers write them)."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return f"What is at [{x1}, {y1}, {x2}, {y2}] in the image? Answer with its name."


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
