"""ACS-Free head profiles from a labelled run with ground truth (the `calib` split, never `test`).

Entropy method (ours, METHOD.md): rank every (layer, head) by the mean within-query Spearman
correlation between its attention entropy (negated: lower entropy should mean higher IoU) and the
candidates' IoU; keep the top k. Saliency method (the paper's): rank heads by the mean absolute
input gradient of the trained regressor's prediction with respect to each head's maps.

Localization heads (the loc-heads baseline, Kang et al. CVPR 2025): no labels are used. Per query,
the heads whose attention from the prompt's last token puts the most mass on the image (those
above the elbow of the sorted masses) are eligible; the `per_query` of them with the lowest spatial
entropy each get a vote; the k most voted heads over the run are the localization heads.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from .evaluate import read_table
from .metrics import mean_within_group_spearman
from .scoring import HeadProfile


def entropy_matrix(url: str, storage_options: dict | None = None) -> tuple[pl.DataFrame, np.ndarray, list, list]:
    """Candidates joined with their entropies: (frame with query_id, cand_idx, iou; E (M, 4, L, H))."""
    cands = read_table(url, "candidates", storage_options)
    attn = read_table(url, "attention", storage_options,
                      columns=["query_id", "cand_idx", "layers", "heads", "entropy"])
    if attn.height == 0:
        raise ValueError(f"{url}: the attention table is empty (was the run made with --capture none?)")
    layers, heads = attn["layers"][0].to_list(), attn["heads"][0].to_list()
    joined = (attn.select("query_id", "cand_idx", "entropy")
              .join(cands.select("query_id", "cand_idx", "iou", "status"), on=["query_id", "cand_idx"])
              .filter((pl.col("status") == "ok") & pl.col("iou").is_not_null()))
    if joined.height == 0:
        raise ValueError(f"{url}: no candidate has both a box and a ground-truth IoU; calibrate needs a "
                         "run with ground truth (e.g. --coco)")
    ent = np.stack(joined["entropy"].to_numpy()).reshape(joined.height, 4, len(layers), len(heads))
    return joined.drop("entropy"), ent, layers, heads


def rank_heads_by_entropy(frame: pl.DataFrame, ent: np.ndarray) -> np.ndarray:
    """(L, H) mean within-query Spearman of -entropy vs IoU."""
    groups = frame["query_id"].to_numpy()
    iou = frame["iou"].to_numpy()
    mean_ent = ent.mean(1)  # over the 4 coordinate tokens: (M, L, H)
    _, nl, nh = mean_ent.shape
    out = np.full((nl, nh), np.nan)
    for l in range(nl):
        for h in range(nh):
            out[l, h] = mean_within_group_spearman(-mean_ent[:, l, h], iou, groups)
    return out


def layer_curves(frame: pl.DataFrame, ent: np.ndarray) -> dict:
    """Mean entropy per layer (over heads and coordinates) for high-, low- and zero-IoU candidates,
    the paper's figure: the gap between high and zero IoU shows where attention knows."""
    iou = frame["iou"].to_numpy()
    per_layer = ent.mean((1, 3))  # (M, L)
    groups = {"high (IoU >= 0.5)": iou >= 0.5, "low (0 < IoU < 0.5)": (iou > 0) & (iou < 0.5),
              "zero (IoU = 0)": iou == 0}
    return {name: {"n": int(m.sum()), "mean_entropy": per_layer[m].mean(0).tolist() if m.any() else None}
            for name, m in groups.items()}


def calibrate(url: str, model_id: str, k: int = 8, storage_options: dict | None = None) -> tuple[HeadProfile, dict]:
    frame, ent, layers, heads = entropy_matrix(url, storage_options)
    rho = rank_heads_by_entropy(frame, ent)
    order = np.argsort(np.where(np.isfinite(rho), -rho, np.inf), axis=None)
    top = [(int(layers[i // len(heads)]), int(heads[i % len(heads)])) for i in order[:k]
           if np.isfinite(rho.flat[i])]
    if not top:
        raise ValueError(f"{url}: no query has candidates with different IoUs; nothing to calibrate on")
    n_queries = frame["query_id"].n_unique()
    meta = {"source": url, "k": k, "candidates": frame.height, "queries": n_queries,
            "spearman": {f"{l},{h}": float(rho[layers.index(l), heads.index(h)]) for l, h in top},
            "best_spearman": float(np.nanmax(rho)), "median_spearman": float(np.nanmedian(rho)),
            "spearman_by_head": np.round(rho, 4).tolist(), "layers": layers, "heads": heads,
            "layer_curves": layer_curves(frame, ent)}
    return HeadProfile(model_id, top, "entropy-spearman", meta), meta


def elbow(values: np.ndarray) -> int:
    """How many values of a descending curve lie above its elbow. The elbow is the point farthest
    below the chord joining the curve's ends (both axes scaled to [0, 1]): the first of the low
    values. At least 1; all of them for a flat curve or one too short to bend."""
    v = np.asarray(values, np.float64)
    if v.size < 3 or v[0] == v[-1]:
        return v.size
    x = np.linspace(0, 1, v.size)
    y = (v - v[-1]) / (v[0] - v[-1])
    return max(1, int(np.argmax(1 - x - y)))  # distance to the chord y = 1 - x, up to a constant factor


def select_loc_heads(mass: np.ndarray, sent: np.ndarray, k: int = 3, per_query: int = 10) -> tuple[list, np.ndarray]:
    """mass, sent: (Q, L, H) image mass and spatial entropy of the prompt's last token per query.
    Returns the k most voted (layer, head) pairs (ties: lower mean spatial entropy) and the votes (L, H)."""
    q, nl, nh = mass.shape
    votes = np.zeros(nl * nh)
    for i in range(q):
        m, e = mass[i].ravel(), sent[i].ravel()
        order = np.argsort(-m)
        eligible = order[: elbow(m[order])]
        votes[eligible[np.argsort(e[eligible], kind="stable")[:per_query]]] += 1
    mean_e = sent.reshape(q, -1).mean(0)
    ranked = np.lexsort((mean_e, -votes))
    top = [(int(j // nh), int(j % nh)) for j in ranked[:k] if votes[j] > 0]
    return top, votes.reshape(nl, nh)


def prompt_stats(url: str, storage_options: dict | None = None) -> tuple[np.ndarray, np.ndarray, list, list]:
    """Per query of a run: the prompt's last token's image mass and spatial entropy, (Q, L, H) each."""
    attn = read_table(url, "attention", storage_options,
                      columns=["query_id", "cand_idx", "layers", "heads", "prompt_mass", "prompt_spatial_entropy"])
    if attn.height == 0 or "prompt_mass" not in attn.columns:
        raise ValueError(f"{url}: no prompt attention in attention/ (label with --capture all)")
    rows = attn.filter(pl.col("prompt_mass").is_not_null())
    if rows.height == 0:
        raise ValueError(f"{url}: no prompt attention in attention/ (label with --capture all)")
    layers, heads = rows["layers"][0].to_list(), rows["heads"][0].to_list()
    shape = (rows.height, len(layers), len(heads))
    mass = np.stack(rows["prompt_mass"].to_numpy()).reshape(shape)
    sent = np.stack(rows["prompt_spatial_entropy"].to_numpy()).reshape(shape)
    return mass, sent, layers, heads


def loc_heads(url: str, k: int = 3, storage_options: dict | None = None) -> tuple[list, dict]:
    mass, sent, layers, heads = prompt_stats(url, storage_options)
    top, votes = select_loc_heads(mass, sent, k)
    pairs = [(int(layers[l]), int(heads[h])) for l, h in top]
    return pairs, {"k": k, "queries": int(mass.shape[0]), "votes_by_head": votes.astype(int).tolist(),
                   "mean_mass_by_head": mass.mean(0).round(4).tolist(),
                   "mean_spatial_entropy_by_head": sent.mean(0).round(4).tolist()}


def saliency_profile(url: str, regressor_dir: str, model_id: str, k: int = 8,
                     storage_options: dict | None = None) -> HeadProfile:
    """The paper's variant: heads whose maps the regressor's prediction is most sensitive to."""
    from .analysis import regressor_saliency

    sal, layers, heads = regressor_saliency(url, regressor_dir, storage_options)
    order = np.argsort(-sal, axis=None)[:k]
    top = [(int(layers[i // len(heads)]), int(heads[i % len(heads)])) for i in order]
    return HeadProfile(model_id, top, "regressor-saliency",
                       {"source": url, "regressor": regressor_dir, "saliency_by_head": sal.round(6).tolist(),
                        "layers": layers, "heads": heads})
