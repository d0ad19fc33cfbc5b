"""The model organism: a small Qwen2.5-VL trained from scratch to ground shapes.

Architecture and data are chosen so the phenomenon ACS is about can appear on 2 CPU cores, in the
regime where the real model meets it:
- the 7B's 14-px patches, 2x2 merged into 28-px visual tokens, reading the 336x252 scenes of
  `scenes` at their own size (12 x 9 = 108 visual tokens, processor min = max pixels). A COCO-small
  object (< 32^2 px, 11-29 px wide) then spans 0.4-1.0 visual token, as it does for
  Qwen2.5-VL-7B reading COCO near native resolution. (The first organism read 640x480 scenes
  shrunk to 192x144 with 16-px tokens: a small object arrived 3-9 px wide, a fraction of a token,
  and was never localised: see the model card's history.) An image of another size is resized by
  the processor's own smart resize, exactly as the real model's processor would;
- one token per integer coordinate, with embeddings initialised as sinusoids of the value, so
  nearby numbers start out similar (the first feasibility probe spent its first 300 steps otherwise
  learning that numbers are ordered);
- only grounding is trained: cross-entropy on the answer tokens. No loss term looks at attention
  or at any selector, so whatever ACS finds in the attention is not put there by training.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.tiny import build_processor, qwen25_vl_config


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
    # The text model is the first organism's (8 layers of 256: enough to learn the task in the
    # feasibility probes, small enough for ~4 s per 32-scene step on 2 cores); the tower is the
    # 7B's geometry, patch 14 merged 2x2, at a width the CPU budget allows.
    patch_size: int = 14
    # The scene size: no resize. Positional circuits learnt at one grid did not survive a move to
    # another (model card of the first organism, finding 5), so training starts at this input.
    input_width: int = 336
    input_height: int = 252
    # Qwen2.5-VL splits the rotary frequencies contiguously: t takes the highest, h the next, w the
    # lowest. At the 7B's theta and this head size (32), 16 columns of visual tokens would span
    # 0.05 rad of the w frequencies: horizontal position invisible to attention. Theta 30 was not
    # enough either (w: 0.04-0.12 rad per column): trained at 30, the model learnt where objects are
    # vertically but never horizontally (model card, session 3). At theta 3 every w frequency turns
    # 0.36-0.50 rad per column and x was learnt within 400 steps. The text is short (< 200 tokens),
    # so losing the low frequencies costs nothing measurable.
    rope_theta: float = 3.0
    # (t, h, w) rotary pairs of a head (Qwen2.5-VL's `mrope_section`; they sum to head_dim / 2).
    # None: t a quarter, h and w the rest split evenly (4 / 6 / 6 at head 32). Qwen2.5-VL gives t
    # the highest frequencies and w the lowest, so at theta 3 every pair turns by >= 0.36 rad per
    # position: no channel is free of position, and a word cannot be matched to the visual tokens
    # of the same colour wherever they sit (the binding failure of organism v2, its model card).
    mrope_section: list[int] | None = None
    # How many of the slowest rotary pairs turn SLOW_FACTOR x slower (`slow_rotary`); a phase may
    # raise it mid-recipe (`Phase.rope_slow_pairs`). 0: plain rotary at `rope_theta`.
    rope_slow_pairs: int = 0


# A slowed pair turns ~0.004 rad per position at theta 3: under a radian over the longest chat.
SLOW_FACTOR = 100.0


def rope_parameters(theta: float, mrope: list[int], head_dim: int, slow_pairs: int = 0) -> dict:
    """Qwen2.5-VL's text rope parameters; with `slow_pairs`, the `llama3` rope type set so exactly
    the `slow_pairs` lowest frequencies are divided by SLOW_FACTOR and the others kept (its smooth
    band falls between two pairs). Qwen2.5-VL gives the lowest frequencies to w, the image's column."""
    params = {"rope_type": "default", "rope_theta": theta, "mrope_section": list(mrope)}
    if not slow_pairs:
        return params
    half = head_dim // 2
    if not 0 < slow_pairs < mrope[2]:
        raise ValueError(f"rope_slow_pairs must leave w ({mrope[2]} pairs) at least one pair, got {slow_pairs}")
    wavelen = [2 * math.pi * theta ** (2 * i / head_dim) for i in range(half)]
    lo, hi = wavelen[half - slow_pairs - 1], wavelen[half - slow_pairs]  # last kept, first slowed
    # llama3: wavelength > L / low_freq_factor is slowed, < L / high_freq_factor kept; L (an
    # integer in transformers' schema) falls between the two pairs and the smooth band below it.
    ctx = math.floor(hi)
    if not lo < ctx < hi:
        raise ValueError(f"no integer wavelength separates rotary pairs {half - slow_pairs - 1} and "
                         f"{half - slow_pairs} (wavelengths {lo:.2f}, {hi:.2f}): choose another rope_slow_pairs")
    return {**params, "rope_type": "llama3", "factor": SLOW_FACTOR, "low_freq_factor": 1.0,
            "high_freq_factor": 2 * ctx / (lo + ctx), "original_max_position_embeddings": ctx}


def organism_configs(oc: OrganismConfig, tokenizer):
    head_dim = oc.text_hidden // oc.text_heads
    # M-RoPE splits head_dim / 2 rotary frequencies across (t, h, w); 7B uses 16/24/24 of 64.
    half = head_dim // 2
    if oc.mrope_section is None:
        t_sec = half // 4
        hw = (half - t_sec) // 2
        mrope = [t_sec, hw, half - t_sec - hw]
    else:
        mrope = [int(v) for v in oc.mrope_section]
        if len(mrope) != 3 or sum(mrope) != half or min(mrope) < 1:
            raise ValueError(f"mrope_section must be 3 positive counts summing to head_dim / 2 = {half}, "
                             f"got {oc.mrope_section}")
    text = dict(hidden_size=oc.text_hidden, intermediate_size=oc.text_ffn,
                num_hidden_layers=oc.text_layers, num_attention_heads=oc.text_heads,
                num_key_value_heads=oc.text_kv_heads, rms_norm_eps=1e-6, max_position_embeddings=4096,
                tie_word_embeddings=True,
                rope_parameters=rope_parameters(oc.rope_theta, mrope, head_dim, oc.rope_slow_pairs))
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


def slow_rotary(model, slow_pairs: int) -> bool:
    """Set a built model's text rotary to `slow_pairs` slowed pairs (0: plain), in its config (so
    a saved checkpoint loads with it) and in the live rotary module. True if anything changed."""
    cfg = model.config.get_text_config()
    rp = cfg.rope_parameters
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    new = rope_parameters(rp["rope_theta"], rp["mrope_section"], head, slow_pairs)
    if {k: rp.get(k) for k in new} == new:
        return False
    cfg.rope_parameters = new  # the text config is the one Qwen2.5-VL's rotary reads
    lm = model.model.language_model
    lm.rotary_emb = type(lm.rotary_emb)(config=cfg).to(next(model.parameters()).device)
    return True


def set_input_size(processor, width: int, height: int) -> None:
    """Fix the processor's resize target to exactly width x height pixels (multiples of 28 at
    patch 14, 16 at patch 8 keep the 4:3 scene aspect without cropping)."""
    pixels = width * height
    for proc in (processor.image_processor, processor.video_processor):
        proc.size = {"shortest_edge": pixels, "longest_edge": pixels}


def build_organism(oc: OrganismConfig, seed: int = 0):
    """A freshly initialised organism (seeded) and its processor, with the project's tokenizer."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ..models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config, processor = organism_configs(oc, tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    init_number_embeddings(model, tokenizer)
    return model, processor


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


def save_checkpoint(model, processor, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "acs_model.json").write_text(json.dumps(meta, indent=2))




def export_organism(ckpt_dir: str | Path, out_dir: str | Path, card: str | None = None,
                    run_dir: str | Path | None = None) -> Path:
    """Copy a training checkpoint to the package assets in bf16 (half the bytes; the loader casts
    back to fp32 on CPU). The optimizer state is not shipped. With `run_dir`, its recipe goes into
    `acs_model.json` and its log beside the weights, so the card's tables can be regenerated and a
    later session can continue the recipe from the shipped weights (`--init-from`)."""
    import shutil

    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    src, out = Path(ckpt_dir), Path(out_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=torch.bfloat16)
    processor = AutoProcessor.from_pretrained(src)
    meta = json.loads((src / "acs_model.json").read_text())
    if run_dir is not None:
        run = Path(run_dir)
        meta["recipe_spec"] = json.loads((run / "recipe.json").read_text())
        meta["recipe"] = meta["recipe_spec"]["name"]
        from .card import chosen_temperature

        # `acs label` and `acs ground` sample at it unless told otherwise (pipeline.assets).
        t = chosen_temperature(run, meta["steps"])
        if t is not None:
            meta["temperature"] = t
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(run / "train_log.jsonl", out / "train_log.jsonl")
    save_checkpoint(model, processor, out, meta)
    if card:
        (out / "MODEL_CARD.md").write_text(card)
    return out
