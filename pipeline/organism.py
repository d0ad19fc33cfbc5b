"""The model organism: a small Qwen2.5-VL trained from scratch to ground shapes.

Architecture and data are chosen so the phenomenon ACS is about can appear on 2 CPU cores:
- 8-px patches, 2x2 merged into 16-px visual tokens; the processor resizes 640x480 scenes to a fixed
  input (`input_width` x `input_height`; the shipped model's is in its `acs_model.json`), so a small
  object (< 32^2 px in the original) covers about a patch: seen, barely. Because Qwen2.5-VL boxes
  are in input pixels and a token is 16 px at every input size, training can start at a low
  resolution and move up without changing what a coordinate means (though what the model learnt
  about positions did not carry over to a larger grid: model card, finding 5);
- one token per integer coordinate, with embeddings initialised as sinusoids of the value, so
  nearby numbers start out similar (the feasibility probe spent its first 300 steps otherwise
  learning that numbers are ordered);
- only grounding is trained: cross-entropy on the answer tokens. No loss term looks at attention
  or at any selector, so whatever ACS finds in the attention is not put there by training.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .models.tiny import build_processor, qwen25_vl_config


@dataclass
class OrganismConfig:
    text_hidden: int = 256
    text_layers: int = 8
    text_heads: int = 8
    text_kv_heads: int = 4
    text_ffn: int = 768
    vision_hidden: int = 128
    vision_depth: int = 4
    vision_heads: int = 4
    vision_ffn: int = 384
    patch_size: int = 8
    # The shipped model's input. Positional circuits learnt at one grid did not survive a move to
    # another (model card, finding 5), so a new run should start at the input it will ship with.
    input_width: int = 192
    input_height: int = 144
    # Qwen2.5-VL splits the rotary frequencies contiguously: t takes the highest, h the next, w the
    # lowest. At the 7B's theta and this head size (32), 16 columns of visual tokens would span
    # 0.05 rad of the w frequencies: horizontal position invisible to attention. Theta 30 was not
    # enough either (w: 0.04-0.12 rad per column): trained at 30, the model learnt where objects are
    # vertically but never horizontally (model card, session 3). At theta 3 every w frequency turns
    # 0.36-0.50 rad per column and x was learnt within 400 steps. The text is short (< 200 tokens),
    # so losing the low frequencies costs nothing measurable.
    rope_theta: float = 3.0


def organism_configs(oc: OrganismConfig, tokenizer):
    head_dim = oc.text_hidden // oc.text_heads
    # M-RoPE splits head_dim / 2 rotary frequencies across (t, h, w); 7B uses 16/24/24 of 64.
    half = head_dim // 2
    t_sec = half // 4
    hw = (half - t_sec) // 2
    mrope = [t_sec, hw, half - t_sec - hw]
    text = dict(hidden_size=oc.text_hidden, intermediate_size=oc.text_ffn,
                num_hidden_layers=oc.text_layers, num_attention_heads=oc.text_heads,
                num_key_value_heads=oc.text_kv_heads, rms_norm_eps=1e-6, max_position_embeddings=4096,
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": oc.rope_theta, "mrope_section": mrope})
    vision = dict(depth=oc.vision_depth, hidden_size=oc.vision_hidden, intermediate_size=oc.vision_ffn,
                  num_heads=oc.vision_heads, out_hidden_size=oc.text_hidden, patch_size=oc.patch_size,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=oc.patch_size * 2 * 8,
                  fullatt_block_indexes=[oc.vision_depth // 2 - 1, oc.vision_depth - 1],
                  tokens_per_second=2)
    config = qwen25_vl_config(text, vision, tokenizer)
    pixels = oc.input_width * oc.input_height
    processor = build_processor(tokenizer, patch_size=oc.patch_size, merge_size=2,
                                min_pixels=pixels, max_pixels=pixels)
    return config, processor


def set_input_size(processor, width: int, height: int) -> None:
    """Fix the processor's resize target to exactly width x height pixels (multiples of 28 at
    patch 14, 16 at patch 8 keep the 4:3 scene aspect without cropping)."""
    pixels = width * height
    for proc in (processor.image_processor, processor.video_processor):
        proc.size = {"shortest_edge": pixels, "longest_edge": pixels}


def init_number_embeddings(model, tokenizer, max_number: int = 1023) -> None:
    """Sinusoids of the integer value for the number tokens (tied with the output layer)."""
    emb = model.get_input_embeddings().weight
    d = emb.shape[1]
    ids = tokenizer.convert_tokens_to_ids([str(i) for i in range(max_number + 1)])
    vals = torch.arange(max_number + 1, dtype=torch.float32)[:, None]
    freqs = torch.exp(-math.log(2000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)[None]
    table = torch.zeros(max_number + 1, d)
    table[:, 0::2] = torch.sin(vals * freqs)
    table[:, 1::2] = torch.cos(vals * freqs)
    with torch.no_grad():
        emb[ids] = table.to(emb.dtype) * emb.std() / table.std()


class Batcher:
    """Training examples made on the fly from `shapes/train` scenes (an endless train split).

    Each scene becomes one multi-turn conversation: the first turn is exactly the single-query
    prompt used at inference; up to `turns - 1` further unambiguous queries of the same scene
    follow as later user turns. The image is encoded once and supervises several answers, which
    is most of the signal per CPU-second (the prefill over the visual tokens is the cost).
    """

    def __init__(self, adapter, variant: str = "shapes", split: str = "train", seed: int = 0,
                 turns: int = 1, max_objects: int | None = None):
        self.adapter = adapter
        self.max_objects = max_objects
        self.variant, self.split, self.seed = variant, split, seed
        self.turns = max(1, turns)
        self.rng = random.Random(seed)

    def example(self, index: int):
        from .synthetic import make_scene

        scene = make_scene(self.variant, self.split, index, seed=self.seed, max_objects=self.max_objects)
        queries = scene.queries()
        if not queries:
            return None
        picked = self.rng.sample(queries, min(self.turns, len(queries)))
        return scene.image, [(cat, (o.bbox[0], o.bbox[1], o.bbox[0] + o.bbox[2], o.bbox[1] + o.bbox[3]))
                             for cat, o in picked]

    def batch(self, start: int, size: int):
        """(encoded first-turn prompts, per example a list of (token ids, is-label) continuation
        segments, next scene index). Labels cover the answers and their end-of-turn token only."""
        ad = self.adapter
        images, turns = [], []
        i = start
        while len(images) < size:
            ex = self.example(i)
            i += 1
            if ex is None:
                continue
            images.append(ex[0])
            turns.append(ex[1])
        enc = ad.encode(images, [t[0][0] for t in turns])
        tok = ad.tokenizer
        eos = ad.eos_token_ids[:1]
        conts = []
        for qs, isz, osz in zip(turns, enc.input_sizes, enc.orig_sizes):
            segs = []
            for k, (cat, box) in enumerate(qs):
                if k:
                    user = f"\n<|im_start|>user\n{ad.prompt(cat)}<|im_end|>\n<|im_start|>assistant\n"
                    segs.append((tok(user, add_special_tokens=False)["input_ids"], False))
                answer = ad.answer_text(ad.from_original(box, isz, osz), cat)
                segs.append((tok(answer, add_special_tokens=False)["input_ids"] + eos, True))
            conts.append(segs)
        return enc, conts, i


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


def save_checkpoint(model, processor, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "acs_model.json").write_text(json.dumps(meta, indent=2))




def export_organism(ckpt_dir: str | Path, out_dir: str | Path, card: str | None = None) -> Path:
    """Copy a training checkpoint to the package assets in bf16 (half the bytes; the loader casts
    back to fp32 on CPU). The optimizer state is not shipped."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    src, out = Path(ckpt_dir), Path(out_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=torch.bfloat16)
    processor = AutoProcessor.from_pretrained(src)
    meta = json.loads((src / "acs_model.json").read_text())
    save_checkpoint(model, processor, out, meta)
    if card:
        (out / "MODEL_CARD.md").write_text(card)
    return out
