"""Selectors over hand-made arrays, `select`, and head profiles (pipeline/scoring.py)."""

import json

import numpy as np
import pytest

from pipeline.scoring import (SELECTORS, HeadProfile, QueryArrays, attention_box, components, middle_band,
                              score_acs_free, score_greedy, score_loc_heads, score_logprob, score_loc_mass,
                              score_oracle, score_random, score_vote, select, spatial_entropy)

NAN = [np.nan] * 4


def arrays(boxes, lp=None, **kw):
    boxes = np.array(boxes, dtype=np.float64)
    lp = np.zeros(len(boxes)) if lp is None else np.array(lp, dtype=np.float64)
    return QueryArrays(boxes=boxes, mean_logprob=lp, **kw)


# ------------------------------------------------------------------------------------ select


def test_select_basics():
    assert select(np.array([0.1, 0.5, 0.3])) == 1
    assert select(np.array([0.5, 0.2, 0.5])) == 0  # tie: lowest index
    assert select(np.array([np.nan, 0.2, 0.2])) == 1
    assert select(np.array([np.nan, np.nan])) is None
    assert select(np.array([-np.inf, np.nan, -3.0])) == 2  # non-finite scores never win
    assert select(np.array([np.inf, 1.0])) == 1


# ------------------------------------------------------------------------------------ simple selectors


def test_greedy_first_valid():
    assert select(score_greedy(arrays([[0, 0, 1, 1], [0, 0, 2, 2]]))) == 0
    s = score_greedy(arrays([NAN, NAN, [0, 0, 2, 2], [0, 0, 3, 3]]))
    assert np.isnan(s[:2]).all() and select(s) == 2


def test_no_box_never_selected():
    q = arrays([NAN, [0, 0, 5, 5], NAN, [0, 0, 4, 4]], lp=[0.0, -5.0, 0.0, -3.0],
               gt=np.array([0, 0, 10, 10.0]))
    for name, s in [("greedy", score_greedy(q)), ("random", score_random(q)), ("logprob", score_logprob(q)),
                    ("vote", score_vote(q)), ("oracle", score_oracle(q))]:
        assert np.isnan(s[[0, 2]]).all(), name
        assert select(s) in (1, 3), name
    assert select(score_logprob(q)) == 3


def test_all_no_box_selects_nothing():
    q = arrays([NAN, NAN], gt=np.array([0, 0, 1, 1.0]))
    for s in (score_greedy(q), score_random(q), score_logprob(q), score_vote(q), score_oracle(q)):
        assert select(s) is None


def test_logprob_max():
    q = arrays([[0, 0, 1, 1]] * 4, lp=[-2.0, -0.5, -1.0, -0.7])
    assert select(score_logprob(q)) == 1
    np.testing.assert_array_equal(score_logprob(q), [-2.0, -0.5, -1.0, -0.7])


def test_random_seeded_and_valid_only():
    q = arrays([[0, 0, 1, 1]] * 6 + [NAN], seed=3)
    a, b = score_random(q), score_random(q)
    np.testing.assert_array_equal(a, b)
    assert np.isnan(a[6]) and np.isfinite(a[:6]).all()
    picks = {select(score_random(arrays([[0, 0, 1, 1]] * 6, seed=s))) for s in range(30)}
    assert len(picks) > 2


def test_vote_majority():
    # three candidates near [0,0,10,10], one far away; the one overlapping both neighbours most wins
    q = arrays([[50, 50, 60, 60], [0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11]])
    s = score_vote(q)
    assert s[0] == 0.0
    assert select(s) == 1  # [0,0,10,10] overlaps both others by 9/11 each
    np.testing.assert_allclose(s[1], 2 * 90 / 110)


def test_oracle_highest_iou():
    gt = np.array([0, 0, 10, 10.0])
    q = arrays([[0, 0, 5, 5], [0, 0, 9, 10], [20, 20, 30, 30]], gt=gt)
    s = score_oracle(q)
    np.testing.assert_allclose(s, [0.25, 0.9, 0.0])
    assert select(s) == 1
    assert np.isnan(score_oracle(arrays([[0, 0, 1, 1]]))).all()  # no gt: nothing


# ------------------------------------------------------------------------------------ acs-free


def test_acs_free_uses_profile_heads_only():
    k, nl, nh = 3, 4, 2
    ent = np.full((k, 4, nl, nh), 2.0)
    ent[1, :, 1, 0] = 0.5  # candidate 1 is focused on the profile heads
    ent[2, :, 3, 1] = 0.0  # candidate 2 looks better on a head outside the profile
    ent[2, :, 1, 0] = 1.9
    q = arrays([[0, 0, 1, 1]] * k, entropy=ent)
    prof = HeadProfile("m", [(1, 0)])
    s = score_acs_free(q, prof)
    np.testing.assert_allclose(s, [-2.0, -0.5, -1.9])
    assert select(s) == 1
    assert select(score_acs_free(q, HeadProfile("m", [(3, 1)]))) == 2  # the misleading head, if chosen


def test_acs_free_mean_over_heads_and_coords():
    ent = np.zeros((2, 4, 2, 2))
    ent[0, 0, 0, 0], ent[0, 3, 1, 1] = 4.0, 8.0
    ent[1, :, 0, 0] = 1.0
    s = score_acs_free(arrays([[0, 0, 1, 1]] * 2, entropy=ent), HeadProfile("m", [(0, 0), (1, 1)]))
    np.testing.assert_allclose(s, [-(4 + 8) / 8, -4 / 8])


def test_acs_free_invalid_and_missing():
    ent = np.ones((2, 4, 1, 1))
    ent[0] = 0.0  # lowest entropy, but no box
    q = arrays([NAN, [0, 0, 1, 1]], entropy=ent)
    assert select(score_acs_free(q, HeadProfile("m", [(0, 0)]))) == 1
    assert np.isnan(score_acs_free(arrays([[0, 0, 1, 1]]), HeadProfile("m", [(0, 0)]))).all()


# ------------------------------------------------------------------------------------ loc-mass


def _peak_maps(k, nl, nh, gh, gw, peak):
    maps = np.full((k, 4, nl, nh, gh, gw), 0.1 / (gh * gw - 1))
    maps[..., peak[0], peak[1]] = 0.9
    return maps


def test_loc_mass_picks_box_around_peak():
    gh, gw = 6, 8
    maps = _peak_maps(3, 3, 2, gh, gw, peak=(4, 6))
    grid_boxes = np.array([[0, 0, 3, 3], [5, 3, 8, 6], [0, 3, 4, 6]], dtype=float)
    q = arrays(grid_boxes * 10, maps=maps, grid_boxes=grid_boxes)
    s = score_loc_mass(q)
    assert select(s) == 1
    np.testing.assert_allclose(s[1], 0.9 + 8 * 0.1 / 47)  # peak + 8 other cells (x 5..7, y 3..5)
    np.testing.assert_allclose(s[0], 9 * 0.1 / 47)


def test_loc_mass_uses_middle_band_by_default():
    gh, gw = 4, 4
    maps = np.full((2, 4, 3, 1, gh, gw), 1 / 16)
    maps[0, :, 1] = 0.0
    maps[0, :, 1, :, 0, 0] = 1.0  # candidate 0's middle layer peaks inside its box
    maps[1, :, 0] = 0.0
    maps[1, :, 0, :, 3, 3] = 1.0  # candidate 1 peaks only in layer 0, outside the band
    grid_boxes = np.array([[0, 0, 1, 1], [3, 3, 4, 4]], dtype=float)
    q = arrays(grid_boxes, maps=maps, grid_boxes=grid_boxes)
    assert middle_band(3) == [1]
    np.testing.assert_allclose(score_loc_mass(q), [1.0, 1 / 16])
    np.testing.assert_allclose(score_loc_mass(q, layers=[0]), [1 / 16, 1.0])


def test_loc_mass_tiny_box_owns_its_cell_and_invalid_nan():
    maps = _peak_maps(2, 1, 1, 4, 4, peak=(2, 1))
    grid_boxes = np.array([[1.1, 2.1, 1.3, 2.3], [np.nan] * 4])  # smaller than a cell, no centre inside
    q = arrays([[1, 2, 3, 4], NAN], maps=maps, grid_boxes=grid_boxes)
    s = score_loc_mass(q, layers=[0])
    np.testing.assert_allclose(s[0], 0.9)
    assert np.isnan(s[1])
    assert np.isnan(score_loc_mass(arrays([[0, 0, 1, 1]]))).all()  # no maps: nothing


# ------------------------------------------------------------------------------------ head profile


def test_head_profile_round_trip(tmp_path):
    prof = HeadProfile("qwen", [(1, 0), (2, 3)], method="calibrated", meta={"n": 5})
    path = tmp_path / "p.json"
    prof.save(path)
    back = HeadProfile.load(path, num_layers=4, num_heads=4)
    assert back == prof
    assert back.layers == [1, 2]
    assert json.loads(path.read_text())["heads"] == [[1, 0], [2, 3]]


@pytest.mark.parametrize("content, match", [
    ("[]", "JSON object with a non-empty 'heads' list"),
    ('{"heads": []}', "non-empty 'heads' list"),
    ('{"heads": "1,2"}', "non-empty 'heads' list"),
    ('{"heads": [[1, 2, 3]]}', r"bad \(layer, head\) pair \[1, 2, 3\]"),
    ('{"heads": [[1, "a"]]}', "bad .layer, head. pair"),
    ('{"heads": [[1.0, 2]]}', "bad .layer, head. pair"),
    ('{"heads": [[4, 0]]}', r"pair \[4, 0\] is outside the model's 4 layers x 4 heads"),
    ('{"heads": [[0, 4]]}', "outside the model's 4 layers x 4 heads"),
    ('{"heads": [[-1, 0]]}', "outside the model's"),
])
def test_head_profile_validation(tmp_path, content, match):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        HeadProfile.load(path, num_layers=4, num_heads=4)
    assert str(path) in str(e.value)


def test_head_profile_not_json(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(ValueError):
        HeadProfile.load(path)


@pytest.mark.parametrize("num_layers, layers", [(3, [1]), (4, [1]), (6, [2, 3]), (9, [3, 4, 5]),
                                                (28, list(range(9, 18))), (1, [0])])
def test_head_profile_default_middle_third(num_layers, layers):
    prof = HeadProfile.default("m", num_layers, 3)
    assert prof.layers == layers == middle_band(num_layers)
    assert prof.heads == [(l, h) for l in layers for h in range(3)]
    assert prof.method == "default-middle-third"


def test_selector_names():
    assert set(SELECTORS) == {"acs-learned", "greedy", "random", "logprob", "vote", "acs-free", "loc-mass",
                              "loc-heads", "oracle"}


# ------------------------------------------------------------------- localization heads


def test_components_label_4_connected_blobs():
    m = np.zeros((5, 6), bool)
    m[0:2, 0:2] = True  # a square
    m[3, 3:6] = True  # a bar
    m[2, 2] = True  # touches the square only diagonally: its own component
    lab = components(m)
    assert (lab > 0).sum() == m.sum() and (lab[~m] == 0).all()
    assert len(np.unique(lab[m])) == 3
    assert len(np.unique(lab[0:2, 0:2])) == 1 and len(np.unique(lab[3, 3:6])) == 1
    # a snake takes many propagation rounds and stays one component; batches label per map
    snake = np.zeros((5, 5), bool)
    snake[0, :] = snake[:, 4] = snake[4, :] = snake[2, 0:5] = snake[1, 0] = snake[3, 4] = True
    both = components(np.stack([snake, m[:, :5]]))
    assert len(np.unique(both[0][snake])) == 1 and len(np.unique(both[1][m[:, :5]])) == 3


def test_spatial_entropy_of_blobs():
    one = np.zeros((8, 8))
    one[2:4, 2:5] = 1.0
    two = one.copy()
    two[6, 6] = 1.0  # sizes 6 and 1
    four = np.zeros((8, 8))
    four[0, 0] = four[0, 7] = four[7, 0] = four[7, 7] = 1.0
    got = spatial_entropy(np.stack([one, two, four]))
    p = np.array([6, 1]) / 7
    assert got[0] == 0.0 and got[1] == pytest.approx(-(p * np.log(p)).sum()) and got[2] == pytest.approx(np.log(4))
    assert spatial_entropy(np.ones((2, 3, 4, 4))).shape == (2, 3)  # flat maps: nothing above the mean


def test_attention_box_finds_the_strongest_blob():
    m = np.full((12, 16), 0.01)
    m[3:6, 10:13] = 1.0  # the object
    m[9, 1] = 0.6  # a weaker stray peak
    assert attention_box(m).tolist() == [10, 3, 13, 6]
    assert attention_box(np.ones((3, 4))).tolist() == [0, 0, 4, 3]  # a flat map: the whole image


def test_score_loc_heads_sums_the_chosen_heads_only():
    maps = np.full((2, 3, 10, 10), 0.01)
    maps[1, 2, 1:3, 1:3] = 1.0  # the localization head looks top left
    maps[0, 0, 6:9, 6:9] = 5.0  # a loud other head looks bottom right
    grid = np.array([[6, 6, 9, 9], [1, 1, 3, 3], NAN], dtype=np.float64)
    q = arrays(grid * 10, grid_boxes=grid, prompt_maps=maps)
    s = score_loc_heads(q, [(1, 2)])
    assert s[1] == pytest.approx(1.0) and s[0] == 0.0 and np.isnan(s[2]) and select(s) == 1
    assert select(score_loc_heads(q, [(0, 0)])) == 0
    assert np.isnan(score_loc_heads(arrays(grid * 10), [(1, 2)])).all()  # no prompt maps: no score


def test_head_profile_loc_heads_round_trip_and_validation(tmp_path):
    prof = HeadProfile("m", [(1, 0)], "entropy-spearman", {}, loc_heads=[(2, 1), (0, 3)])
    path = tmp_path / "p.json"
    prof.save(path)
    assert HeadProfile.load(path, 4, 4) == prof
    plain = HeadProfile("m", [(1, 0)])
    plain.save(path)
    assert HeadProfile.load(path).loc_heads is None and "loc_heads" not in json.loads(path.read_text())
    path.write_text('{"heads": [[1, 0]], "loc_heads": [[9, 0]]}')
    with pytest.raises(ValueError, match="loc_heads"):
        HeadProfile.load(path, 4, 4)
