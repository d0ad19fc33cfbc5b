"""Selectors as pure functions over one query's candidates. Every score: higher is better.

Inputs are plain arrays (K candidates, cand 0 = greedy):
- `boxes` (K, 4) xyxy original pixels, NaN rows for `no_box` candidates (never selected);
- `mean_logprob` (K,), mean log-probability of the coordinate tokens;
- `entropy` (K, 4, L, H), attention entropy per coordinate token, layer and head;
- `maps` (K, 4, L, H, gh, gw), attention over the merged visual grid (sums to 1 per map);
- `grid_boxes` (K, 4) boxes in grid units (for the in-box attention mass);
- `prompt_maps` (L, H, gh, gw), the prompt's last token's attention over the grid (one per query:
  it reads the prompt, not the candidates), for the localization-heads selector;
- `gt` (4,) ground truth, for the oracle only.
A selector that lacks its inputs returns all-NaN scores and selects nothing; the caller records that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import box_iou

SELECTORS = ("acs-learned", "acs-free", "greedy", "random", "logprob", "vote", "loc-mass", "loc-heads", "oracle")


@dataclass
class QueryArrays:
    boxes: np.ndarray
    mean_logprob: np.ndarray
    entropy: np.ndarray | None = None
    maps: np.ndarray | None = None
    grid_boxes: np.ndarray | None = None
    prompt_maps: np.ndarray | None = None
    gt: np.ndarray | None = None
    seed: int = 0

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.boxes).all(1)


@dataclass
class HeadProfile:
    """The (layer, head) pairs ACS-Free averages entropy over, for one model; with `loc_heads`,
    the few localization heads of the loc-heads baseline, chosen on the same calibration run."""

    model_id: str
    heads: list[tuple[int, int]]
    method: str = "default-middle-third"
    meta: dict = field(default_factory=dict)
    loc_heads: list[tuple[int, int]] | None = None

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
        heads = _pairs(path, "heads", data["heads"], num_layers, num_heads)
        loc = data.get("loc_heads")
        if loc is not None:
            if not isinstance(loc, list) or not loc:
                raise ValueError(f"head profile {path}: 'loc_heads' must be a non-empty list of (layer, head) pairs")
            loc = _pairs(path, "loc_heads", loc, num_layers, num_heads)
        return cls(str(data.get("model_id", "")), heads, str(data.get("method", "")), data.get("meta", {}), loc)

    def save(self, path: str | Path) -> None:
        data = {"model_id": self.model_id, "method": self.method, "heads": [list(p) for p in self.heads],
                "meta": self.meta}
        if self.loc_heads:
            data["loc_heads"] = [list(p) for p in self.loc_heads]
        Path(path).write_text(json.dumps(data, indent=2))

    @property
    def layers(self) -> list[int]:
        return sorted({l for l, _ in self.heads})


def _pairs(path, key: str, items: list, num_layers: int | None, num_heads: int | None) -> list[tuple[int, int]]:
    """A profile's (layer, head) list, checked against the model's size when it is given."""
    out = []
    for pair in items:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, int) for v in pair)):
            raise ValueError(f"head profile {path}: bad (layer, head) pair {pair!r} in '{key}'")
        if (num_layers is not None and not 0 <= pair[0] < num_layers) or \
                (num_heads is not None and not 0 <= pair[1] < num_heads):
            raise ValueError(f"head profile {path}: pair {pair} is outside the model's "
                             f"{num_layers} layers x {num_heads} heads (in '{key}')")
        out.append((pair[0], pair[1]))
    return out


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


def components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of boolean maps (..., gh, gw): 0 off the mask, else a label shared
    by each component's cells. Min-label propagation, vectorised over the leading axes (every head's
    map at once); it converges in at most the longest path inside a component."""
    mask = np.asarray(mask, bool)
    gh, gw = mask.shape[-2:]
    off = gh * gw + 1
    lab = np.where(mask, np.arange(1, gh * gw + 1).reshape(gh, gw), off)
    while True:
        nxt = lab.copy()
        nxt[..., 1:, :] = np.minimum(nxt[..., 1:, :], lab[..., :-1, :])
        nxt[..., :-1, :] = np.minimum(nxt[..., :-1, :], lab[..., 1:, :])
        nxt[..., :, 1:] = np.minimum(nxt[..., :, 1:], lab[..., :, :-1])
        nxt[..., :, :-1] = np.minimum(nxt[..., :, :-1], lab[..., :, 1:])
        nxt = np.where(mask, nxt, off)
        if np.array_equal(nxt, lab):
            return np.where(mask, lab, 0)
        lab = nxt


def spatial_entropy(maps: np.ndarray) -> np.ndarray:
    """Kang et al.'s spatial entropy of attention maps (..., gh, gw): binarise each map at its mean,
    take the connected components C_i, and return -sum p_i log p_i with p_i = |C_i| / sum_j |C_j|.
    0 for one blob, larger when the mass is scattered."""
    maps = np.asarray(maps, np.float64)
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, *maps.shape[-2:])
    lab = components(flat > flat.mean((-1, -2), keepdims=True)).reshape(len(flat), -1)
    out = np.zeros(len(flat))
    for i, row in enumerate(lab):
        sizes = np.bincount(row)[1:]
        sizes = sizes[sizes > 0]
        if sizes.size > 1:
            p = sizes / sizes.sum()
            out[i] = float(-(p * np.log(p)).sum())
    return out.reshape(lead)


def _smooth(m: np.ndarray, sigma: float) -> np.ndarray:
    # Separable Gaussian blur with edge padding (Kang et al. smooth the summed map before thresholding).
    r = max(1, int(round(2 * sigma)))
    x = np.arange(-r, r + 1)
    k = np.exp(-x**2 / (2 * sigma**2))
    k /= k.sum()
    p = np.pad(m, r, mode="edge")
    p = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 0, p)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, p)


def attention_box(m: np.ndarray, sigma: float = 0.5, rel: float = 0.5) -> np.ndarray:
    """A box in grid units (x1, y1, x2, y2) from one attention map (gh, gw): smoothed, kept where
    it reaches `rel` x its maximum, the bounding box of the connected component holding the most
    attention. (Ours: a mean threshold, as for the spatial entropy, grows a small object's box by
    the blur's reach on a coarse grid; half the peak, as CAM-style localisation does, keeps it.)"""
    s = _smooth(np.asarray(m, np.float64), sigma) if sigma > 0 else np.asarray(m, np.float64)
    lab = components((s >= rel * s.max()) & (s > s.min()))
    if not lab.any():  # a flat map: the whole image
        return np.array([0.0, 0.0, float(m.shape[1]), float(m.shape[0])])
    ids = np.unique(lab[lab > 0])
    best = ids[np.argmax([s[lab == i].sum() for i in ids])]
    ys, xs = np.nonzero(lab == best)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def score_loc_heads(q: QueryArrays, heads: list[tuple[int, int]], sigma: float = 0.5) -> np.ndarray:
    """Localization heads (Kang et al., CVPR 2025), as a selector: the prompt's last token's
    attention on the chosen heads, summed, gives a box; each candidate scores its IoU with it."""
    if q.prompt_maps is None or q.grid_boxes is None or not heads:
        return np.full(len(q.boxes), np.nan)
    m = sum(q.prompt_maps[l, h] for l, h in heads)
    box = attention_box(m, sigma)
    return _masked(box_iou(np.nan_to_num(q.grid_boxes), box[None])[:, 0], q.valid)


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
