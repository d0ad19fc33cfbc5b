"""Defensive parsing of boxes from model text, and mapping characters back to tokens.

Family-neutral: each adapter says how the four numbers are to be read (absolute pixels of the
resized input, or 0..1000 normalised); this module only finds them. The first well-formed box wins;
coordinates are clamped to the image and reordered (METHOD.md); a box that is empty after that, or
no box at all, is `None` and the caller records `no_box` with the raw text kept.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_NUM = r"(-?\d+(?:\.\d+)?)"
_SEP = r"\s*,\s*"
_QUAD = r"\[\s*" + _NUM + _SEP + _NUM + _SEP + _NUM + _SEP + _NUM + r"\s*\]"
# Preferred: a family's box marker, the JSON key of the Qwen families ("bbox_2d": [...]) or
# InternVL's <box>[[...]]</box> (its outer brackets optional); fallback: the first bare list of four
# numbers.
_KEYED = re.compile(r'(?:"?bbox(?:_2d)?"?\s*:\s*|<box>\s*\[?\s*)' + _QUAD)
_BARE = re.compile(_QUAD)


@dataclass(frozen=True)
class RawBox:
    """Four numbers as written, with the character span of each (x1, y1, x2, y2 order)."""

    values: tuple[float, float, float, float]
    spans: tuple[tuple[int, int], ...]


def find_box(text: str) -> RawBox | None:
    """The first well-formed four-number box in `text`, or None."""
    if not isinstance(text, str):
        return None
    m = _KEYED.search(text) or _BARE.search(text)
    if m is None:
        return None
    values = tuple(float(m.group(i)) for i in range(1, 5))
    if not all(math.isfinite(v) for v in values):
        return None
    return RawBox(values=values, spans=tuple(m.span(i) for i in range(1, 5)))


def clamp_box(box, width: float, height: float) -> tuple[tuple[float, float, float, float] | None, bool]:
    """Reorder and clamp to [0, width] x [0, height]; None when nothing is left of the box.

    The flag says whether anything had to be fixed (reported per candidate as `box_fixed`).
    """
    x1, y1, x2, y2 = box
    fixed = x1 > x2 or y1 > y2
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    cx1, cx2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    cy1, cy2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    fixed = fixed or (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)
    if cx2 - cx1 <= 0 or cy2 - cy1 <= 0:
        return None, fixed
    return (cx1, cy1, cx2, cy2), fixed


def token_char_ends(tokenizer, token_ids: list[int]) -> list[int]:
    """End character offset of each token in the decoded text.

    Decoding growing prefixes is exact for any tokenizer (byte-level pieces that split a character
    included), unlike summing per-token strings; sequences are tens of tokens, so it is cheap.
    """
    texts = tokenizer.batch_decode([token_ids[: i + 1] for i in range(len(token_ids))],
                                   skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return [len(t) for t in texts]


def tokens_for_spans(char_ends: list[int], spans) -> list[list[int]]:
    """For each character span, the indices of the tokens that overlap it."""
    starts = [0] + char_ends[:-1]
    out = []
    for s, e in spans:
        out.append([i for i, (a, b) in enumerate(zip(starts, char_ends)) if a < e and b > s])
    return out
