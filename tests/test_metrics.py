import math

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as cocomask

from pipeline import metrics as M

NAN_BOX = [np.nan] * 4


# ------------------------------------------------------------------------ boxes


def _random_xyxy(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 100, size=(n, 2))
    wh = rng.uniform(0.5, 60, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def test_box_iou_matches_pycocotools():
    rng = np.random.default_rng(0)
    a, b = _random_xyxy(rng, 200), _random_xyxy(rng, 150)
    ref = cocomask.iou(M.xyxy_to_xywh(a).tolist(), M.xyxy_to_xywh(b).tolist(), [0] * len(b))
    got = M.box_iou(a, b)
    assert got.shape == (200, 150)
    assert (ref > 0).sum() > 100  # the comparison exercises real overlaps
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(M.paired_iou(a[:150], b), np.diag(ref[:150]), rtol=0, atol=1e-9)


def test_box_iou_hand_examples():
    # [0,0,2,2] vs [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7
    assert M.box_iou([[0, 0, 2, 2]], [[1, 1, 3, 3]])[0, 0] == pytest.approx(1 / 7)
    assert M.box_iou([[10, 10, 20, 30]], [[10, 10, 20, 30]])[0, 0] == 1.0
    assert M.box_iou([[0, 0, 1, 1]], [[2, 2, 3, 3]])[0, 0] == 0.0
    assert M.box_iou([[0, 0, 1, 1]], [[1, 0, 2, 1]])[0, 0] == 0.0  # touching edges
    assert M.box_iou([[5, 5, 5, 5]], [[5, 5, 5, 5]])[0, 0] == 0.0  # zero union


def test_nan_boxes_give_zero():
    a = np.array([NAN_BOX, [0, 0, 2, 2]])
    b = np.array([[0, 0, 2, 2], NAN_BOX])
    np.testing.assert_array_equal(M.box_iou(a, b), [[0, 0], [1, 0]])
    np.testing.assert_array_equal(M.paired_iou(a, b), [0, 0])
    assert M.box_iou(np.zeros((0, 4)), b).shape == (0, 2)


def test_box_format_round_trip():
    xywh = np.array([[1.5, 2.0, 3.0, 4.25], [0, 0, 0, 0]])
    np.testing.assert_array_equal(M.xywh_to_xyxy(xywh), [[1.5, 2.0, 4.5, 6.25], [0, 0, 0, 0]])
    np.testing.assert_array_equal(M.xyxy_to_xywh(M.xywh_to_xyxy(xywh)), xywh)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=4, max_size=4),
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=4, max_size=4),
)
def test_iou_symmetric_and_bounded(p, q):
    a = np.array([min(p[0], p[2]), min(p[1], p[3]), max(p[0], p[2]), max(p[1], p[3])])
    b = np.array([min(q[0], q[2]), min(q[1], q[3]), max(q[0], q[2]), max(q[1], q[3])])
    ab, ba = M.box_iou(a[None], b[None])[0, 0], M.box_iou(b[None], a[None])[0, 0]
    assert ab == ba
    assert 0.0 <= ab <= 1.0


# ----------------------------------------------------------------- size buckets


def test_size_bucket_boundaries():
    areas = [0, 32 * 32 - 1, 32 * 32, 96 * 96 - 1, 96 * 96, 1e7]
    assert M.size_bucket(areas).tolist() == ["small", "small", "medium", "medium", "large", "large"]
    assert M.size_bucket(32 * 32) == "medium"
    assert isinstance(M.size_bucket(5.0), str)
    with pytest.raises(ValueError):
        M.size_bucket([np.nan])


def test_bucket_of_box_xyxy():
    boxes = [[0, 0, 31, 33], [10, 10, 42, 42], [0, 0, 96, 96]]  # 1023, 1024, 9216
    assert M.bucket_of_box_xyxy(boxes).tolist() == ["small", "medium", "large"]


# ------------------------------------------------------------------ tables


def test_accuracy_and_summarize():
    ious = [0.9, 0.4, np.nan, 0.5, 0.7]
    buckets = ["small", "small", "small", "large", "large"]
    assert M.accuracy_at(ious) == pytest.approx(3 / 5)
    assert M.accuracy_at(ious, thr=0.75) == pytest.approx(1 / 5)
    assert math.isnan(M.accuracy_at([]))
    s = M.summarize(ious, buckets)
    assert s["small"] == {"n": 3, "acc50": pytest.approx(1 / 3), "miou": pytest.approx(1.3 / 3)}
    assert s["large"] == {"n": 2, "acc50": 1.0, "miou": pytest.approx(0.6)}
    assert s["medium"]["n"] == 0 and math.isnan(s["medium"]["acc50"]) and math.isnan(s["medium"]["miou"])
    assert s["all"]["n"] == 5 and s["all"]["miou"] == pytest.approx(2.5 / 5)


def test_relative_gain():
    assert M.relative_gain(0.75, 0.5) == pytest.approx(0.5)
    assert M.relative_gain(0.25, 0.5) == pytest.approx(-0.5)
    assert math.isnan(M.relative_gain(0.3, 0.0))
    assert math.isnan(M.relative_gain(0.3, math.nan))


def _hand_rows() -> list[dict]:
    # small: greedy hits 2/4, acs hits 3/4, oracle 4/4; large: one query each.
    small_ious = {
        "greedy": [0.6, 0.7, 0.1, 0.2],
        "acs": [0.6, 0.7, 0.8, None],
        "oracle": [0.6, 0.7, 0.8, 0.9],
    }
    large_iou = {"greedy": 0.8, "acs": 0.4, "oracle": 0.8}
    rows = []
    for sel in ("oracle", "acs", "greedy"):  # input order deliberately not the output order
        rows += [{"selector": sel, "size_bucket": "small", "iou": v} for v in small_ious[sel]]
        rows.append({"selector": sel, "size_bucket": "large", "iou": large_iou[sel]})
    return rows


def _check_hand_table(table: list[dict]) -> None:
    assert [(r["selector"], r["size_bucket"]) for r in table] == [
        (s, b) for s in ("greedy", "acs", "oracle") for b in ("small", "medium", "large", "all")
    ]
    t = {(r["selector"], r["size_bucket"]): r for r in table}
    assert t["greedy", "small"]["acc50"] == pytest.approx(0.5)
    assert t["acs", "small"]["acc50"] == pytest.approx(0.75)
    assert t["acs", "small"]["gain_acc50_vs_greedy"] == pytest.approx(0.5)
    assert t["oracle", "small"]["gain_acc50_vs_greedy"] == pytest.approx(1.0)
    assert t["acs", "small"]["miou"] == pytest.approx(2.1 / 4)  # missing box counts as 0
    assert t["acs", "small"]["gain_miou_vs_greedy"] == pytest.approx((2.1 - 1.6) / 1.6)
    assert t["greedy", "small"]["gain_acc50_vs_greedy"] == 0.0
    assert t["acs", "large"]["gain_acc50_vs_greedy"] == pytest.approx(-1.0)
    assert t["acs", "all"]["n"] == 5 and t["acs", "all"]["acc50"] == pytest.approx(3 / 5)
    assert t["greedy", "all"]["acc50"] == pytest.approx(3 / 5)
    assert t["acs", "all"]["gain_acc50_vs_greedy"] == pytest.approx(0.0)
    med = t["acs", "medium"]
    assert med["n"] == 0 and math.isnan(med["acc50"]) and math.isnan(med["gain_acc50_vs_greedy"])


def test_selector_table_from_dicts_and_polars():
    rows = _hand_rows()
    _check_hand_table(M.selector_table(rows))
    _check_hand_table(M.selector_table(iter(rows)))
    df = pl.DataFrame(rows).with_columns(extra=pl.lit(1))
    _check_hand_table(M.selector_table(df))
    assert M.selector_table([]) == []


def test_selector_table_without_greedy_and_bad_bucket():
    rows = [r for r in _hand_rows() if r["selector"] != "greedy"]
    table = M.selector_table(rows)
    assert all(r["gain_acc50_vs_greedy"] is None and r["gain_miou_vs_greedy"] is None for r in table)
    with pytest.raises(ValueError):
        M.selector_table([{"selector": "greedy", "size_bucket": "tiny", "iou": 0.5}])


def test_format_table():
    text = M.format_table(M.selector_table(_hand_rows()))
    lines = text.splitlines()
    assert len(lines) == 5 and len({len(line) for line in lines}) == 1  # fixed width
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert "small Acc@0.5 / mIoU" in lines[0] and "all Acc@0.5 / mIoU" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["greedy", "acs", "oracle"]
    acs = [c.strip() for c in lines[3].split("|")[1:-1]]
    assert acs == ["acs", "0.750 / 0.525", "- / -", "0.000 / 0.400", "0.600 / 0.500", "+50.0%", "+0.0%"]
    assert lines[2].split("|")[-2].strip() == "+0.0%"


# ------------------------------------------------------------ paired bootstrap


def test_paired_bootstrap_identical_selectors_show_no_difference():
    x = np.linspace(0, 1, 50)
    r = M.paired_bootstrap(x, x)
    assert r["n"] == 50 and r["won"] == 0 and r["lost"] == 0 and r["acc_diff"] == 0.0
    assert r["acc_diff_ci"] == [0.0, 0.0] and r["miou_diff_ci"] == [0.0, 0.0]
    assert r["verdict"] == "no measurable difference"


def test_paired_bootstrap_clear_gain_and_symmetry():
    rng = np.random.default_rng(3)
    g = np.where(rng.random(300) < 0.3, 0.8, 0.1)
    m = g.copy()
    flip = rng.choice(np.flatnonzero(g < 0.5), 60, replace=False)
    m[flip] = 0.9  # 60 queries won, none lost
    r = M.paired_bootstrap(m, g)
    assert r["won"] == 60 and r["lost"] == 0 and r["acc_diff"] == pytest.approx(60 / 300)
    assert r["verdict"] == "better" and 0 < r["acc_diff_ci"][0] < 0.2 < r["acc_diff_ci"][1]
    base = (g >= 0.5).mean()
    assert r["gain_ci"][0] < 0.2 / base < r["gain_ci"][1]
    # Only discordant queries move the difference: its spread matches the analytic one.
    sd = math.sqrt((60 / 300 - (60 / 300) ** 2) / 300)
    assert r["acc_diff_ci"][1] - r["acc_diff_ci"][0] == pytest.approx(2 * 1.96 * sd, rel=0.15)
    back = M.paired_bootstrap(g, m)  # mirrored: the interval flips (up to resampling noise)
    assert back["won"] == 0 and back["lost"] == 60 and back["verdict"] == "worse"
    assert back["acc_diff_ci"] == pytest.approx([-r["acc_diff_ci"][1], -r["acc_diff_ci"][0]], abs=0.01)
    # Many queries: O(resamples) for accuracy, normal mIoU interval; the same answers at scale.
    big = M.paired_bootstrap(np.tile(m, 200), np.tile(g, 200))
    assert big["n"] == 60_000 and big["won"] == 12_000 and big["acc_diff"] == pytest.approx(0.2)
    assert big["acc_diff_ci"][1] - big["acc_diff_ci"][0] == pytest.approx(2 * 1.96 * sd / math.sqrt(200), rel=0.15)
    dm = np.tile(m - g, 200)
    half = 1.96 * dm.std(ddof=1) / math.sqrt(dm.size)
    assert big["miou_diff_ci"] == pytest.approx([dm.mean() - half, dm.mean() + half], abs=half * 0.15)


def test_paired_bootstrap_greedy_at_zero_has_no_relative_interval():
    r = M.paired_bootstrap([0.9, 0.9, 0.1, 0.1], [0.0, 0.1, 0.2, 0.3])
    assert r["gain_ci"] is None and r["won"] == 2
    with pytest.raises(ValueError):
        M.paired_bootstrap([0.5, 0.5], [0.5])


def test_selector_table_pairs_by_query_and_formats_the_verdict():
    rng = np.random.default_rng(0)
    n = 240
    g = rng.random(n)
    win = np.where(g < 0.5, 0.95, g)  # every greedy miss becomes a hit
    same = g[::-1].copy()  # a reshuffle: about greedy's accuracy, unrelated per query
    rows = [{"query_id": f"q{i}", "selector": s, "size_bucket": ("small", "medium", "large")[i % 3], "iou": float(v[i])}
            for s, v in (("greedy", g), ("win", win), ("same", same)) for i in range(n)]
    t = {(r["selector"], r["size_bucket"]): r for r in M.selector_table(rows)}
    assert t["greedy", "small"]["vs_greedy"] is None
    w = t["win", "all"]["vs_greedy"]
    assert w["verdict"] == "better" and w["lost"] == 0 and w["won"] == int((g < 0.5).sum())
    assert t["win", "small"]["vs_greedy"]["n"] == n // 3
    text = M.format_table(list(t.values()))
    win_line = next(line for line in text.splitlines() if line.startswith("| win"))
    assert f"{w['won']}/0" in win_line and "no measurable" not in win_line
    ci = w["gain_ci"]
    assert f"[{ci[0]:+.0%}, {ci[1]:+.0%}]" in win_line
    # The reshuffle wins and loses about as often (21 / 22 of 80 small queries): no verdict either way.
    same_small = t["same", "small"]["vs_greedy"]
    assert (same_small["won"], same_small["lost"]) == (21, 22)
    assert same_small["verdict"] == "no measurable difference"
    assert same_small["acc_diff_ci"][0] < 0 < same_small["acc_diff_ci"][1]
    same_line = next(line for line in text.splitlines() if line.startswith("| same"))
    assert "no measurable difference (" in same_line and "21/22" in same_line
    # A selector missing some of greedy's queries is not paired.
    part = [r for r in rows if not (r["selector"] == "win" and r["query_id"] == "q0")]
    assert {(r["selector"], r["size_bucket"]): r for r in M.selector_table(part)}["win", "all"]["vs_greedy"] is None


# ------------------------------------------------------------------ COCO AP


def _gt():
    # one small, one medium, one large box over two images, two categories
    boxes = np.array([[10, 10, 20, 20], [50, 50, 50, 60], [0, 0, 200, 150]], dtype=float)
    return boxes, [1, 1, 2], [1, 2, 1], boxes[:, 2] * boxes[:, 3]


def test_coco_ap_perfect():
    boxes, img, cat, area = _gt()
    ap = M.coco_ap(boxes, img, cat, area, boxes, img, cat, [0.9, 0.8, 0.7])
    assert set(ap) == {"AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"}
    assert all(v == pytest.approx(1.0) for v in ap.values())
    # areas fall back to w*h
    assert M.coco_ap(boxes, img, cat, None, boxes, img, cat, [0.9, 0.8, 0.7]) == ap


def test_coco_ap_one_miss():
    # two ground truths, one found: recall tops out at 0.5 with precision 1, so
    # 51 of the 101 recall thresholds (0.00 .. 0.50) score 1.
    boxes = np.array([[10, 10, 20, 20], [100, 100, 20, 20]], dtype=float)
    ap = M.coco_ap(boxes, [1, 1], [1, 1], None, boxes[:1], [1], [1], [0.9])
    assert ap["AP"] == pytest.approx(51 / 101)
    assert ap["AP50"] == pytest.approx(51 / 101)
    assert ap["AP_small"] == pytest.approx(51 / 101)
    assert math.isnan(ap["AP_medium"]) and math.isnan(ap["AP_large"])  # no ground truth there


def test_coco_ap_empty(capsys):
    boxes, img, cat, area = _gt()
    ap = M.coco_ap(boxes, img, cat, area, np.zeros((0, 4)), [], [], [])
    assert all(v == 0.0 for v in ap.values())
    ap = M.coco_ap(np.zeros((0, 4)), [], [], None, np.zeros((0, 4)), [], [], [])
    assert all(math.isnan(v) for v in ap.values())
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced


# ------------------------------------------------------------ correlations


def test_rankdata_ties():
    np.testing.assert_array_equal(M.rankdata([10, 20, 20, 5, 20]), [2, 4, 4, 1, 4])


def test_spearman_with_ties_hand_computed():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]; centred: [-1.5, 0, 0, 1.5], [-1.5, .5, -.5, 1.5]
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert M.spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(math.sqrt(0.9))
    assert M.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert M.spearman([1, 2, np.nan, 3], [1, 4, 0, 9]) == pytest.approx(1.0)  # NaN pair dropped
    assert math.isnan(M.spearman([1, 1, 1], [1, 2, 3]))


def test_pearson():
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(M.pearson([1], [2]))


def test_mean_within_group_spearman():
    # g0 ordered, g1 reversed, g2 constant target (skipped), g3 single member (skipped)
    values = [1, 2, 3, 1, 2, 3, 1, 2, 5]
    targets = [0.1, 0.5, 0.9, 0.9, 0.5, 0.1, 0.3, 0.3, 0.7]
    groups = ["g0", "g0", "g0", "g1", "g1", "g1", "g2", "g2", "g3"]
    assert M.mean_within_group_spearman(values[:3], targets[:3], groups[:3]) == pytest.approx(1.0)
    assert M.mean_within_group_spearman(values[3:6], targets[3:6], groups[3:6]) == pytest.approx(-1.0)
    assert M.mean_within_group_spearman(values, targets, groups) == pytest.approx(0.0)
    ordered_and_skipped = [x[:3] + x[6:] for x in (values, targets, groups)]
    assert M.mean_within_group_spearman(*ordered_and_skipped) == pytest.approx(1.0)
    assert math.isnan(M.mean_within_group_spearman(values[6:], targets[6:], groups[6:]))
    # constant values inside a qualifying group score 0
    assert M.mean_within_group_spearman([4, 4, 1, 2], [0.1, 0.9, 0.1, 0.9], [0, 0, 1, 1]) == pytest.approx(0.5)


def test_mean_within_group_spearman_matches_loop():
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 30, 400)
    values = rng.normal(size=400).round(1)  # rounding creates ties
    targets = rng.uniform(size=400).round(1)
    expected = []
    for g in np.unique(groups):
        m = groups == g
        if m.sum() >= 2 and len(np.unique(targets[m])) >= 2:
            r = M.spearman(values[m], targets[m])
            expected.append(0.0 if math.isnan(r) else r)
    assert M.mean_within_group_spearman(values, targets, groups) == pytest.approx(np.mean(expected), abs=1e-12)


# ------------------------------------------------------------ calibration


def test_reliability():
    rng = np.random.default_rng(2)
    target = rng.uniform(0, 0.9, 1000)
    perfect = M.reliability(target, target)
    assert perfect["ece"] == pytest.approx(0.0, abs=1e-12)
    assert perfect["count"].sum() == 1000 and perfect["bin_edges"].shape == (11,)
    shifted = M.reliability(target + 0.1, target)
    assert shifted["ece"] == pytest.approx(0.1)
    filled = shifted["count"] > 0
    assert not filled[0]  # nothing predicted below 0.1
    np.testing.assert_allclose((shifted["mean_pred"] - shifted["mean_target"])[filled], 0.1)


def test_reliability_bins():
    r = M.reliability([0.05, 0.15, 0.15, 1.0, 1.2], [0.0, 0.2, 0.2, 1.0, 1.0], n_bins=10)
    np.testing.assert_array_equal(r["count"], [1, 2, 0, 0, 0, 0, 0, 0, 0, 2])
    assert math.isnan(r["mean_pred"][2])
    # bin 0: |0.05 - 0| * 1; bin 1: |0.15 - 0.2| * 2; bin 9: 0 (1.2 clipped to 1.0)
    assert r["ece"] == pytest.approx((0.05 + 0.1) / 5)
    assert math.isnan(M.reliability([], [])["ece"])
