"""An offline tokenizer and chat templates with the special tokens of each supported family.

Real Qwen2.5-VL checkpoints ship a 151k-token byte-level BPE; we cannot download it, and the
organism does not need it. This builds a small byte-level BPE (trained on the kinds of text the
grounding prompts and answers contain) with the same special tokens and the same chat template
layout, so the standard `AutoProcessor` path and our adapter treat it exactly like the real one.

Integers 0..`max_number` are single tokens: the organism predicts one token per coordinate (the
feasibility probe found digit-by-digit coordinates much slower to learn). The adapter never relies
on that: it maps coordinates to tokens through character offsets, so digit-split tokenizers (the
real Qwen) work the same way.

Qwen3-VL and InternVL-3.5 (whose language model is Qwen3) share Qwen's base special tokens; each
family adds its own on top (`FAMILY_SPECIAL_TOKENS`) and has its own chat template layout
(`CHAT_TEMPLATES`). The Qwen2.5-VL tokenizer (the organism's) is unchanged by them: family tokens
are appended after the integers, so every Qwen2.5-VL id stays what it was.
"""

from __future__ import annotations

import itertools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Qwen2.5-VL's special tokens, in its order (ids differ from the real vocabulary; nothing depends on
# the absolute ids, only on the names).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The layout of Qwen2.5-VL's own chat template (system default, vision markers around each image),
# without tool calling, which grounding never uses.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's chat template layout: no default system message (unlike Qwen2.5-VL), vision markers
# around each image, no thinking block for the Instruct models.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# InternVL's HF chat template layout: one <IMG_CONTEXT> placeholder per image followed by a newline,
# which `InternVLProcessor` expands to <img> + <IMG_CONTEXT> x (256 per tile) + </img>.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<IMG_CONTEXT>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Special tokens a family adds to Qwen's (InternVL's own tokenizer carries these; its processor
# finds the image ones through the named attributes below).
FAMILY_SPECIAL_TOKENS = {
    "qwen2.5-vl": [],
    "qwen3-vl": [],
    "internvl3.5": ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>",
                    "</box>", "<video>"],
}
FAMILY_NAMED_TOKENS = {
    "internvl3.5": {"start_image_token": "<img>", "end_image_token": "</img>",
                    "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
}
CHAT_TEMPLATES = {"qwen2.5-vl": CHAT_TEMPLATE, "qwen3-vl": QWEN3_VL_CHAT_TEMPLATE,
                  "internvl3.5": INTERNVL_CHAT_TEMPLATE}

_WORDS = (
    "detect the in image output its bounding box as json format bbox_2d label locate find "
    "object a an of and with you are helpful assistant system user please give coordinates "
    "where is small large medium left right top bottom red green blue yellow purple orange cyan "
    "white black gray grey brown pink circle square triangle star diamond cross person car dog cat "
    "bird chair cup bottle book phone there no not found"
).split()


def _training_corpus() -> list[str]:
    lines = []
    for w1, w2 in itertools.product(_WORDS[:40], _WORDS[40:]):
        lines.append(f"Detect the {w1} {w2} in the image. Output its bbox_2d as JSON.")
        lines.append(f'[{{"bbox_2d": [12, 34, 56, 78], "label": "{w1} {w2}"}}]')
    lines.append("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    lines.extend("".join(chr(c) for c in range(32, 127)) for _ in range(3))
    return lines


def build_tokenizer(max_number: int = 1023, vocab_size: int = 1024, family: str = "qwen2.5-vl"):
    """A `PreTrainedTokenizerFast` with the family's special tokens and chat template."""
    if family not in CHAT_TEMPLATES:
        raise ValueError(f"unknown family {family!r}; supported: {sorted(CHAT_TEMPLATES)}")

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    # Whole integers as added (non-special) tokens: matched before pre-tokenisation, longest first,
    # so "123" is one token and decodes back to "123".
    tok.add_tokens([str(i) for i in range(max_number + 1)])
    return wrap_backend(tok, family, SPECIAL_TOKENS[1:], model_max_length=32768)


def wrap_backend(tok, family: str, specials: list[str], **kwargs):
    """`tok` (a `tokenizers.Tokenizer` holding Qwen's base special tokens) with the family's own
    special tokens appended, as a left-padding `PreTrainedTokenizerFast` with its chat template."""
    from transformers import PreTrainedTokenizerFast

    extra = FAMILY_SPECIAL_TOKENS[family]
    if extra:
        tok.add_special_tokens(extra)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(specials) + extra,
        padding_side="left",
        **FAMILY_NAMED_TOKENS.get(family, {}),
        **kwargs,
    )
    fast.chat_template = CHAT_TEMPLATES[family]
    return fast
