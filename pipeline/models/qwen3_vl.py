"""Qwen3-VL: JSON `bbox_2d` in 0..1000 normalised coordinates; one image span per prompt.

Layout as Qwen2.5-VL (one token per 2x2 block of patches, raster order of the merged grid, found
by the image token id and `image_grid_thw`), with 16-px patches, so one token covers 32 x 32 input
pixels. DeepStack adds vision-tower features to the hidden states of the visual positions in the
first language-model layers; it changes nothing about where the visual tokens sit, and capture
reads the decoder's own attention, so the adapter needs nothing for it. Positions are interleaved
M-RoPE with per-row `rope_deltas`, exactly the base adapter's default handling.

The MoE variants (`qwen3_vl_moe`, e.g. Qwen3-VL-30B-A3B) share the processor, the prompt layout and
the vision tower; only the decoder MLPs differ, so they register here too.
"""

from __future__ import annotations

from .base import register
from .qwen2_5_vl import Qwen25VLAdapter


@register("qwen3-vl", model_types=("qwen3_vl", "qwen3_vl_moe"))
class Qwen3VLAdapter(Qwen25VLAdapter):
    coord_system = "norm1000"
    released_style = None  # always fenced (answer_text below)

    def box_instruction(self, category: str) -> str:
        return "Report its bbox_2d coordinates in JSON format."

    def answer_text(self, box, category: str) -> str:
        # Qwen3-VL fences its JSON answers.
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        return f'```json\n[\n\t{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "{category}"}}\n]\n```'
