"""The localization-heads baseline end to end: the prompt's attention recorded by `acs label`
(capture all), `acs calibrate` choosing heads from it, and the Grounder scoring candidates with them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _label_helpers import read
from pipeline.calibrate import elbow, select_loc_heads


def test_elbow_of_a_knee_and_of_degenerate_curves():
    assert elbow(np.array([1.0, 0.9, 0.8, 0.1, 0.08, 0.05, 0.02])) == 3  # the three above the knee
    assert elbow(np.array([1.0, 0.1, 0.09, 0.08, 0.07])) == 1
    assert elbow(np.array([0.5, 0.5, 0.5])) == 3  # flat: every head counts as high
    assert elbow(np.array([1.0, 0.2])) == 2


def test_select_loc_heads_votes_for_focused_heads_with_image_mass():
    rng = np.random.default_rng(0)
    q, nl, nh = 40, 3, 4
    mass = rng.uniform(0.0, 0.05, (q, nl, nh))
    sent = rng.uniform(1.0, 2.0, (q, nl, nh))
    mass[:, 1, 2] = mass[:, 2, 0] = mass[:, 0, 3] = 0.9  # three heads look at the image
    sent[:, 1, 2], sent[:, 2, 0] = 0.1, 0.3  # two of them in one blob
    sent[:, 0, 0] = 0.0  # focused, but on text: never eligible
    top, votes = select_loc_heads(mass, sent, k=2, per_query=2)
    assert top == [(1, 2), (2, 0)]
    assert votes[1, 2] == q and votes[0, 0] == 0


def test_label_records_prompt_attention_once_per_query(parrot_run):
    attn = read(parrot_run["out"], "attention").to_pylist()
    boxes = read(parrot_run["out"], "boxes").to_pylist()
    with_prompt = [r for r in attn if r["prompt_mass"] is not None]
    queries_with_rows = {r["query_id"] for r in attn}
    assert len(with_prompt) == len(queries_with_rows) > 0  # exactly one row per query that has any
    assert len(queries_with_rows) == sum(b["n_ok_candidates"] > 0 for b in boxes)
    for r in with_prompt:
        n = len(r["layers"]) * len(r["heads"])
        assert len(r["prompt_mass"]) == len(r["prompt_spatial_entropy"]) == n
        m = np.array(r["prompt_mass"])
        assert ((m > 0) & (m < 1)).all()  # a share of attention: the prompt's text takes the rest
        assert (np.array(r["prompt_spatial_entropy"]) >= 0).all()
        first = min(a["cand_idx"] for a in attn if a["query_id"] == r["query_id"])
        assert r["cand_idx"] == first


def test_calibrate_adds_loc_heads_and_grounder_scores_them(parrot_run, parrot_adapter, make_image, tmp_path):
    from pipeline.calibrate import loc_heads
    from pipeline.ground import GroundConfig, Grounder, Query
    from pipeline.label import check_loc_heads
    from pipeline.scoring import HeadProfile

    # (The parrot answers one box, so ACS-Free has nothing to calibrate here; the localization
    # heads need no ground truth and no spread of IoUs.)
    path = tmp_path / "profile.json"
    nl, nh = parrot_adapter.num_layers, parrot_adapter.num_heads
    pairs, meta = loc_heads(parrot_run["out"], k=2)
    HeadProfile("parrot", HeadProfile.default("parrot", nl, nh).heads, loc_heads=pairs,
                meta={"loc_heads": meta}).save(path)
    prof = HeadProfile.load(path, nl, nh)
    assert len(prof.loc_heads) == 2 and meta["queries"] == len(parrot_run["data"]["good"])
    votes = np.array(json.loads(path.read_text())["meta"]["loc_heads"]["votes_by_head"])
    assert votes.shape == (parrot_adapter.num_layers, parrot_adapter.num_heads)
    assert all(votes[l, h] == np.sort(votes.ravel())[::-1][i] for i, (l, h) in enumerate(prof.loc_heads))
    check_loc_heads("loc-heads", str(path))  # the calibrated profile qualifies

    cfg = GroundConfig(capture="all", profile_path=str(path))
    res = Grounder(parrot_adapter, cfg).ground([Query("q", make_image(120, 100, seed=5), "red circle",
                                                      gt=(10, 10, 60, 50))])[0]
    scores = [c.scores["loc-heads"] for c in res.candidates if c.status == "ok"]
    assert scores and all(0.0 <= s <= 1.0 for s in scores)
    assert res.selected["loc-heads"] is not None
    assert res.prompt_mass.shape == (parrot_adapter.num_layers, parrot_adapter.num_heads)

    # Without localization heads the selector is refused up front, and not scored.
    plain = tmp_path / "plain.json"
    HeadProfile(prof.model_id, prof.heads).save(plain)
    with pytest.raises(ValueError, match="loc_heads"):
        check_loc_heads("loc-heads", str(plain))
    res2 = Grounder(parrot_adapter, GroundConfig(capture="all", profile_path=str(plain))).ground(
        [Query("q", make_image(120, 100, seed=5), "red circle")])[0]
    assert "loc-heads" not in res2.candidates[0].scores and res2.prompt_mass is not None
    prof_only = Grounder(parrot_adapter, GroundConfig(capture="profile", profile_path=str(path))).ground(
        [Query("q", make_image(120, 100, seed=5), "red circle")])[0]
    assert prof_only.prompt_mass is None and "loc-heads" not in prof_only.candidates[0].scores
