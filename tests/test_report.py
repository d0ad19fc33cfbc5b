"""`acs report` on a tiny hand-made labelled run (no model): Parquet tables written with the declared
schemas, PNG images in tmp, one query each where the selector helps, hurts, keeps greedy, cannot read
its image, found no box, and has no ground truth."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pipeline.metrics import box_iou
from pipeline.schema import BOXES_SCHEMA, CANDIDATES_SCHEMA, SELECTOR_COLUMNS, attention_schema

LAYERS, HEADS, G = [2, 5, 9], [0, 1, 3], 4
W, H = 160, 120
IMG_TAG = '<img src="data:image/png;base64,'

# query_id: (gt box or None, candidate boxes (None = no_box), index ACS-Free selects, image)
QUERIES = {
    "q-help": ((100, 60, 120, 76), [(30, 20, 50, 36), (97, 57, 117, 73), (101, 61, 121, 77)], 2, "a.png"),
    "q-hurt": ((20, 20, 70, 70), [(22, 22, 70, 70), (100, 80, 140, 110), (30, 30, 60, 60)], 1, "b.png"),
    "q-same": ((10, 10, 150, 110), [(12, 10, 150, 110), (0, 0, 80, 60), (20, 20, 140, 100)], 0, "a.png"),
    "q-missing": ((40, 40, 60, 60), [(44, 40, 64, 60), (41, 41, 61, 61), (0, 0, 10, 10)], 1, "missing.png"),
    "q-nobox": ((40, 40, 60, 60), [None, None, None], None, "b.png"),
    "q-nogt": (None, [(10, 10, 40, 40), (12, 12, 42, 42), (90, 90, 120, 110)], 1, "a.png"),
}


def _image(path, seed):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(60, 200, (H, W, 3), dtype=np.uint8))
    d = ImageDraw.Draw(img)
    d.rectangle((100, 60, 120, 76), fill=(220, 30, 30))
    d.rectangle((20, 20, 70, 70), fill=(30, 30, 220))
    img.save(path)


def make_run(root, *, dump_maps=True, learned=True):
    """Writes OUT/{boxes,candidates,attention}/s0.parquet; returns OUT."""
    out = root / ("run-maps" if dump_maps else "run-nomaps")
    for t in ("boxes", "candidates", "attention"):
        (out / t).mkdir(parents=True)
    _image(root / "a.png", 0)
    _image(root / "b.png", 1)
    rng = np.random.default_rng(0)
    box_rows, cand_rows, attn_rows = [], [], []
    base = {"run_id": "run-test", "shard_id": "s0"}
    for qid, (gt, cboxes, sel, img) in QUERIES.items():
        ok = [b is not None for b in cboxes]
        arr = np.array([b if b is not None else (np.nan,) * 4 for b in cboxes], float)
        ious = box_iou(arr, np.array([gt], float))[:, 0] if gt else np.full(len(cboxes), np.nan)
        vote = box_iou(arr, arr)
        np.fill_diagonal(vote, 0)
        for c, b in enumerate(cboxes):
            scores = {"greedy": -c, "random": float(rng.random()), "logprob": float(-rng.random()),
                      "vote": float(vote[c].sum()), "loc-mass": float(rng.random()), "loc-heads": 0.5,
                      "oracle": float(ious[c]) if gt else None,
                      "acs-free": (-1.0 if c == sel else -2.0 - c),
                      "acs-learned": float(np.clip(ious[c] + 0.1, 0, 1)) if learned and gt else None}
            cand_rows.append({
                "query_id": qid, "cand_idx": c, "text": str(b), "status": "ok" if b else "no_box", "error": None,
                **dict(zip(("x1", "y1", "x2", "y2"), b or (None,) * 4)), "box_fixed": False,
                "mean_logprob": scores["logprob"] if b else None, "n_tokens": 12,
                **{col: (scores[s] if b else None) for s, col in SELECTOR_COLUMNS.items()},
                "iou": float(ious[c]) if gt and b else None, **base})
            if not b:
                continue
            # Lower entropy for better boxes; heads (5, 1) and (9, 3) are the sharpest.
            ent = rng.uniform(2.0, 3.0, (4, len(LAYERS), len(HEADS))) - (ious[c] if gt else 0.3)
            ent[:, 1, 1] -= 1.0
            ent[:, 2, 2] -= 1.0
            row = {"query_id": qid, "cand_idx": c, "grid_h": 8, "grid_w": 10, "layers": LAYERS, "heads": HEADS,
                   "entropy": ent.ravel().tolist(), **base}
            if dump_maps:
                maps = np.full((4, len(LAYERS), len(HEADS), G, G), 0.2 / (G * G - 1))
                cx, cy = (b[0] + b[2]) / 2 * G / W, (b[1] + b[3]) / 2 * G / H
                maps[..., int(cy), int(cx)] = 0.8  # each map sums to 1, peaked on the box
                row |= {"map_grid": G, "maps": maps.astype(np.float16).ravel().tolist()}
            attn_rows.append(row)
        has = gt is not None
        s = sel if sel is not None else None
        box_rows.append({
            "query_id": qid, "image_id": qid, "image_uri": str(root / img), "category": "red square",
            "selector": "acs-free", "cand_idx": s,
            **dict(zip(("x1", "y1", "x2", "y2"), cboxes[s] if s is not None else (None,) * 4)),
            "score": -1.0 if s is not None else None, "predicted_iou": None,
            "confidence": 0.5 if s is not None else None, "status": "ok" if s is not None else "no_box",
            "error": None if s is not None else "no candidate has a box", "n_candidates": 3,
            "n_ok_candidates": sum(ok), "image_width": W, "image_height": H, "model_id": "tiny-test",
            **dict(zip(("gt_x1", "gt_y1", "gt_x2", "gt_y2"), gt or (None,) * 4)),
            "gt_area": float((gt[2] - gt[0]) * (gt[3] - gt[1])) if has else None,
            "iou": (float(ious[s]) if s is not None else 0.0) if has else None,
            "size_bucket": ({"q-help": "small", "q-hurt": "medium", "q-same": "large"}.get(qid, "small")
                            if has else None), **base})
    pq.write_table(pa.Table.from_pylist(box_rows, schema=BOXES_SCHEMA), out / "boxes" / "s0.parquet")
    pq.write_table(pa.Table.from_pylist(cand_rows, schema=CANDIDATES_SCHEMA), out / "candidates" / "s0.parquet")
    pq.write_table(pa.Table.from_pylist(attn_rows, schema=attention_schema(dump_maps)),
                   out / "attention" / "s0.parquet")
    return out


@pytest.fixture(scope="module")
def run_with_maps(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("report"), dump_maps=True, learned=True)


def test_report_with_maps(run_with_maps, tmp_path):
    from pipeline.report import build_report

    out = tmp_path / "r" / "report.html"
    summary = build_report(str(run_with_maps), str(out))
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # Every selector has a row in the table, greedy first and oracle last.
    assert summary["table_selectors"][0] == "greedy" and summary["table_selectors"][-1] == "oracle"
    # The chosen-box-size table covers the same selectors (tested by hand in test_evaluate_export).
    assert [r["selector"] for r in summary["selected_size"]] == summary["table_selectors"]
    assert "Chosen box area over the object" in text
    assert set(summary["table_selectors"]) == set(SELECTOR_COLUMNS)
    for sel in SELECTOR_COLUMNS:
        assert f'<td class="sel">{sel}' in text
    # Small bucket: ACS-Free hits q-help and q-missing (2 of 3), greedy none; oracle is not "best".
    small = re.search(r'<td class="sel">acs-free.*?</tr>', text).group(0)
    assert '<td class="best">0.667</td>' in small
    assert 'class="best"' not in re.search(r'<tr class="oracle">.*?</tr>', text).group(0)
    # Gallery: 4 changed queries (q-same keeps greedy, q-nobox has no box): helps first by gain.
    assert summary["gallery"] == 4
    assert (summary["gallery_helps"], summary["gallery_hurts"], summary["gallery_no_gt"]) == (2, 1, 1)
    assert summary["gallery_queries"] == ["q-help", "q-missing", "q-hurt", "q-nogt"]
    assert summary["heatmaps"] == 4 and summary["has_maps"]
    assert summary["changed_queries"] == {"changed": 4, "helps": 2, "hurts": 1, "same": 0, "no_gt": 1}
    assert "on 4 of 6 queries" in text
    # Plots are SVG, so the PNGs are the gallery's crops plus its heatmaps.
    assert text.count(IMG_TAG) == summary["png_images"] == summary["gallery"] + summary["heatmaps"] == 8
    assert summary["plots"] == ["acc50_by_bucket", "reliability", "entropy_by_layer"]
    assert text.count("<svg") == 3 and "ECE" in text
    assert "ACS helps" in text and "ACS hurts" in text
    assert "grey canvas" in text  # q-missing's image does not exist
    assert "lowest-entropy heads" in text and "L5H1" in text  # default deciding heads
    assert "http://" not in text and "https://" not in text
    assert "tiny-test" in text and "run-test" in text and "no_box: 1" in text
    assert summary["status"] == {"ok": 5, "no_box": 1} and summary["queries"] == 6
    # No COCO file holds every object of these images: no landing breakdown, and the page says why.
    assert summary["outcomes_queries"] is None and "Not computed: needs every object of each image" in text
    json.dumps(summary)  # JSON-serialisable


def test_report_gallery_limit_keeps_helps_and_hurts(run_with_maps, tmp_path):
    from pipeline.report import build_report

    s = build_report(str(run_with_maps), str(tmp_path / "two.html"), max_gallery=2)
    assert s["gallery_queries"] == ["q-help", "q-hurt"]
    s = build_report(str(run_with_maps), str(tmp_path / "none.html"), max_gallery=0)
    assert s["gallery"] == 0 and IMG_TAG not in (tmp_path / "none.html").read_text()


def test_report_with_profile(run_with_maps, tmp_path):
    from pipeline.report import build_report

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"model_id": "tiny-test", "method": "entropy-spearman",
                                   "heads": [[5, 1], [9, 3], [27, 0]]}))
    s = build_report(str(run_with_maps), str(tmp_path / "p.html"), profile_path=str(profile), max_gallery=1)
    text = (tmp_path / "p.html").read_text()
    assert s["gallery"] == 1 and s["heatmaps"] == 1
    assert "2 profile heads (1 not captured in this run): L5H1, L9H3" in text


def test_report_without_maps_or_regressor(tmp_path):
    from pipeline.report import build_report

    run = make_run(tmp_path, dump_maps=False, learned=False)
    s = build_report(str(run), str(tmp_path / "nomaps.html"))
    text = (tmp_path / "nomaps.html").read_text()
    assert s["gallery"] == 4 and s["heatmaps"] == 0 and not s["has_maps"]
    assert text.count(IMG_TAG) == s["gallery"]
    assert "no pooled attention maps" in text
    assert "reliability" not in s["plots"] and "no reliability" in text
    assert "entropy_by_layer" in s["plots"]  # entropies are captured without --dump-maps too
    assert "http://" not in text and "https://" not in text


def test_report_without_ground_truth(tmp_path):
    import polars as pl

    from pipeline.report import build_report

    run = make_run(tmp_path, dump_maps=False, learned=False)
    gt = ["gt_x1", "gt_y1", "gt_x2", "gt_y2", "gt_area", "iou", "size_bucket"]
    for name, cols, schema in (("boxes", gt, BOXES_SCHEMA), ("candidates", ["iou", "score_oracle"], CANDIDATES_SCHEMA)):
        path = run / name / "s0.parquet"
        df = pl.read_parquet(path).with_columns([pl.lit(None).cast(pl.read_parquet(path).schema[c]).alias(c)
                                                 for c in cols])
        pq.write_table(df.to_arrow().cast(schema), path)
    s = build_report(str(run), str(tmp_path / "nogt.html"))
    text = (tmp_path / "nogt.html").read_text()
    assert s["table_selectors"] == [] and s["plots"] == [] and s["queries_with_gt"] == 0
    assert "no ground truth" in text
    assert s["gallery"] == 4 and s["gallery_no_gt"] == 4 and text.count(IMG_TAG) == 4


def test_deciding_heat_and_mass():
    from pipeline.report import deciding_heat, mass_in_box

    maps = np.full((4, 2, 2, 4, 4), 0.0)
    maps[:, 1, 0, 3, 1] = 1.0  # layer index 1, head index 0 looks at row 3, column 1
    maps[:, 0, :, 0, 0] = 1.0
    maps[:, 1, 1, 0, 0] = 1.0
    ent = np.full((4, 2, 2), 3.0)
    ent[:, 1, 0] = 0.5
    row = {"layers": [4, 7], "heads": [0, 2], "map_grid": 4, "maps": maps.ravel().tolist(),
           "entropy": ent.ravel().tolist()}
    heat, note = deciding_heat(row, None, top_k=1)
    assert np.unravel_index(heat.argmax(), heat.shape) == (3, 1) and "L7H0" in note
    # The cell (row 3, col 1) of a 4 x 4 grid over a 160 x 120 image is x 40..80, y 90..120.
    assert mass_in_box(heat, (40, 90, 80, 120), 160, 120) == pytest.approx(1.0)
    assert mass_in_box(heat, (0, 0, 40, 30), 160, 120) == pytest.approx(0.0)
    assert deciding_heat({**row, "maps": None}, None)[0] is None


def test_cli(run_with_maps, tmp_path, capsys):
    from jobs.cli import main as acs
    from jobs.report import main

    assert main([str(run_with_maps), "--output", str(tmp_path / "cli.html"), "--max-gallery", "3"]) == 0
    assert (tmp_path / "cli.html").exists() and "gallery 3" in capsys.readouterr().out
    assert acs(["report", str(tmp_path / "nothing-here"), "--output", str(tmp_path / "x.html")]) == 2


def test_head_count_curve_by_hand():
    import polars as pl

    from pipeline.analysis import head_count_curve, head_counts

    assert head_counts(9) == [1, 2, 4, 8, 9] and head_counts(1) == [1]
    # Query A: head 0 orders its two candidates right, head 1 wrong and louder; query B has no box.
    frame = pl.DataFrame({"query_id": ["A", "A"], "cand_idx": [0, 1], "iou": [0.9, 0.1]})
    ent = np.zeros((2, 4, 1, 2))
    ent[0, :, 0] = [1.0, 3.0]
    ent[1, :, 0] = [2.0, 0.5]
    queries = pl.DataFrame({"query_id": ["A", "B"], "size_bucket": ["small", "large"]})
    k1, k2 = head_count_curve(frame, ent, np.array([[0.8, 0.1]]), queries)
    assert (k1["k"], k1["all"], k1["small"], k1["large"], k1["spearman"]) == (1, 0.5, 1.0, 0.0, 1.0)
    assert (k2["k"], k2["all"], k2["small"], k2["spearman"]) == (2, 0.0, 0.0, -1.0)
    assert k1["n_all"] == 2 and k1["medium"] is None
    # A head the ranking could not score (NaN) is never used.
    (only,) = head_count_curve(frame, ent, np.array([[np.nan, 0.1]]), queries)
    assert only["k"] == 1 and only["small"] == 0.0


def test_report_analyses_head_curve_and_saliency(run_with_maps, tmp_path):
    import torch

    from pipeline.calibrate import calibrate
    from pipeline.regressor import IoURegressor, save_regressor
    from pipeline.report import build_report

    profile, _ = calibrate(str(run_with_maps), "tiny-test", k=2)
    profile.save(tmp_path / "profile.json")
    torch.manual_seed(0)
    save_regressor(IoURegressor(len(LAYERS), len(HEADS), G), tmp_path / "reg", {"model_id": "tiny-test"})
    md = tmp_path / "analysis.md"
    s = build_report(str(run_with_maps), str(tmp_path / "a.html"), profile_path=str(tmp_path / "profile.json"),
                     regressor_path=str(tmp_path / "reg"), markdown=str(md), max_gallery=0)
    assert {"acs_free_by_head_count", "regressor_saliency"} <= set(s["plots"])
    assert [r["k"] for r in s["head_curve"]] == [1, 2, 4, 8, 9]
    assert all(r["n_all"] == 5 and 0 <= r["all"] <= 1 for r in s["head_curve"])
    # Entropy falls with IoU on every head here, so every head set orders candidates perfectly.
    assert all(r["spearman"] == pytest.approx(1.0) for r in s["head_curve"])
    text = md.read_text()
    assert "## ACS-Free by number of heads" in text and "## Regressor saliency by layer" in text
    shares = [float(line.split("|")[2]) for line in text.split("## Regressor saliency by layer")[1].splitlines()
              if re.match(r"\| \d+ \|", line)]
    assert len(shares) == len(LAYERS) and sum(shares) == pytest.approx(1.0, abs=2e-3)
    html = (tmp_path / "a.html").read_text()
    assert "ACS-Free by number of heads" in html and "layer 5, head 1:" in html
