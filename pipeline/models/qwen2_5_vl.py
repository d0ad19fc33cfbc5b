"""Qwen2.5-VL: JSON `bbox_2d` in absolute pixels of the resized input; one image span per prompt.

The vision tower emits one token per 2x2 block of 14-px patches ("merged" tokens) in raster order of
the merged grid (its window attention reorders internally and restores the order at the end), so the
visual span of an image reshapes to (grid_h / merge, grid_w / merge) directly.
"""

from __future__ import annotations

from .base import Adapter, Encoded, register


@register("qwen2.5-vl", model_types=("qwen2_5_vl",))
class Qwen25VLAdapter(Adapter):
    coord_system = "absolute"
    # The released checkpoints answer in a fenced, tab-indented JSON block; the organism (and the
    # project's tiny models) in plain JSON. Box-only decoding forces the style's opening.
    released_style = "fenced"

    def box_instruction(self, category: str) -> str:
        return 'Output its bbox_2d in JSON.'

    def answer_text(self, box, category: str) -> str:
        return self.answers_text([(box, category)])

    def answers_text(self, items) -> str:
        """Several (box, category) items in one answer, as the family lists the objects it detects."""
        parts = []
        for box, category in items:
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            parts.append(f'{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "{category}"}}')
        if self.answer_style == "fenced":
            return "```json\n[\n" + ",\n".join(f"\t{p}" for p in parts) + "\n]\n```"
        return "[" + ", ".join(parts) + "]"

    def encode(self, images, categories, opening: bool = False) -> Encoded:
        texts, opens = self._prompt_texts(categories, opening)
        inputs = self.processor(text=texts, images=list(images), return_tensors="pt", padding=True,
                                padding_side="left")
        image_token_id = self.model.config.image_token_id
        merge = self.processor.image_processor.merge_size
        patch = self.processor.image_processor.patch_size
        visual_positions, grids, input_sizes = [], [], []
        for i, (t, h, w) in enumerate(inputs["image_grid_thw"].tolist()):
            pos = (inputs["input_ids"][i] == image_token_id).nonzero().flatten()
            gh, gw = h // merge, w // merge
            assert pos.numel() == t * gh * gw, "visual span does not match the image grid"
            visual_positions.append(pos)
            grids.append((gh, gw))
            input_sizes.append((h * patch, w * patch))
        return self._with_openings(Encoded(inputs=self._to_device(inputs), visual_positions=visual_positions,
                                           grids=grids, input_sizes=input_sizes,
                                           orig_sizes=[(im.height, im.width) for im in images]), opens)
