"""`run_label` end to end on a real local Ray instance: row invariants, schemas, statuses, the run
JSON, summary text, resume, bad inputs and the three input kinds (COCO, manifest, shards)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from _label_helpers import (K, N, PARROT_BOX, PARROT_TOKENS, TINY_TOKENS, assert_exactly_once, bucket, iou, label_config,
                            markers, read, run_json, table_files)
from pipeline.schema import BOXES_SCHEMA, CANDIDATE_STATUS, CANDIDATES_SCHEMA, QUERY_STATUS, attention_schema


def _rows(table) -> list[dict]:
    return table.to_pylist()


# ------------------------------------------------------------------------------------ invariants
def test_row_counts_and_shard_files(synthetic_run):
    out, summary, ids = synthetic_run["out"], synthetic_run["summary"], synthetic_run["query_ids"]
    assert len(ids) == 21
    assert_exactly_once(out, set(ids), K)  # boxes == queries; candidates == queries x (N+1); cand_idx 0..N
    c = summary["counters"]
    assert c["queries"] == 21 and c["shards"] == 3 and c["shards_written"] == 3 and c["shards_skipped"] == 0
    assert c["queries_pending"] == 21
    boxes, cands, attn = read(out, "boxes"), read(out, "candidates"), read(out, "attention")
    assert c["rows"] == {"boxes": 21, "candidates": 21 * K, "attention": attn.num_rows}
    assert c["status"] == dict(Counter(boxes.column("status").to_pylist()))
    # capture=all: one attention row per candidate that has a box (its coordinate tokens)
    assert attn.num_rows == Counter(cands.column("status").to_pylist())["ok"]
    # files and markers are named by shard id; a marker's counts are its shard's rows
    mk = markers(out)
    assert len(mk) == 3
    for name in ("boxes", "candidates", "attention"):
        assert [Path(f).stem for f in table_files(out, name)] == sorted(mk)
    for shard, m in mk.items():
        b = pq.read_table(os.path.join(out, "boxes", f"{shard}.parquet"))
        assert m["shard_id"] == shard
        assert m["queries"] == b.num_rows <= 8
        assert m["candidates"] == pq.read_table(os.path.join(out, "candidates", f"{shard}.parquet")).num_rows
        assert m["attention"] == pq.read_table(os.path.join(out, "attention", f"{shard}.parquet")).num_rows
        assert set(b.column("shard_id").to_pylist()) == {shard}
        assert m["status"] == dict(Counter(b.column("status").to_pylist()))
    assert sorted(m["queries"] for m in mk.values()) == [5, 8, 8]
    # attention rows are self-describing: entropy has 4 x layers x heads values
    for r in _rows(attn):
        assert len(r["entropy"]) == 4 * len(r["layers"]) * len(r["heads"]) > 0


@pytest.mark.parametrize("run", ["synthetic_run", "parrot_run"])
def test_written_schemas_equal_declared(run, request):
    out = request.getfixturevalue(run)["out"]
    for name, schema in (("boxes", BOXES_SCHEMA), ("candidates", CANDIDATES_SCHEMA),
                         ("attention", attention_schema(False))):
        files = table_files(out, name)
        assert files
        for f in files:
            got = pq.read_schema(f)
            assert got.equals(schema), f"{f}:\n{got}\n!=\n{schema}"


@pytest.mark.parametrize("run", ["synthetic_run", "parrot_run"])
def test_statuses_are_documented(run, request):
    out = request.getfixturevalue(run)["out"]
    boxes, cands = read(out, "boxes"), read(out, "candidates")
    assert set(boxes.column("status").to_pylist()) <= set(QUERY_STATUS)
    assert set(cands.column("status").to_pylist()) <= set(CANDIDATE_STATUS)
    for r in _rows(boxes):
        # ok <=> a selected box, no error; anything else says why in words
        assert (r["status"] == "ok") == (r["cand_idx"] is not None) == (r["x1"] is not None)
        assert (r["error"] is None) == (r["status"] == "ok"), r
        assert r["n_candidates"] == K
    for r in _rows(cands):
        assert (r["status"] == "ok") == (r["x1"] is not None)


# ------------------------------------------------------------------------------------ parrot: real boxes
def test_parrot_boxes_ok_inside_image_with_iou(parrot_run):
    out, data, summary = parrot_run["out"], parrot_run["data"], parrot_run["summary"]
    boxes = {r["query_id"]: r for r in _rows(read(out, "boxes"))}
    cands = {(r["query_id"], r["cand_idx"]): r for r in _rows(read(out, "candidates"))}
    assert summary["selector"] == "acs-free"  # auto without a regressor
    for qid, (cat, gt, (w, h)) in data["good"].items():
        b = boxes[qid]
        assert b["status"] == "ok" and b["error"] is None, b
        assert b["category"] == cat and b["selector"] == "acs-free" and b["run_id"] == summary["run_id"]
        assert (b["image_width"], b["image_height"]) == (w, h)
        assert 0 <= b["x1"] < b["x2"] <= w and 0 <= b["y1"] < b["y2"] <= h, b
        assert (b["gt_x1"], b["gt_y1"], b["gt_x2"], b["gt_y2"]) == gt
        assert b["size_bucket"] == bucket((gt[2] - gt[0]) * (gt[3] - gt[1]))
        assert b["iou"] == pytest.approx(iou((b["x1"], b["y1"], b["x2"], b["y2"]), gt), abs=1e-9)
        assert 0 <= b["confidence"] <= 1
        # the greedy candidate is the parrot's answer, in original pixels (identity resize)
        greedy = cands[(qid, 0)]
        assert greedy["status"] == "ok" and (greedy["x1"], greedy["y1"], greedy["x2"], greedy["y2"]) == PARROT_BOX
        assert greedy["iou"] == pytest.approx(iou(PARROT_BOX, gt), abs=1e-9)
        assert "[10, 20, 50, 60]" in greedy["text"]
        # the boxes row is its selected candidate
        sel = cands[(qid, b["cand_idx"])]
        assert (sel["x1"], sel["y1"], sel["x2"], sel["y2"]) == (b["x1"], b["y1"], b["x2"], b["y2"])
        assert sel["iou"] == pytest.approx(b["iou"])
        assert b["n_ok_candidates"] == sum(cands[(qid, c)]["status"] == "ok" for c in range(K))
    # capture=all: exactly one attention row per candidate with a box, keyed like the candidate
    attn = read(out, "attention")
    attn_keys = list(zip(attn.column("query_id").to_pylist(), attn.column("cand_idx").to_pylist()))
    assert len(attn_keys) == len(set(attn_keys))
    assert set(attn_keys) == {key for key, c in cands.items() if c["status"] == "ok"}
    assert len(attn_keys) >= len(data["good"])
    for r in attn.to_pylist():
        assert len(r["entropy"]) == 4 * len(r["layers"]) * len(r["heads"]) > 0
        assert r["grid_h"] > 0 and r["grid_w"] > 0 and r["run_id"] == summary["run_id"]


def test_bad_inputs_each_get_one_row_with_a_readable_error(parrot_run):
    out, data, summary = parrot_run["out"], parrot_run["data"], parrot_run["summary"]
    boxes = read(out, "boxes")
    assert_exactly_once(out, parrot_run["query_ids"], K)
    rows = {r["query_id"]: r for r in _rows(boxes)}
    # everything in one shard: the bad rows did not cost their neighbours anything
    assert len(markers(out)) == 1 and len(set(boxes.column("shard_id").to_pylist())) == 1
    assert summary["counters"]["status"] == {"ok": len(data["good"]), "image_error": 3, "query_error": 1}
    for qid, (status, words) in data["bad"].items():
        r = rows[qid]
        assert r["status"] == status, r
        for w in words:
            assert w in r["error"], (qid, r["error"])
        assert r["x1"] is None and r["cand_idx"] is None and r["n_ok_candidates"] == 0
    for qid in data["good"]:
        assert rows[qid]["status"] == "ok"
    # failed queries keep K candidate rows, status `missing`, the same error; no attention rows
    bad = set(data["bad"])
    for r in _rows(read(out, "candidates")):
        if r["query_id"] in bad:
            assert r["status"] == "missing" and r["error"] == rows[r["query_id"]]["error"] and r["text"] is None
    assert not bad & set(read(out, "attention").column("query_id").to_pylist())
    # failed queries with ground truth count as misses (IoU 0), never silently dropped
    for qid, (status, _) in data["bad"].items():
        if status == "image_error":
            assert rows[qid]["iou"] == 0.0 and rows[qid]["size_bucket"] == "medium"
    unknown = next(q for q, (s, _) in data["bad"].items() if s == "query_error")
    assert rows[unknown]["image_uri"] is None and rows[unknown]["size_bucket"] is None


# ------------------------------------------------------------------------------------ run JSON, summary
def test_run_json_counters_versions_timings(synthetic_run):
    import pyarrow as pa
    import ray

    out, summary = synthetic_run["out"], synthetic_run["summary"]
    runs = sorted(os.listdir(os.path.join(out, "_runs")))
    assert runs == [f"{summary['run_id']}.json"]
    j = run_json(out, summary["run_id"])
    assert j["run_id"] == summary["run_id"]
    assert j["counters"] == summary["counters"]
    c = j["counters"]
    assert (c["queries"], c["shards"], c["shards_written"], c["shards_skipped"]) == (21, 3, 3, 0)
    assert c["generated_tokens"] > 0
    assert c["shards_failed"] == 0 and j["failed_shards"] == {}
    assert j["model_layout"] == {"family": "qwen2.5-vl", "coord_system": "absolute", "visual_layout": "native"}
    v = j["versions"]
    assert v["ray"] == ray.__version__ and v["pyarrow"] == pa.__version__ and v["acs-pipeline"]
    assert {"python", "platform", "torch", "transformers", "polars"} <= set(v)
    t = j["timings"]
    assert 0 <= t["list_s"] <= t["total_s"] and t["total_s"] > 0 and t["queries_per_s"] > 0
    assert t["acs_actor_s"] > 0
    # the job's fixed start-up (actor, model load) is reported apart from the work
    assert 0 < t["startup_s"] < t["total_s"] - t["list_s"]
    cfg = j["config"]
    assert cfg["num_candidates"] == N and cfg["shard_size"] == 8 and cfg["storage_options"] == {}
    assert cfg["coco"] == synthetic_run["cfg"].coco and cfg["run_id"] == summary["run_id"]
    assert j["source"].startswith("coco:") and j["selector"] == "acs-free"


def _table_cells(text: str, selector: str) -> dict[str, str]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "selector"
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if cells[0] == selector:
            return dict(zip(header, cells))
    raise AssertionError(f"no {selector!r} row in:\n{text}")


def test_summary_text_has_selector_table_with_greedy_numbers(parrot_run):
    from pipeline.label import summary_text

    out, data, summary = parrot_run["out"], parrot_run["data"], parrot_run["summary"]
    text = summary_text(summary, out)
    assert text.splitlines()[0].startswith(f"run {summary['run_id']}: 11 queries in 1 shard(s) (0 already done, 1 written)")
    assert "status: image_error=3, ok=7, query_error=1" in text
    cells = _table_cells(text, "greedy")
    # Independent expectation: greedy = the parrot's box for good queries; failed queries with
    # ground truth are misses (IoU 0); the unknown-category query has no ground truth (excluded).
    per_bucket: dict[str, list[float]] = {"small": [], "medium": [], "large": []}
    for _, gt, _ in data["good"].values():
        per_bucket[bucket((gt[2] - gt[0]) * (gt[3] - gt[1]))].append(iou(PARROT_BOX, gt))
    per_bucket["medium"] += [0.0, 0.0, 0.0]  # the three unreadable images (GT area 1600)
    per_bucket["all"] = [x for v in per_bucket.values() for x in v]
    for b, xs in per_bucket.items():
        acc, miou = sum(x >= 0.5 for x in xs) / len(xs), sum(xs) / len(xs)
        assert cells[f"{b} Acc@0.5 / mIoU"] == f"{acc:.3f} / {miou:.3f}", (b, text)
    assert len(per_bucket["all"]) == 10
    for sel in ("acs-free", "random", "logprob", "vote", "loc-mass", "oracle"):
        _table_cells(text, sel)


def test_summary_text_synthetic_run(synthetic_run):
    from pipeline.label import summary_text

    text = summary_text(synthetic_run["summary"], synthetic_run["out"])
    assert "21 queries in 3 shard(s) (0 already done, 3 written)" in text
    assert _table_cells(text, "greedy")["selector"] == "greedy"


# ------------------------------------------------------------------------------------ resume
def test_resume_skips_finished_shards_and_recomputes_a_lost_marker(ray_session, synthetic6, tiny_model_dir, tmp_path):
    from pipeline.label import run_label

    out = str(tmp_path / "out")
    ids = set(synthetic6["query_ids"])

    def run(**kw):
        return run_label(label_config(output=out, coco=synthetic6["ann"], images=synthetic6["root"],
                                      model=str(tiny_model_dir), max_new_tokens=TINY_TOKENS, shard_size=4, **kw))

    first = run(limit=8)
    c1 = first["counters"]
    assert (c1["queries"], c1["shards"], c1["shards_written"], c1["shards_skipped"]) == (8, 2, 2, 0)
    m1 = markers(out)
    assert len(m1) == 2 and all(m["queries"] == 4 for m in m1.values())
    first_rows = {r["query_id"]: r for r in _rows(read(out, "boxes"))}

    full = run()
    c2 = full["counters"]
    assert c2["queries"] == 21 and c2["shards"] == 6  # ceil(21 / 4)
    assert c2["shards_skipped"] == 2 and c2["shards_written"] == 6 - 2
    assert c2["queries_pending"] == 21 - 8 and c2["rows"]["boxes"] == 13
    assert_exactly_once(out, ids, K)
    m2 = markers(out)
    assert set(m1) < set(m2) and len(m2) == 6  # the limited run's shards are the full run's first two
    rows2 = {r["query_id"]: r for r in _rows(read(out, "boxes"))}
    for qid, r in first_rows.items():  # untouched: same shard, same run id
        assert (rows2[qid]["shard_id"], rows2[qid]["run_id"]) == (r["shard_id"], first["run_id"])
    assert {r["run_id"] for q, r in rows2.items() if q not in first_rows} == {full["run_id"]}

    lost = sorted(m2)[2]
    lost_ids = {q for q, r in rows2.items() if r["shard_id"] == lost}
    assert len(lost_ids) == 4
    os.remove(os.path.join(out, "_shards", f"{lost}.json"))
    files_before = {n: [Path(f).name for f in table_files(out, n)] for n in ("boxes", "candidates", "attention")}

    third = run()
    c3 = third["counters"]
    assert c3["shards_written"] == 1 and c3["shards_skipped"] == 5 and c3["queries_pending"] == 4
    assert_exactly_once(out, ids, K)
    assert set(markers(out)) == set(m2)
    assert {n: [Path(f).name for f in table_files(out, n)] for n in files_before} == files_before  # overwritten
    rows3 = {r["query_id"]: r for r in _rows(read(out, "boxes"))}
    for qid, r in rows3.items():
        assert r["run_id"] == (third["run_id"] if qid in lost_ids else rows2[qid]["run_id"]), qid
    cands = read(out, "candidates")
    assert {r for r, s in zip(cands.column("run_id").to_pylist(), cands.column("shard_id").to_pylist())
            if s == lost} == {third["run_id"]}
    assert sorted(os.listdir(os.path.join(out, "_runs"))) == sorted(
        f"{s['run_id']}.json" for s in (first, full, third))


# ------------------------------------------------------------------------------------ other inputs
def test_manifest_input_empty_category_and_duplicate_id(ray_session, parrot_data, parrot_model_dir, tmp_path):
    from pipeline.label import run_label

    manifest = tmp_path / "queries.csv"
    manifest.write_text("query_id,image,category\n"
                        "m1,images/p1.png,red circle\n"
                        "m2,images/p3.png,green triangle\n"
                        "m3,images/p2.png,\n"
                        "m1,images/p4.png,blue square\n")
    out = str(tmp_path / "out")
    summary = run_label(label_config(output=out, queries=str(manifest), images=parrot_data["root"],
                                     model=str(parrot_model_dir), max_new_tokens=PARROT_TOKENS))
    assert summary["counters"]["queries"] == 4
    assert summary["source"] == f"queries:{manifest}:{parrot_data['root']}"
    assert_exactly_once(out, {"m1", "m2", "m3", "m1~dup1"}, K)
    rows = {r["query_id"]: r for r in _rows(read(out, "boxes"))}
    assert rows["m1"]["status"] == rows["m2"]["status"] == "ok"
    assert rows["m1"]["image_uri"] == os.path.join(parrot_data["root"], "images/p1.png")
    assert (rows["m1"]["x1"], rows["m1"]["y1"], rows["m1"]["x2"], rows["m1"]["y2"]) == PARROT_BOX
    assert rows["m1"]["iou"] is None and rows["m1"]["size_bucket"] is None  # no ground truth given
    assert rows["m3"]["status"] == "query_error" and rows["m3"]["error"] == "empty query text"
    assert rows["m1~dup1"]["status"] == "query_error"
    assert rows["m1~dup1"]["error"] == "duplicate query_id (occurrence 2)"
    assert rows["m1~dup1"]["category"] == "blue square"


def test_shards_folder_input_lists_like_coco(ray_session, synthetic6, tiny_model_dir, tmp_path):
    from pipeline.label import run_label

    summary = run_label(label_config(output=str(tmp_path / "out"), shards=os.path.join(synthetic6["root"], "shards") + "/",
                                     model=str(tiny_model_dir), max_new_tokens=TINY_TOKENS))
    assert summary["counters"]["queries"] == len(synthetic6["query_ids"])


def test_shards_glob_input_gives_the_coco_queries(ray_session, synthetic6, tiny_model_dir, tmp_path):
    from pipeline.label import run_label

    out = str(tmp_path / "out")
    url = os.path.join(synthetic6["root"], "shards", "*.parquet")
    summary = run_label(label_config(output=out, shards=url, model=str(tiny_model_dir), max_new_tokens=TINY_TOKENS))
    c = summary["counters"]
    assert c["queries"] == len(synthetic6["query_ids"]) == synthetic6["summary"]["n_queries"] == 21
    boxes = read(out, "boxes")
    # query ids are key:category; the same (image, category) pairs as the COCO listing
    coco_pairs = Counter()
    for q in synthetic6["query_ids"]:
        coco_pairs[int(q.split(":")[0])] += 1
    shard_pairs = Counter(boxes.column("image_id").to_pylist())
    assert {int(k): v for k, v in shard_pairs.items()} == dict(coco_pairs)
    assert_exactly_once(out, set(boxes.column("query_id").to_pylist()), K)
    assert boxes.num_rows == 21
    # image bytes came out of the Parquet shard: every image decoded (the random model finds no box)
    statuses = Counter(boxes.column("status").to_pylist())
    assert statuses == {"no_box": 21}, statuses
    assert set(boxes.column("image_width").to_pylist()) == {336}
    assert set(boxes.column("image_uri").to_pylist()) == {
        f"{os.path.join(synthetic6['root'], 'shards', 'shard-00000.parquet')}#shapes-test-{i:06d}" for i in range(6)}


def test_webdataset_tar_input(ray_session, synthetic6, tiny_model_dir, tmp_path):
    """The synthetic shard rewritten as a WebDataset tar (KEY.jpg + KEY.json): same queries, every
    image read out of the tar and decoded."""
    import io
    import json as _json
    import tarfile

    import pyarrow.parquet as pq

    from pipeline.label import run_label

    table = pq.read_table(os.path.join(synthetic6["root"], "shards", "shard-00000.parquet")).to_pylist()
    tar_path = tmp_path / "wds" / "shard-000.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tar:
        for row in table:
            for name, data in ((f"{row['key']}.jpg", row["jpg"]),
                               (f"{row['key']}.json", _json.dumps({"categories": row["categories"],
                                                                    "image_id": row["image_id"]}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = str(tmp_path / "out")
    summary = run_label(label_config(output=out, shards=str(tar_path.parent) + "/", model=str(tiny_model_dir),
                                     max_new_tokens=TINY_TOKENS))
    assert summary["counters"]["queries"] == len(synthetic6["query_ids"]) == 21
    boxes = read(out, "boxes")
    assert_exactly_once(out, set(boxes.column("query_id").to_pylist()), K)
    assert Counter(boxes.column("status").to_pylist()) == {"no_box": 21}  # decoded; the random model finds no box
    assert set(boxes.column("image_width").to_pylist()) == {336}


def test_limit_ending_mid_shard_then_full_run_loses_nothing(ray_session, synthetic6, tiny_model_dir, tmp_path):
    """--limit 6 with 4 queries per shard leaves a short second shard; the full run must not skip it."""
    from pipeline.label import run_label

    out = str(tmp_path / "out")

    def run(**kw):
        return run_label(label_config(output=out, coco=synthetic6["ann"], images=synthetic6["root"],
                                      model=str(tiny_model_dir), max_new_tokens=TINY_TOKENS, shard_size=4, **kw))

    first = run(limit=6)
    assert sorted(m["queries"] for m in markers(out).values()) == [2, 4]
    full = run()
    c = full["counters"]
    # shard 0 (4 queries) kept; the short shard 1 recomputed with its 4 queries; 4 more shards written
    assert (c["shards_skipped"], c["shards_written"], c["queries_pending"]) == (1, 5, 21 - 4)
    assert_exactly_once(out, set(synthetic6["query_ids"]), K)
    assert sorted(m["queries"] for m in markers(out).values()) == [1, 4, 4, 4, 4, 4]
    # a later limited run finds everything done (a longer marker is a superset)
    again = run(limit=6)
    assert again["counters"]["shards_skipped"] == 2 and again["counters"]["queries_pending"] == 0
    assert first["run_id"] != full["run_id"]


def test_other_configuration_into_same_output_is_refused(ray_session, synthetic6, tiny_model_dir, tmp_path):
    import json

    from pipeline.label import ConfigMismatch, run_label

    out = tmp_path / "out"

    def run(**kw):
        return run_label(label_config(output=str(out), coco=synthetic6["ann"], images=synthetic6["root"],
                                      model=str(tiny_model_dir), max_new_tokens=TINY_TOKENS, shard_size=4,
                                      limit=4, **kw))

    run()
    rec = json.loads((out / "_config.json").read_text())
    assert rec["num_candidates"] == N and rec["model"] == str(tiny_model_dir) and rec["model_digest"]
    with pytest.raises(ConfigMismatch, match="temperature: 1.0 -> 0.5"):
        run(temperature=0.5)
    # the refused run wrote nothing: still one run record, one shard
    assert len(os.listdir(out / "_runs")) == 1 and len(markers(out)) == 1
    # an output from before configuration records (markers, no _config.json) is refused too
    (out / "_config.json").unlink()
    with pytest.raises(ConfigMismatch, match="no _config.json"):
        run()


def test_evaluate_gt_attaches_what_label_wrote(synthetic_run, synthetic6):
    """A run labelled without ground truth (a manifest or shards), evaluated with `--gt`, must read
    exactly as the same run labelled from the COCO file: the boxes' and candidates' IoU, the
    buckets, and so every table of `acs evaluate`."""
    import polars as pl

    from pipeline.evaluate import attach_gt, evaluate_run, label_quality, load_tables

    boxes, cands = load_tables(synthetic_run["out"])
    gt_cols = ["gt_x1", "gt_y1", "gt_x2", "gt_y2", "gt_area", "iou", "size_bucket"]
    bare_boxes = boxes.with_columns(pl.lit(None, pl.Float64).alias(c) for c in gt_cols[:-1]).with_columns(
        pl.lit(None, pl.String).alias("size_bucket"))
    bare_cands = cands.with_columns(pl.lit(None, pl.Float64).alias("iou"))
    got_boxes, got_cands = attach_gt(bare_boxes, bare_cands, synthetic6["ann"])

    assert got_boxes.height == boxes.height == 21 and got_cands.height == cands.height
    statuses = set(boxes["status"])
    assert {"ok", "no_box"} <= statuses, statuses  # both paths: a box's IoU and a failed query's 0.0
    key = ["query_id"]
    a, b = boxes.sort(key), got_boxes.sort(key)
    assert b["iou"].null_count() == 0
    assert a["size_bucket"].to_list() == b["size_bucket"].to_list()
    for c in gt_cols[:-1]:
        assert a[c].to_numpy() == pytest.approx(b[c].to_numpy(), abs=1e-9), c
    assert (b.filter(pl.col("status") != "ok")["iou"] == 0.0).all()
    a, b = cands.sort("query_id", "cand_idx"), got_cands.sort("query_id", "cand_idx")
    assert a["iou"].fill_null(-1).to_numpy() == pytest.approx(b["iou"].fill_null(-1).to_numpy(), abs=1e-9)
    assert label_quality(got_boxes) == label_quality(boxes.filter(pl.col("gt_x1").is_not_null()))

    direct, via_gt = evaluate_run(synthetic_run["out"]), evaluate_run(synthetic_run["out"], synthetic6["ann"])
    for k in ("queries_with_gt", "table", "label_quality"):
        assert via_gt[k] == direct[k], k
