"""Model adapters: what differs between LVLM families, behind one small interface.

An adapter knows a family's prompt, its box format, where the visual tokens sit in the sequence and
how they lay out spatially. Sampling, capture and scoring are family-neutral and only talk to this.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..boxes import RawBox, clamp_box, find_box, token_char_ends, tokens_for_spans

PROMPT = "Detect the {category} in the image."
# Where the query's words sit against the image in the user turn. Released checkpoints are prompted
# image first. Text first lets the visual tokens read the query (attention is causal): each can
# then tell whether it is the object asked for, instead of the answer having to match the query
# against the image in one step. A model trained that way records it in acs_model.json.
QUERY_ORDERS = ("image_first", "text_first")


@dataclass
class Encoded:
    """A left-padded batch of prompts, with per-item layout of the visual tokens."""

    inputs: dict  # processor output, on the model's device
    visual_positions: list[torch.Tensor]  # per item: sequence positions of its visual tokens
    grids: list[tuple[int, int]]  # per item: (h, w) of the merged token grid, raster order
    # per item: (height, width) of the resized model input that the grid covers (InternVL: the
    # tile canvas, or the thumbnail with layout="thumbnail")
    input_sizes: list[tuple[int, int]]
    orig_sizes: list[tuple[int, int]]  # per item: (height, width) of the original image
    # per item: the token ids of the answer's forced opening at the end of its prompt
    # (`encode(..., opening=True)`, box-only decoding), None when the answer is decoded whole
    openings: list[list[int]] | None = None
    opening_texts: list[str] | None = None

    def select(self, idx: list[int]) -> "Encoded":
        """The items `idx`, for a round that reuses their `Prefill`: token ids and mask only (a
        family's image inputs are not laid out one row per item, and are not needed again)."""
        sel = torch.tensor(idx, dtype=torch.long, device=self.inputs["input_ids"].device)
        pick = (lambda xs: None if xs is None else [xs[i] for i in idx])
        return Encoded(inputs={k: self.inputs[k][sel] for k in ("input_ids", "attention_mask")},
                       visual_positions=pick(self.visual_positions), grids=pick(self.grids),
                       input_sizes=pick(self.input_sizes), orig_sizes=pick(self.orig_sizes),
                       openings=pick(self.openings), opening_texts=pick(self.opening_texts))


@dataclass
class ParsedBox:
    box: tuple[float, float, float, float] | None  # original-image pixels, xyxy; None = no_box
    box_fixed: bool = False
    coord_tokens: list[list[int]] = field(default_factory=list)  # token indices per x1,y1,x2,y2
    error: str | None = None


class Adapter:
    """Base class; a family subclass fills in the prompt, the box convention and the layout."""

    family: str = ""
    # How the family writes coordinates: "absolute" (pixels of the resized input) or "norm1000".
    coord_system: str = "absolute"
    # Which visual tokens `Encoded.visual_positions` / `grids` cover (and so what capture
    # renormalises over): "native" = every visual token of the image, one merged grid. Families
    # with several views of an image (InternVL's tiles + thumbnail) say which view(s) they expose.
    visual_layout: str = "native"
    # How answers are written, where a family's released checkpoints and the project's own models
    # differ (Qwen2.5-VL's released checkpoints fence their JSON; the organism was trained on plain
    # JSON). `load_adapter` sets the released style for a checkpoint the project did not build
    # (no acs_model.json) and the recorded one otherwise.
    answer_style: str = "plain"
    released_style: str | None = None
    query_order: str = "image_first"  # one of QUERY_ORDERS; `load_adapter` sets the recorded one

    def __init__(self, model, processor, model_id: str):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_id = model_id

    def layout_info(self) -> dict:
        """What a run record should carry about how this adapter reads boxes and visual tokens."""
        return {"family": self.family, "coord_system": self.coord_system, "visual_layout": self.visual_layout}

    # ---- text -------------------------------------------------------------------------------
    def check_query(self, category: str) -> str | None:
        """Why a query text cannot be put in this family's prompt, or None."""
        from ..inputs import check_query_text

        bad = check_query_text(category)
        if bad:
            return bad
        specials = [t for t in self.tokenizer.all_special_tokens if t and t in category]
        if specials:
            return f"query text contains the model's special token(s) {specials}"
        return None

    def prompt(self, category: str) -> str:
        return PROMPT.format(category=category) + " " + self.box_instruction(category)

    def box_instruction(self, category: str) -> str:
        raise NotImplementedError

    def messages(self, category: str) -> list[dict]:
        """The single-query user turn, image and query in `query_order`."""
        image, text = {"type": "image"}, {"type": "text", "text": self.prompt(category)}
        return [{"role": "user", "content": [text, image] if self.query_order == "text_first" else [image, text]}]

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_token_ids[0]

    def answer_opening(self, category: str) -> str:
        """The fixed text the family's answer starts with, up to its first coordinate (Qwen2.5-VL
        `[{"bbox_2d": [`, InternVL `<ref>cat</ref><box>[[`): read off `answer_text`, so a family
        defines its format once."""
        text = self.answer_text((1, 2, 3, 4), category)
        return text[: find_box(text).spans[0][0]]

    @property
    def box_close_ids(self) -> list[int]:
        """Token ids that close a box once its opening is written: every token containing `]`
        (each family's coordinate list ends with one, and no coordinate contains one)."""
        if getattr(self, "_close_ids", None) is None:
            self._close_ids = sorted(i for t, i in self.tokenizer.get_vocab().items() if "]" in t)
        return self._close_ids

    # ---- layout -----------------------------------------------------------------------------
    def encode(self, images, categories, opening: bool = False) -> Encoded:
        """A batch of prompts; `opening=True` appends each answer's forced opening to its prompt."""
        raise NotImplementedError

    def _prompt_texts(self, categories, opening: bool) -> tuple[list[str], list[str] | None]:
        texts = [self.processor.apply_chat_template(self.messages(c), add_generation_prompt=True,
                                                    tokenize=False) for c in categories]
        if not opening:
            return texts, None
        opens = [self.answer_opening(c) for c in categories]
        return [t + o for t, o in zip(texts, opens)], opens

    def _with_openings(self, enc: Encoded, opens: list[str] | None) -> Encoded:
        """Record the openings' token ids, checking that the prompt ends with exactly them: a
        tokenizer that merged the opening into the template's last token would make the model read
        a prompt it never wrote."""
        if opens is None:
            return enc
        ids, mask = enc.inputs["input_ids"], enc.inputs["attention_mask"]
        enc.openings, enc.opening_texts = [], opens
        for i, o in enumerate(opens):
            want = self.tokenizer(o, add_special_tokens=False)["input_ids"]
            got = ids[i, ids.shape[1] - len(want):].tolist()
            if got != want or not bool(mask[i, -len(want):].all()):
                raise ValueError(f"the answer opening {o!r} does not tokenize the same after the prompt "
                                 f"({got} != {want}); use full decoding for this model")
            enc.openings.append(want)
        return enc

    def _to_device(self, inputs) -> dict:
        device = self.model.device
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    # ---- positions --------------------------------------------------------------------------
    # Sampling prefills with `prefill_inputs` and then passes positions explicitly. The default is
    # M-RoPE (Qwen2.5-VL, Qwen3-VL): the model derives the prompt's 3-axis positions itself and
    # keeps per-row offsets (`rope_deltas`) that text positions after the prompt add.
    def prefill_inputs(self, enc: Encoded) -> dict:
        """Keyword arguments of the prefill forward (the processor output by default)."""
        return enc.inputs

    def rope_deltas(self, enc: Encoded) -> torch.Tensor:
        """Per-row position offset after the prefill, (B, 1)."""
        deltas = getattr(self.model.model, "rope_deltas", None)
        if deltas is None:
            return torch.zeros(enc.inputs["input_ids"].shape[0], 1, dtype=torch.long,
                               device=enc.inputs["input_ids"].device)
        return deltas

    def text_positions(self, mask: torch.Tensor, n: int, deltas: torch.Tensor) -> torch.Tensor:
        """Position ids of the last `n` tokens of rows with attention `mask` (B, P)."""
        # Text tokens after the prompt use one position for all three M-RoPE axes: the count of real
        # tokens before them plus the per-row offset that the image grid introduced (rope_deltas).
        pos = mask.long().cumsum(-1)[:, -n:] - 1 + deltas  # (B, n)
        return pos[None].expand(3, -1, -1)

    @property
    def num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.model.config.get_text_config().num_attention_heads

    # ---- boxes ------------------------------------------------------------------------------
    def to_original(self, raw: RawBox, input_size, orig_size):
        """Map the four numbers to original-image pixels (xyxy), before clamping."""
        (ih, iw), (oh, ow) = input_size, orig_size
        x1, y1, x2, y2 = raw.values
        if self.coord_system == "norm1000":
            return (x1 * ow / 1000, y1 * oh / 1000, x2 * ow / 1000, y2 * oh / 1000)
        return (x1 * ow / iw, y1 * oh / ih, x2 * ow / iw, y2 * oh / ih)

    def from_original(self, box, input_size, orig_size) -> tuple[float, float, float, float]:
        """Inverse of `to_original`: how the model should write an original-pixel box."""
        (ih, iw), (oh, ow) = input_size, orig_size
        x1, y1, x2, y2 = box
        if self.coord_system == "norm1000":
            return (x1 * 1000 / ow, y1 * 1000 / oh, x2 * 1000 / ow, y2 * 1000 / oh)
        return (x1 * iw / ow, y1 * ih / oh, x2 * iw / ow, y2 * ih / oh)

    def parse(self, token_ids: list[int], input_size, orig_size, opening: str = "") -> tuple[str, ParsedBox]:
        """Decode generated tokens and parse the first box; never raises on model output.

        `opening`: the forced text before the generated tokens (box-only decoding); the returned
        text is the whole answer, opening included, and coordinate tokens index the generated ones."""
        text = opening + self.tokenizer.decode(token_ids, skip_special_tokens=False,
                                               clean_up_tokenization_spaces=False)
        raw = find_box(text)
        if raw is None:
            return text, ParsedBox(None, error="no well-formed box of four numbers in the output")
        box, fixed = clamp_box(self.to_original(raw, input_size, orig_size), orig_size[1], orig_size[0])
        if box is None:
            return text, ParsedBox(None, fixed, error=f"box {list(raw.values)} is empty inside the image")
        if raw.spans[0][0] < len(opening):  # a number inside the forced text is not the model's
            return text, ParsedBox(None, error="the box starts inside the forced opening")
        spans = [(a - len(opening), b - len(opening)) for a, b in raw.spans]
        coord_tokens = tokens_for_spans(token_char_ends(self.tokenizer, token_ids), spans)
        return text, ParsedBox(box, fixed, coord_tokens)

    def answer_text(self, box_in_model_coords, category: str) -> str:
        """The text the family would write for a box (used to train and to test the parser)."""
        raise NotImplementedError


# ---- registry ---------------------------------------------------------------------------------
ADAPTERS: dict[str, type[Adapter]] = {}
# model_type in config.json -> family name
MODEL_TYPES: dict[str, str] = {}


def register(family: str, model_types: tuple[str, ...]) -> Callable[[type[Adapter]], type[Adapter]]:
    def deco(cls):
        cls.family = family
        ADAPTERS[family] = cls
        for mt in model_types:
            MODEL_TYPES[mt] = family
        return cls
    return deco


def organism_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "organism"


def resolve_model(model: str) -> str:
    """`organism` -> the shipped checkpoint; a local directory or hub id is returned as is.

    Something that can only be a local path (absolute, relative with ./ or ~, or more than one
    slash) must exist: otherwise the hub client would answer with a confusing repo-id error.
    """
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        path = os.path.expanduser(model)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory {model} does not exist")
        return path
    if model == "organism":
        path = organism_dir()
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"the organism checkpoint is missing at {path}; train it with `acs train-organism`")
        return str(path)
    return model


def _register_families() -> None:
    # Every family module registers itself on import; `pipeline.models` imports them all, this
    # makes the registry complete however `base` itself was reached.
    from . import internvl, qwen2_5_vl, qwen3_vl  # noqa: F401


def family_of(model: str, trust_remote_code: bool = False) -> str:
    from transformers import AutoConfig

    _register_families()
    cfg = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    family = MODEL_TYPES.get(cfg.model_type)
    if family is None:
        raise ValueError(f"model type {cfg.model_type!r} of {model!r} has no adapter; supported families: "
                         f"{sorted(ADAPTERS)}")
    return family


def load_adapter(model: str = "organism", device: str | None = None, dtype: str = "auto",
                 trust_remote_code: bool = False, attn_implementation: str = "sdpa",
                 **adapter_kwargs) -> Adapter:
    """Load model and processor (hub id, local directory or `organism`) behind its family adapter.

    `HF_HUB_OFFLINE=1` is honoured by transformers itself; weights load only from safetensors.
    `adapter_kwargs` go to the family adapter (e.g. `layout=` for InternVL).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_model(model)
    family = family_of(path, trust_remote_code)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    net = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
        attn_implementation=attn_implementation,
    ).to(device).eval()
    model_id, style, order = model, ADAPTERS[family].released_style, "image_first"
    meta = Path(path) / "acs_model.json"
    if os.path.isdir(path) and meta.exists():
        info = json.loads(meta.read_text())
        model_id, style = info.get("model_id", model), info.get("answer_style", "plain")
        order = info.get("query_order", order)
        if order not in QUERY_ORDERS:
            raise ValueError(f"{meta}: query_order {order!r} is not one of {QUERY_ORDERS}")
    adapter = ADAPTERS[family](net, processor, model_id, **adapter_kwargs)
    if style is not None:
        adapter.answer_style = style
    adapter.query_order = order
    return adapter
