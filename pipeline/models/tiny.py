"""Random-weight models of real architectures, built offline from configs.

Tests and benchmarks need the real Qwen2.5-VL code path (processor, vision tower, M-RoPE,
attention) without downloading anything. `--shape 7b` keeps Qwen2.5-VL-7B's real dimensions
(hidden size, heads, KV heads, vision tower) with only K text layers, so memory and speed
measurements are about the real per-layer cost.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Qwen2.5-VL-7B-Instruct's published config.json, text and vision parts.
QWEN25_VL_7B_TEXT = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, max_position_embeddings=128000,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
QWEN25_VL_7B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
)

# Small enough for unit tests on 2 cores; heads and mrope sections kept consistent with head_dim.
TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
)
TINY_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
    fullatt_block_indexes=[1], tokens_per_second=2,
)

SHAPES = {"tiny": (TINY_TEXT, TINY_VISION), "7b": (QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION)}


def qwen25_vl_config(text: dict, vision: dict, tokenizer, **overrides):
    """A `Qwen2_5_VLConfig` whose special-token ids come from `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    text = dict(text)
    text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
    text.update(overrides)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>",
            "<|endoftext|>")}
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(vision),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=text.get("tie_word_embeddings", False),
    )


def build_processor(tokenizer, patch_size: int = 14, merge_size: int = 2,
                    min_pixels: int = 56 * 56, max_pixels: int = 1280 * 28 * 28):
    """A `Qwen2_5_VLProcessor` exactly as real checkpoints carry one (image + video processors).

    transformers 5.24 needs torchvision for the video half even though grounding never uses video;
    that is why the project installs the torch/torchvision pair (docs/architecture.md).
    """
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    common = dict(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                  image_mean=[0.48145466, 0.4578275, 0.40821073],
                  image_std=[0.26862954, 0.26130258, 0.27577711])
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **common),
        video_processor=Qwen2VLVideoProcessor(size=size, **common),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def make_tiny_model(out_dir: str | Path, family: str = "qwen2.5-vl", shape: str = "tiny",
                    layers: int | None = None, seed: int = 0, dtype: str | None = None,
                    max_pixels: int | None = None, vision_layers: int | None = None) -> Path:
    """Build and save a random-weight model, tokenizer and processor; return the directory."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .tokenizer import build_tokenizer

    if family != "qwen2.5-vl":
        raise ValueError(f"unknown family {family!r}; supported: qwen2.5-vl")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; supported: {sorted(SHAPES)}")
    text, vision = SHAPES[shape]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    overrides = {"num_hidden_layers": layers} if layers else {}
    if vision_layers:
        # Benchmarks of text-side attention may shorten the vision tower (same per-block shape),
        # which otherwise dominates CPU time; full-attention blocks are kept within range.
        vision = dict(vision, depth=vision_layers,
                      fullatt_block_indexes=[i for i in vision["fullatt_block_indexes"] if i < vision_layers]
                      or [vision_layers - 1])
    config = qwen25_vl_config(text, vision, tokenizer, **overrides)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[dtype]
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if shape == "7b" else torch.float32
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # build in the target dtype: the 7B shape is large
    try:
        model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(prev)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    # Tiny models see tiny images in tests; the 7B shape defaults to ~1,000 visual tokens.
    default_max = 1024 * 28 * 28 if shape == "7b" else 256 * 28 * 28
    build_processor(tokenizer, patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
                    max_pixels=max_pixels or default_max).save_pretrained(out)
    (out / "acs_model.json").write_text(json.dumps(
        {"family": family, "shape": shape, "layers": config.text_config.num_hidden_layers,
         "vision_layers": config.vision_config.depth,
         "seed": seed, "random_weights": True}, indent=2))
    return out
