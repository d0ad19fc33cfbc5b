"""Re-scoring, calibration and exports on the hand-made run of test_report (no model involved)."""

import json

import numpy as np
import polars as pl
import pytest
from pycocotools.coco import COCO

from test_report import HEADS, LAYERS, QUERIES, make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("eval"), dump_maps=True, learned=True)


def test_selector_rows_follow_score_columns(run):
    from pipeline.evaluate import load_tables, selector_rows

    boxes, cands = load_tables(str(run))
    rows = selector_rows(boxes, cands)
    # Ground-truth queries only (q-nogt has none), one row per selector each.
    gt_queries = {q for q, v in QUERIES.items() if v[0] is not None}
    assert set(rows["query_id"]) == gt_queries
    free = {r["query_id"]: r["cand_idx"] for r in rows.filter(pl.col("selector") == "acs-free").iter_rows(named=True)}
    assert free == {q: QUERIES[q][2] for q in gt_queries}
    greedy = rows.filter(pl.col("selector") == "greedy")
    assert (greedy.filter(pl.col("query_id") != "q-nobox")["cand_idx"] == 0).all()
    # The no-box query counts as a miss for every selector, never dropped.
    assert rows.filter(pl.col("query_id") == "q-nobox")["iou"].to_list() == [0.0] * rows["selector"].n_unique()


def test_evaluate_run_numbers(run):
    from pipeline.evaluate import evaluate_run

    res = evaluate_run(str(run))
    table = {(r["selector"], r["size_bucket"]): r for r in res["table"]}
    # small bucket: q-help, q-missing, q-nobox; ACS-Free hits q-help and q-missing, greedy only q-missing.
    assert table[("acs-free", "small")]["n"] == 3
    assert table[("acs-free", "small")]["acc50"] == pytest.approx(2 / 3)
    assert table[("greedy", "small")]["acc50"] == pytest.approx(1 / 3)
    assert table[("acs-free", "small")]["gain_acc50_vs_greedy"] == pytest.approx(1.0)
    assert table[("oracle", "all")]["acc50"] >= table[("acs-free", "all")]["acc50"]
    # ACS-Learned scores are IoU + 0.1 clipped: rank-correlated, calibrated within 0.1.
    assert res["regressor"]["spearman"] > 0.99  # monotone up to the ties that clipping at 1 makes
    assert res["regressor"]["reliability"]["ece"] <= 0.1 + 1e-9
    rel = json.loads(json.dumps(res["regressor"]["reliability"]))  # plain JSON numbers, None for empty bins
    assert rel["bin_edges"][0] == 0.0 and rel["bin_edges"][-1] == 1.0 and len(rel["count"]) == 10
    assert sum(rel["count"]) == res["regressor"]["n"]
    assert all(m is None for m, c in zip(rel["mean_pred"], rel["count"]) if c == 0)
    assert 0.0 <= res["coco_ap"]["AP"] <= 1.0
    assert res["queries"] == len(QUERIES) and res["queries_with_gt"] == len(QUERIES) - 1
    # Its ground truth came with the run, not from a COCO file: where answers landed is not computed.
    assert "outcomes" not in res and "the run records no --coco file" in res["outcomes_note"]
    # Paired against greedy: ACS-Free wins q-help on small objects and loses none.
    vs = table[("acs-free", "small")]["vs_greedy"]
    assert (vs["n"], vs["won"], vs["lost"]) == (3, 1, 0)
    assert vs["acc_diff"] == pytest.approx(1 / 3) and vs["acc_diff_ci"][0] <= 1 / 3 <= vs["acc_diff_ci"][1]
    # Auto-label quality: every selected box has confidence 0.5 (no regressor on boxes/). Of the 5
    # ground-truth queries 4 have a box and 3 of those are right (q-hurt's is not).
    lq = res["label_quality"]
    assert lq["by"] == "confidence"
    cell = {(r["threshold"], r["size_bucket"]): r for r in lq["rows"]}
    assert (cell[0.3, "all"]["kept"], cell[0.3, "all"]["n"]) == (4, 5)
    assert cell[0.3, "all"]["precision"] == pytest.approx(3 / 4) and cell[0.3, "all"]["recall"] == pytest.approx(3 / 5)
    assert cell[0.7, "all"]["kept"] == 0 and cell[0.7, "all"]["precision"] is None and cell[0.7, "all"]["recall"] == 0.0
    # No candidate was skipped (full N): every sampled candidate counts, no query stopped early.
    cands = pl.read_parquet(f"{run}/candidates/*.parquet")
    k = cands.filter(pl.col("cand_idx") > 0).group_by("query_id").len()["len"]
    assert res["sampling"]["sampled_per_query_mean"] == pytest.approx(k.mean())
    assert res["sampling"]["skipped_share"] == 0.0 and res["sampling"]["queries_stopped_early"] == 0


def test_evaluate_counts_adaptive_k_skips(run, tmp_path):
    """Candidates marked `skipped` by adaptive K lower the sampled count, per query."""
    import shutil

    from pipeline.evaluate import evaluate_run

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    files = sorted((copy / "candidates").glob("*.parquet"))
    cands = pl.concat([pl.read_parquet(f) for f in files])
    first_q = sorted(cands["query_id"].unique().to_list())[0]
    top = cands.filter(pl.col("query_id") == first_q)["cand_idx"].max()
    cands = cands.with_columns(pl.when((pl.col("query_id") == first_q) & (pl.col("cand_idx") == top))
                               .then(pl.lit("skipped")).otherwise(pl.col("status")).alias("status"))
    for f in files[1:]:
        f.unlink()
    cands.write_parquet(files[0])
    res = evaluate_run(str(copy))
    sampled = cands.filter(pl.col("cand_idx") > 0)
    assert res["sampling"]["queries_stopped_early"] == 1
    assert res["sampling"]["skipped_share"] == pytest.approx(1 / sampled.height)
    # a skipped candidate was never sampled: it is no no-box answer either
    drawn = sampled.filter(pl.col("status") != "skipped")
    assert res["no_box_share"]["sampled"] == pytest.approx((drawn["status"] != "ok").mean())


def test_calibrate_prefers_sharp_heads(run, tmp_path):
    from pipeline.calibrate import calibrate
    from pipeline.scoring import HeadProfile

    profile, meta = calibrate(str(run), "tiny-test", k=3)
    # entropy falls with IoU on every head, so every head orders candidates perfectly within queries
    assert meta["best_spearman"] == pytest.approx(1.0)
    assert len(profile.heads) == 3 and all(l in LAYERS and h in HEADS for l, h in profile.heads)
    profile.save(tmp_path / "p.json")
    assert HeadProfile.load(tmp_path / "p.json").heads == profile.heads
    curves = meta["layer_curves"]
    high, zero = curves["high (IoU >= 0.5)"]["mean_entropy"], curves["zero (IoU = 0)"]["mean_entropy"]
    assert all(h < z for h, z in zip(high, zero))


def test_export_coco_and_labelstudio(run, tmp_path):
    from pipeline.export import export

    n = export(str(run), "coco", str(tmp_path / "coco.json"))
    ok = [q for q, v in QUERIES.items() if v[2] is not None]
    assert n == len(ok)
    coco = COCO(str(tmp_path / "coco.json"))
    assert len(coco.getAnnIds()) == len(ok)
    ann = coco.loadAnns(coco.getAnnIds())[0]
    assert ann["score"] == 0.5 and ann["bbox"][2] > 0 and ann["bbox"][3] > 0
    assert export(str(run), "coco", str(tmp_path / "none.json"), min_confidence=0.9) == 0

    m = export(str(run), "labelstudio", str(tmp_path / "ls.json"))
    tasks = json.loads((tmp_path / "ls.json").read_text())
    assert m == len(ok) and sum(len(t["predictions"][0]["result"]) for t in tasks) == len(ok)
    for t in tasks:
        for r in t["predictions"][0]["result"]:
            v = r["value"]
            assert 0 <= v["x"] <= 100 and 0 < v["width"] <= 100 and v["rectanglelabels"] == ["red square"]


def test_adaptive_k_replay_stops_where_candidates_agree(run):
    """The offline replay of adaptive K (benchmarks.adaptive_k --from-runs) on the hand-made run."""
    from benchmarks.adaptive_k import replay
    from pipeline.evaluate import load_tables

    boxes, cands = load_tables(str(run))
    boxes = boxes.filter(pl.col("size_bucket").is_not_null())  # q-nogt has no ground truth
    full = replay(boxes, cands, first=None)
    scored = cands.filter(pl.col("query_id").is_in(boxes["query_id"].implode()))
    assert full["stopped_early"] == 0 and full["queries"] == len(QUERIES) - 1
    assert full["tokens"] == scored["n_tokens"].fill_null(0).sum()
    # No pair of boxes agrees at IoU > 1: nothing stops, the replay is full N.
    assert replay(boxes, cands, first=1, iou=1.01)["tokens"] == full["tokens"]
    # At IoU 0 every query whose greedy and first sample are both boxes stops after them: all but
    # q-nobox, which keeps its three candidates.
    ad = replay(boxes, cands, first=1, iou=0.0)
    assert ad["stopped_early"] == len(QUERIES) - 2
    kept = scored.filter((pl.col("cand_idx") <= 1) | (pl.col("query_id") == "q-nobox"))
    assert ad["tokens"] == kept["n_tokens"].fill_null(0).sum() < full["tokens"]
    # Greedy is candidate 0 either way. The oracle keeps every hit: each query with a right box has
    # one among its first two (q-help's sample 1 is at IoU 0.53 as well as sample 2).
    assert ad["acc50"]["greedy"] == full["acc50"]["greedy"]
    assert ad["acc50"]["oracle"] == full["acc50"]["oracle"] and full["acc50"]["oracle"]["small"] == pytest.approx(2 / 3)


def test_selected_size_ratio_by_hand(run):
    """Chosen box area over the object's, median per selector and bucket (report analysis)."""
    from pipeline.analysis import selected_size
    from pipeline.evaluate import load_tables

    boxes, cands = load_tables(str(run))
    rows = {r["selector"]: r for r in selected_size(boxes.filter(pl.col("gt_x1").is_not_null()), cands)}
    free = rows["acs-free"]
    # small: q-help's and q-missing's chosen boxes are the object's size (q-nobox has no box);
    # medium: q-hurt's sample 1 is 40x30 against a 50x50 object; large: q-same's greedy 138x100 of 140x100.
    assert free["small"] == pytest.approx(1.0)
    assert free["medium"] == pytest.approx(1200 / 2500)
    assert free["large"] == pytest.approx(13800 / 14000)
    assert free["all"] == pytest.approx((1.0 + 13800 / 14000) / 2)
    assert rows["greedy"]["medium"] == pytest.approx(48 * 48 / 2500)


def test_paired_benchmark_pairs_any_two_selectors(run, capsys):
    """benchmarks.paired against greedy agrees with `acs evaluate`'s own vs-greedy pairing."""
    from benchmarks.paired import main
    from pipeline.evaluate import evaluate_run

    assert main([str(run), "--a", "acs-free", "--b", "greedy,oracle"]) == 0
    rows = {(r["b"], r["bucket"]): r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]}
    table = {(r["selector"], r["size_bucket"]): r for r in evaluate_run(str(run))["table"]}
    for bucket in ("small", "medium", "large", "all"):
        ours, theirs = rows["greedy", bucket], table["acs-free", bucket]["vs_greedy"]
        assert (ours["n"], ours["won"], ours["lost"]) == (theirs["n"], theirs["won"], theirs["lost"])
        assert ours["acc_diff"] == pytest.approx(theirs["acc_diff"])
    # The oracle never loses to ACS-Free: ACS-Free wins nothing against it.
    assert rows["oracle", "all"]["won"] == 0 and rows["oracle", "all"]["acc_diff"] <= 0


def test_score_iou_benchmark_pooled_and_within_query(run, capsys):
    """benchmarks.score_iou: the oracle's score is the IoU itself, so both figures are 1 for it;
    every figure is a correlation."""
    from benchmarks.score_iou import main

    assert main([str(run), "--scores", "oracle,logprob"]) == 0
    rows = {r["score"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]}
    assert rows["oracle"]["pearson"] == pytest.approx(1.0) and rows["oracle"]["within_query_spearman"] == pytest.approx(1.0)
    assert -1 <= rows["logprob"]["pearson"] <= 1 and -1 <= rows["logprob"]["within_query_spearman"] <= 1
    with pytest.raises(SystemExit, match="no column"):
        main([str(run), "--scores", "nope"])
