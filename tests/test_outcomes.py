"""Where the answers landed (`acs evaluate`, the report): a hand-made run over a hand-made COCO file
in which every answer box sits on a known object, so every count is known. Tables are written
with the project's schemas; no model, no Ray.

Image 1 holds a cat (small), a crowd region of cats and a dog (medium); image 2 a cat (large) and
two birds (two instances: not a query). Image 3 holds a cat whose image cannot be read.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.metrics import BUCKETS, OUTCOMES, box_iou
from pipeline.schema import BOXES_SCHEMA, CANDIDATES_SCHEMA, SELECTOR_COLUMNS

CATS = {1: "cat", 2: "dog", 3: "bird"}
# (annotation id, image id, category id, xyxy, iscrowd)
ANNS = [
    (1, 1, 1, (10, 10, 40, 40), 0),      # the cat of image 1: 900 px, small
    (2, 1, 2, (100, 100, 180, 180), 0),  # the dog: 6400 px, medium
    (3, 1, 1, (50, 50, 90, 90), 1),      # a crowd of cats: never a target, but an object
    (4, 2, 1, (0, 0, 120, 120), 0),      # the cat of image 2: large
    (5, 2, 3, (130, 130, 150, 150), 0),  # two birds: no bird query (ambiguous), but objects
    (6, 2, 3, (160, 160, 190, 190), 0),
    (7, 3, 1, (5, 5, 25, 25), 0),        # the cat of image 3 (its image is unreadable): small
]
# query_id: (target annotation id, candidate boxes (None = no box), what each lands on, ACS-Free's pick)
QUERIES = {
    "1:1": (1, [(50, 50, 90, 90), (12, 12, 40, 40), (100, 100, 170, 170)],
            ["other_instance", "right", "other_object"], 1),
    "1:2": (2, [(100, 100, 180, 180), None, (0, 0, 60, 60)], ["right", "no_box", "nowhere"], 2),
    "2:1": (4, [(40, 40, 100, 100), (130, 130, 152, 152), (0, 0, 110, 120)], ["near", "other_object", "right"], 1),
    "3:1": (7, [None, None, None], ["no_box"] * 3, None),
}
BUCKET = {"1:1": "small", "1:2": "medium", "2:1": "large", "3:1": "small"}
ANN_BOX = {a[0]: a[3] for a in ANNS}


def write_coco(path, anns=ANNS):
    coco = {"images": [{"id": i, "file_name": f"img{i}.png", "width": 200, "height": 200} for i in (1, 2, 3)],
            "categories": [{"id": k, "name": v} for k, v in CATS.items()],
            "annotations": [{"id": a, "image_id": im, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "area": float((x2 - x1) * (y2 - y1)), "iscrowd": crowd}
                            for a, im, c, (x1, y1, x2, y2), crowd in anns]}
    path.write_text(json.dumps(coco))
    return str(path)


def make_run(out, *, with_gt=True, coco=None, run_id="run-oc"):
    """boxes/ + candidates/ as `acs label` writes them; `with_gt`: the ground-truth columns filled (a
    --coco run); `coco`: the annotation path its _runs/RUN_ID.json records (None: a manifest run)."""
    for t in ("boxes", "candidates", "_runs"):
        (out / t).mkdir(parents=True, exist_ok=True)
    box_rows, cand_rows = [], []
    base = {"run_id": run_id, "shard_id": "s0"}
    for qid, (ann, cboxes, _, pick) in QUERIES.items():
        image_id, cat_id = qid.split(":")
        gt = ANN_BOX[ann]
        failed = qid == "3:1"
        for c, b in enumerate(cboxes):
            iou = float(box_iou([b], [gt])[0, 0]) if b else 0.0
            scores = {"greedy": -c, "acs-free": 1.0 if c == pick else -1.0 - c, "random": -c, "logprob": -c,
                      "vote": -c, "oracle": iou}
            cand_rows.append({"query_id": qid, "cand_idx": c, "text": str(b),
                              "status": "ok" if b else ("missing" if failed else "no_box"),
                              **dict(zip(("x1", "y1", "x2", "y2"), b or (None,) * 4)),
                              **{SELECTOR_COLUMNS[s]: (v if b else None) for s, v in scores.items()},
                              "iou": (iou if b else 0.0) if with_gt else None, **base})
        sel = cboxes[pick] if pick is not None else None
        area = float((gt[2] - gt[0]) * (gt[3] - gt[1]))
        gt_cols = {**dict(zip(("gt_x1", "gt_y1", "gt_x2", "gt_y2"), gt)), "gt_area": area,
                   "iou": float(box_iou([sel], [gt])[0, 0]) if sel else 0.0, "size_bucket": BUCKET[qid]}
        box_rows.append({"query_id": qid, "image_id": image_id, "image_uri": f"/data/img{image_id}.png",
                         "category": CATS[int(cat_id)], "selector": "acs-free", "cand_idx": pick,
                         **dict(zip(("x1", "y1", "x2", "y2"), sel or (None,) * 4)),
                         "confidence": 0.5 if sel else None,
                         "status": "image_error" if failed else "ok", "n_candidates": 3,
                         "model_id": "tiny-test", **(gt_cols if with_gt else {}), **base})
    pq.write_table(pa.Table.from_pylist(box_rows, schema=BOXES_SCHEMA), out / "boxes" / "s0.parquet")
    pq.write_table(pa.Table.from_pylist(cand_rows, schema=CANDIDATES_SCHEMA), out / "candidates" / "s0.parquet")
    config = {"output": str(out), "coco": coco, "images": "/data" if coco else None,
              "queries": None if coco else "/data/manifest.csv", "storage_options": {}}
    (out / "_runs" / f"{run_id}.json").write_text(json.dumps({"run_id": run_id, "config": config}))
    return out


def expected(candidate_indices):
    """{bucket: {outcome: count, "n"}} of the candidates `candidate_indices(qid)` picks, from QUERIES."""
    counts = {b: dict.fromkeys((*OUTCOMES, "n"), 0) for b in (*BUCKETS, "all")}
    for qid, (_, _, lands, _) in QUERIES.items():
        for c in candidate_indices(qid):
            for b in (BUCKET[qid], "all"):
                counts[b][lands[c] if c is not None else "no_box"] += 1
                counts[b]["n"] += 1
    return counts


def cells(landing, group, name):
    return {r["size_bucket"]: {k: r[k] for k in (*OUTCOMES, "n")} for r in landing["rows"]
            if (r["group"], r["name"]) == (group, name)}


@pytest.fixture()
def coco(tmp_path):
    return write_coco(tmp_path / "annotations.json")


def test_outcomes_from_the_runs_recorded_coco(tmp_path, coco):
    from pipeline.evaluate import evaluate_run

    run = make_run(tmp_path / "run", coco=coco)
    res = evaluate_run(str(run))
    oc = res["outcomes"]
    assert "outcomes_note" not in res
    assert (oc["annotations"], oc["source"], oc["queries"], oc["queries_left_out"]) == (coco, "the run's --coco", 4, 0)
    # ACS-Free: the right cat (1:1), the empty corner (1:2), a bird instead of the cat (2:1), no box (3:1).
    free = cells(oc, "selected", "acs-free")
    assert free["all"] == {**dict.fromkeys(OUTCOMES, 0), "right": 1, "other_object": 1, "nowhere": 1, "no_box": 1,
                           "n": 4}
    assert free["small"] == {**dict.fromkeys(OUTCOMES, 0), "right": 1, "no_box": 1, "n": 2}
    assert free["medium"]["nowhere"] == 1 and free["large"]["other_object"] == 1
    # Greedy boxed the crowd of cats (another instance), the dog, a point near the large cat.
    greedy = cells(oc, "selected", "greedy")
    assert greedy == expected(lambda q: [0] if q != "3:1" else [None])
    assert greedy["all"]["other_instance"] == 1 and greedy["all"]["near"] == 1
    # The oracle takes the highest IoU: right wherever a candidate is.
    assert cells(oc, "selected", "oracle")["all"] == {**dict.fromkeys(OUTCOMES, 0), "right": 3, "no_box": 1, "n": 4}
    # Candidates: cand 0 per query, and every sampled one (the failed query's are `missing`: no box).
    assert cells(oc, "candidates", "greedy") == expected(lambda q: [0])
    sampled = cells(oc, "candidates", "sampled")
    assert sampled == expected(lambda q: [1, 2])
    assert sampled["all"] == {"right": 2, "other_instance": 0, "other_object": 2, "near": 0, "nowhere": 1,
                              "no_box": 3, "n": 8}
    # Shares are counts over n; an empty bucket has none.
    row = next(r for r in oc["rows"] if (r["group"], r["name"], r["size_bucket"]) == ("candidates", "sampled", "all"))
    assert row["share"]["no_box"] == pytest.approx(3 / 8) and sum(row["share"].values()) == pytest.approx(1.0)
    assert [r["name"] for r in oc["rows"] if r["group"] == "selected"][::4] == [
        "greedy", "acs-free", "random", "logprob", "vote", "oracle"]  # the accuracy table's order
    # "right" is Acc@0.5 counted another way.
    acc = {(r["selector"], r["size_bucket"]): r["acc50"] for r in res["table"]}
    for r in oc["rows"]:
        if r["group"] == "selected" and r["n"]:
            assert r["right"] / r["n"] == pytest.approx(acc[(r["name"], r["size_bucket"])])
    json.loads(json.dumps(res))  # plain JSON: no NaN shares


def test_outcomes_with_gt_match_a_manifest_run(tmp_path, coco):
    """A run labelled without ground truth, evaluated with --gt: the queries are matched to images
    as `attach_gt` does (image id, else file stem) and land where they land in the --coco run."""
    from pipeline.evaluate import evaluate_run

    recorded = evaluate_run(str(make_run(tmp_path / "a", coco=coco)))["outcomes"]
    res = evaluate_run(str(make_run(tmp_path / "b", with_gt=False)), gt_json=coco)
    assert res["outcomes"]["source"] == "--gt" and res["outcomes"]["queries"] == 4
    assert res["outcomes"]["rows"] == recorded["rows"]


def test_no_full_ground_truth_no_breakdown(tmp_path, coco):
    """A manifest run with its own ground-truth columns: the accuracy table, but only the target of
    each query is known, so the breakdown is absent and the note says why."""
    from pipeline.evaluate import evaluate_run

    res = evaluate_run(str(make_run(tmp_path / "run", coco=None)))
    assert "table" in res and "outcomes" not in res
    assert "the run records no --coco file" in res["outcomes_note"] and "--gt" in res["outcomes_note"]


def test_recorded_coco_gone_is_a_note_not_an_error(tmp_path):
    from pipeline.evaluate import evaluate_run

    res = evaluate_run(str(make_run(tmp_path / "run", coco=str(tmp_path / "moved.json"))))
    assert "table" in res and "outcomes" not in res
    assert "moved.json could not be read (FileNotFoundError" in res["outcomes_note"]


def test_another_coco_file_matches_no_query(tmp_path, coco):
    """The targets must be the run's ground truth: a file whose boxes differ matches nothing."""
    from pipeline.evaluate import evaluate_run

    moved = [(a, im, c, tuple(v + 30 for v in box), crowd) for a, im, c, box, crowd in ANNS]
    other = write_coco(tmp_path / "other.json", moved)
    res = evaluate_run(str(make_run(tmp_path / "run", coco=other)))
    assert "outcomes" not in res and "no query with ground truth matched" in res["outcomes_note"]


def test_run_config_record_when_no_run_summary(tmp_path, coco):
    """A run that never finished has no _runs/RUN_ID.json, but its _config.json names the file."""
    from pipeline.evaluate import evaluate_run

    run = make_run(tmp_path / "run", coco=coco)
    (run / "_runs" / "run-oc.json").unlink()
    (run / "_config.json").write_text(json.dumps({"coco": coco, "images": "/data"}))
    assert evaluate_run(str(run))["outcomes"]["queries"] == 4


def test_cli_prints_and_writes_the_breakdown(tmp_path, coco, capsys):
    from jobs.evaluate import main

    run = make_run(tmp_path / "run", coco=coco)
    md = tmp_path / "eval.md"
    assert main([str(run), "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "Where the answers landed" in out
    text = md.read_text()
    section = text.split("## Where the answers landed")[1]
    small = section.split("small (2 queries)")[1].split("medium")[0]
    assert "| cands 1..N (sampled) |" in small
    line = next(x for x in small.splitlines() if x.startswith("| acs-free "))
    assert [c.strip() for c in line.strip("|").split("|")] == [
        "acs-free", "2", "1 (50.0%)", "0", "0", "0", "0", "1 (50.0%)"]
    assert "large (1 query)" in section
    assert json.loads((run / "eval.json").read_text())["outcomes"]["queries"] == 4

    bare = make_run(tmp_path / "bare", coco=None)
    assert main([str(bare)]) == 0
    assert "where the answers landed: not computed: needs every object" in capsys.readouterr().out


def test_s3_run_and_annotations(tmp_path, coco):
    """Run and annotation file on S3 (moto's server on 127.0.0.1): the recorded s3:// path is read
    with the storage options evaluate was given."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    from pipeline.evaluate import evaluate_run

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        so = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
        client = boto3.client("s3", endpoint_url=so["endpoint_url"], region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket="acs-oc")
        client.upload_file(coco, "acs-oc", "data/annotations.json")
        run = make_run(tmp_path / "run", coco="s3://acs-oc/data/annotations.json")
        for p in sorted(run.rglob("*")):
            if p.is_file():
                client.upload_file(str(p), "acs-oc", f"run/{p.relative_to(run).as_posix()}")
        res = evaluate_run("s3://acs-oc/run", storage_options=so)
        assert res["outcomes"]["annotations"] == "s3://acs-oc/data/annotations.json"
        local = evaluate_run(str(make_run(tmp_path / "local", coco=coco)))
        assert res["outcomes"]["rows"] == local["outcomes"]["rows"]
    finally:
        server.stop()


def test_report_shows_the_breakdown(tmp_path, coco):
    import re

    from pipeline.report import build_report

    run = make_run(tmp_path / "run", coco=coco)
    md = tmp_path / "analyses.md"
    s = build_report(str(run), str(tmp_path / "r.html"), max_gallery=0, markdown=str(md))
    text = (tmp_path / "r.html").read_text()
    assert s["outcomes_queries"] == 4
    assert "<h2>Where the answers landed</h2>" in text and "annotations.json (the run&#x27;s --coco; 4 queries" in text
    # One table per bucket: small, medium, large, all.
    assert text.count('<table class="landing">') == 4
    small = text.split('<table class="landing">')[1]
    assert "small (2 queries)" in small
    row = re.search(r'<tr><td class="ans">acs-free</td>(.*?)</tr>', small).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells == ["2", "50%<small>1</small>", "0", "0", "0", "0", "50%<small>1</small>"]
    # The candidate rows follow the selectors, under a rule.
    assert '<tr class="cands"><td class="ans">cand 0 (greedy)</td>' in small
    assert "## Where the answers landed" in md.read_text()


def test_report_says_why_not(tmp_path):
    from pipeline.report import build_report

    s = build_report(str(make_run(tmp_path / "run", coco=None)), str(tmp_path / "r.html"), max_gallery=0)
    text = (tmp_path / "r.html").read_text()
    assert s["outcomes_queries"] is None and '<table class="landing">' not in text
    assert "Not computed: needs every object of each image" in text
