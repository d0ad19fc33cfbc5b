"""Selectors as pure functions over one query's candidates. Every score: higher is better.

Inputs are plain arrays (K candidates, cand 0 = greedy):
- `boxes` (K, 4) xyxy original pixels, NaN rows for `no_box` candidates (never selected);
- `mean_logprob` (K,), mean log-probability of the coordinate tokens;
- `entropy` (K, 4, L, H), attention entropy per coordinate token, layer and head;
- `maps` (K, 4, L, H, gh, gw), attention over the merged visual grid (sums to 1 per map);
- `grid_boxes` (K, 4) boxes in grid units (for the in-box attention mass);
- `gt` (4,) ground truth, for the oracle only.
A selector that lacks its inputs returns all-NaN scores and selects nothing; the caller records that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import box_iou

SELECTORS = ("acs-learned", "acs-free", "greedy", "random", "logprob", "vote", "loc-mass", "oracle")


@dataclass
class QueryArrays:
    boxes: np.ndarray
    mean_logprob: np.ndarray
    entropy: np.ndarray | None = None
    maps: np.ndarray | None = None
    grid_boxes: np.ndarray | None = None
    gt: np.ndarray | None = None
    seed: int = 0

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.boxes).all(1)


@dataclass
class HeadProfile:
    """The (layer, head) pairs ACS-Free averages entropy over, for one model."""

    model_id: str
    heads: list[tuple[int, int]]
    method: str = "default-middle-third"
    meta: dict = field(default_factory=dict)

    @classmethod
    def default(cls, model_id: str, num_layers: int, num_heads: int) -> "HeadProfile":
        # Until calibrated: every head of the middle third of layers (the paper's discriminative
        # band is the middle-to-late layers of a 28-layer model).
        return cls(model_id, [(l, h) for l in middle_band(num_layers) for h in range(num_heads)])

    @classmethod
    def load(cls, path: str | Path, num_layers: int | None = None, num_heads: int | None = None) -> "HeadProfile":
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("heads"), list) or not data["heads"]:
            raise ValueError(f"head profile {path} must be a JSON object with a non-empty 'heads' list")
        heads = []
        for pair in data["heads"]:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, int) for v in pair)):
                raise ValueError(f"head profile {path}: bad (layer, head) pair {pair!r}")
            if (num_layers is not None and not 0 <= pair[0] < num_layers) or \
                    (num_heads is not None and not 0 <= pair[1] < num_heads):
                raise ValueError(f"head profile {path}: pair {pair} is outside the model's "
                                 f"{num_layers} layers x {num_heads} heads")
            heads.append((pair[0], pair[1]))
        return cls(str(data.get("model_id", "")), heads, str(data.get("method", "")), data.get("meta", {}))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"model_id": self.model_id, "method": self.method,
                                          "heads": [list(p) for p in self.heads], "meta": self.meta}, indent=2))

    @property
    def layers(self) -> list[int]:
        return sorted({l for l, _ in self.heads})


def _masked(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return np.where(valid, scores.astype(np.float64), np.nan)


def score_greedy(q: QueryArrays) -> np.ndarray:
    # The first candidate with a box: greedy itself unless it failed to produce one.
    return _masked(-np.arange(len(q.boxes), dtype=np.float64), q.valid)


def score_random(q: QueryArrays) -> np.ndarray:
    return _masked(np.random.default_rng(q.seed).random(len(q.boxes)), q.valid)


def score_logprob(q: QueryArrays) -> np.ndarray:
    return _masked(q.mean_logprob, q.valid)


def score_vote(q: QueryArrays) -> np.ndarray:
    """Self-consistency: summed IoU with the other candidates' boxes."""
    iou = box_iou(q.boxes, q.boxes)
    np.fill_diagonal(iou, 0.0)
    return _masked(iou.sum(1), q.valid)


def score_acs_free(q: QueryArrays, profile: HeadProfile) -> np.ndarray:
    """Negative mean attention entropy over the profile's heads and the 4 coordinate tokens."""
    if q.entropy is None:
        return np.full(len(q.boxes), np.nan)
    layers = np.array([l for l, _ in profile.heads])
    heads = np.array([h for _, h in profile.heads])
    ent = q.entropy[:, :, layers, heads]  # (K, 4, |D|)
    return _masked(-ent.mean((1, 2)), q.valid)


def middle_band(num_layers: int) -> list[int]:
    lo, hi = num_layers // 3, max(num_layers // 3 + 1, (2 * num_layers) // 3)
    return list(range(lo, hi))


def score_loc_mass(q: QueryArrays, layers: list[int] | None = None) -> np.ndarray:
    """MTLA-style: attention mass inside the candidate's own box, mean over heads and `layers`
    (default: the middle third of the layers in `maps`)."""
    if q.maps is None or q.grid_boxes is None:
        return np.full(len(q.boxes), np.nan)
    k, _, n_layers, _, gh, gw = q.maps.shape
    band = middle_band(n_layers) if layers is None else list(layers)
    scores = np.full(k, np.nan)
    ys = np.arange(gh)[:, None] + 0.5
    xs = np.arange(gw)[None, :] + 0.5
    for i in range(k):
        if not q.valid[i]:
            continue
        x1, y1, x2, y2 = q.grid_boxes[i]
        # A cell counts when its centre is inside; a box smaller than a cell still owns the cell
        # under its centre, so tiny objects are not scored zero by construction.
        inside = (xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)
        if not inside.any():
            cy = min(int((y1 + y2) / 2), gh - 1)
            cx = min(int((x1 + x2) / 2), gw - 1)
            inside = np.zeros((gh, gw), bool)
            inside[cy, cx] = True
        scores[i] = float((q.maps[i][:, band] * inside).sum((-1, -2)).mean())
    return scores


def score_oracle(q: QueryArrays) -> np.ndarray:
    if q.gt is None:
        return np.full(len(q.boxes), np.nan)
    return _masked(box_iou(q.boxes, q.gt[None])[:, 0], q.valid)


def select(scores: np.ndarray) -> int | None:
    """Index of the best finite score (ties: the lowest index, i.e. greedy first); None if none."""
    finite = np.isfinite(scores)
    if not finite.any():
        return None
    best = np.nanmax(np.where(finite, scores, -np.inf))
    return int(np.flatnonzero(finite & (scores == best))[0])
