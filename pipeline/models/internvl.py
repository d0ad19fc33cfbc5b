"""InternVL-3.5 (Hugging Face format): `<ref>label</ref><box>[[x1, y1, x2, y2]]</box>` in 0..1000.

Visual layout. `InternVLProcessor` (with `GotOcr2ImageProcessor`) cuts an image into 1..max_patches
square tiles of `tile` px on the canvas (cols x rows) whose aspect ratio is closest to the image's,
row-major, and appends a thumbnail (the whole image resized to one tile) when there is more than
one tile. Each view becomes `image_seq_length` = (tile / patch / 2)^2 tokens (256 for 448 px, patch
14) after pixel shuffle, in raster order of its (s x s) token grid, s = tile / patch / 2. The prompt
holds `<img>` + all views' tokens + `</img>`, tiles first, thumbnail last.

Capture needs one spatial grid per image. Two honest choices, both offered (`layout=`):
  "tiles" (default): the tiles' tokens stitched into one (rows*s) x (cols*s) grid covering the
      whole image (the tiled canvas is the image resized without keeping the aspect ratio, so the
      grid maps linearly onto original pixels). The thumbnail's tokens are left out: attention is
      renormalised over the tile tokens only. With a single tile, that tile is the whole image.
  "thumbnail": the thumbnail's s x s grid only (the single tile when there is one); the
      high-resolution tiles are left out.
The choice is `Adapter.visual_layout`, carried in run records through `layout_info()`.

Positions: plain 1-D RoPE (Qwen3 language model). The model does not derive positions from the
attention mask, so the prefill gets them explicitly (count of real tokens before each token, as
`generate` does); after the prompt the same count is used, with no offset.
"""

from __future__ import annotations

import math

import torch

from .base import Adapter, Encoded, register

LAYOUTS = ("tiles", "thumbnail")


def tile_canvas(height: int, width: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(rows, cols) of the tile canvas the processor chooses for an image of this size."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    cols, rows = get_optimal_tiled_canvas((height, width), (tile, tile), min_tiles, max_tiles)
    return rows, cols


@register("internvl3.5", model_types=("internvl",))
class InternVLAdapter(Adapter):
    coord_system = "norm1000"
    visual_layout = "tiles"

    def __init__(self, model, processor, model_id: str, layout: str | None = None):
        super().__init__(model, processor, model_id)
        if layout is not None:
            if layout not in LAYOUTS:
                raise ValueError(f"InternVL layout must be one of {LAYOUTS}, got {layout!r}")
            self.visual_layout = layout

    def box_instruction(self, category: str) -> str:
        # InternVL's own grounding request; the answer names the object in <ref> and boxes it.
        return ("Please provide the bounding box coordinate of the region this sentence describes: "
                f"<ref>{category}</ref>")

    def answer_text(self, box, category: str) -> str:
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        return f"<ref>{category}</ref><box>[[{x1}, {y1}, {x2}, {y2}]]</box>"

    # ---- layout -----------------------------------------------------------------------------
    @property
    def tile_size(self) -> int:
        size = self.processor.image_processor.size
        return int(size["height"] if isinstance(size, dict) else size.height)

    @property
    def tokens_per_side(self) -> int:
        s = math.isqrt(int(self.processor.image_seq_length))
        assert s * s == self.processor.image_seq_length, "image_seq_length is not a square token grid"
        return s

    def encode(self, images, categories, opening: bool = False) -> Encoded:
        texts, opens = self._prompt_texts(categories, opening)
        inputs = self.processor(text=texts, images=list(images), return_tensors="pt", padding=True,
                                padding_side="left")
        ip = self.processor.image_processor
        image_token_id = self.model.config.image_token_id
        per_view = int(self.processor.image_seq_length)
        s, tile = self.tokens_per_side, self.tile_size
        visual_positions, grids, input_sizes = [], [], []
        for i, im in enumerate(images):
            pos = (inputs["input_ids"][i] == image_token_id).nonzero().flatten()
            views = pos.numel() // per_view
            assert views * per_view == pos.numel() and views >= 1, "visual span is not a whole number of views"
            rows, cols = (1, 1)
            if views > 1:
                rows, cols = tile_canvas(im.height, im.width, tile, ip.min_patches, ip.max_patches)
                assert views == rows * cols + 1, (
                    f"{views} views for a {rows}x{cols} tile canvas: expected tiles + thumbnail")
            if self.visual_layout == "thumbnail" or views == 1:
                visual_positions.append(pos[-per_view:])
                grids.append((s, s))
                input_sizes.append((tile, tile))
            else:
                # tiles row-major, each an s x s raster -> one (rows*s) x (cols*s) raster
                mosaic = pos[: rows * cols * per_view].reshape(rows, cols, s, s).permute(0, 2, 1, 3)
                visual_positions.append(mosaic.reshape(-1))
                grids.append((rows * s, cols * s))
                input_sizes.append((rows * tile, cols * tile))
        return self._with_openings(Encoded(inputs=self._to_device(inputs), visual_positions=visual_positions,
                                           grids=grids, input_sizes=input_sizes,
                                           orig_sizes=[(im.height, im.width) for im in images]), opens)

    # ---- positions ----------------------------------------------------------------------------
    def prefill_inputs(self, enc: Encoded) -> dict:
        mask = enc.inputs["attention_mask"]
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return {**enc.inputs, "position_ids": pos}

    def rope_deltas(self, enc: Encoded) -> torch.Tensor:
        ids = enc.inputs["input_ids"]
        return torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)

    def text_positions(self, mask: torch.Tensor, n: int, deltas: torch.Tensor) -> torch.Tensor:
        return mask.long().cumsum(-1)[:, -n:] - 1 + deltas
