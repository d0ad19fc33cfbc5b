"""The YOLO txt export and the COCO export read back by pycocotools, on a hand-made boxes/ table
(written with the declared schema, as test_report's run is; no model involved).

Images: a.png 160x120 (two boxes), b.png 200x100 (one box without a confidence, one no_box),
missing.png (image_error), and one image inside a Parquet shard, 336x252; plus a query_error row
that names no image."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.schema import BOXES_SCHEMA

SHARD_IMAGE = "/data/shards/shard-00000.parquet#k7"
# query_id: (image_uri, (W, H), category, status, box xyxy, confidence)
ROWS = {
    "qa1": ("/data/a.png", (160, 120), "red circle", "ok", (10.0, 20.0, 50.0, 60.0), 0.9),
    "qa2": ("/data/a.png", (160, 120), "blue square", "ok", (0.0, 0.0, 160.0, 120.0), 0.3),
    "qb1": ("/data/b.png", (200, 100), "blue square", "no_box", None, None),
    "qb2": ("/data/b.png", (200, 100), "red circle", "ok", (150.0, 50.0, 200.0, 100.0), None),
    "qm": ("/data/missing.png", (None, None), "red circle", "image_error", None, None),
    "qs": (SHARD_IMAGE, (336, 252), "green triangle", "ok", (84.0, 63.0, 252.0, 189.0), 0.75),
    "qq": (None, (None, None), "", "query_error", None, None),
}
CLASSES = ["blue square", "green triangle", "red circle"]  # sorted: ids 0, 1, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("yolo") / "run"
    (out / "boxes").mkdir(parents=True)
    rows = []
    for qid, (uri, (w, h), cat, status, box, conf) in ROWS.items():
        rows.append({"query_id": qid, "image_id": qid, "image_uri": uri, "category": cat, "selector": "acs-free",
                     "cand_idx": 1 if box else None, **dict(zip(("x1", "y1", "x2", "y2"), box or (None,) * 4)),
                     "confidence": conf, "status": status, "image_width": w, "image_height": h,
                     "model_id": "tiny-test", "run_id": "run-test", "shard_id": "s0"})
    pq.write_table(pa.Table.from_pylist(rows, schema=BOXES_SCHEMA), out / "boxes" / "s0.parquet")
    return out


def _labels(folder) -> dict[str, list[str]]:
    return {p.stem: p.read_text().splitlines() for p in sorted((folder / "labels").glob("*.txt"))}


def test_yolo_stem_pairs_label_files_with_images():
    from pipeline.export import yolo_stem

    assert yolo_stem("/data/images/img-001.JPG") == "img-001"
    assert yolo_stem("s3://b/images/scene.v2.png") == "scene.v2"  # only the image suffix goes
    assert yolo_stem(SHARD_IMAGE) == "k7"  # a Parquet shard's key
    assert yolo_stem("s3://b/wds/shard-000.tar#sub/key9.jpg") == "key9"  # a tar member
    assert yolo_stem("/data/odd#name.png") == "odd#name"  # '#' in a plain file name stays


def test_yolo_lines_are_normalised_centre_boxes(run, tmp_path):
    from pipeline.export import to_yolo

    stats = to_yolo(str(run), str(tmp_path / "yolo"))
    labels = _labels(tmp_path / "yolo")
    # Every image gets its file, the empty ones included; the query_error row names no image.
    assert set(labels) == {"a", "b", "missing", "k7"}
    # a.png 160x120: red circle (10, 20, 50, 60) -> centre (30, 40), size 40x40
    assert labels["a"] == ["2 0.187500 0.333333 0.250000 0.333333",   # qa1
                           "0 0.500000 0.500000 1.000000 1.000000"]   # qa2: the whole image
    # b.png 200x100: (150, 50, 200, 100) -> centre (175, 75), 50x50; its no_box query writes nothing
    assert labels["b"] == ["2 0.875000 0.750000 0.250000 0.500000"]
    assert labels["k7"] == ["1 0.500000 0.500000 0.500000 0.500000"]  # 336x252: the middle quarter
    assert labels["missing"] == []
    for line in (l for ls in labels.values() for l in ls):
        cls, *xywh = line.split()
        assert int(cls) in range(len(CLASSES)) and all(0.0 <= float(v) <= 1.0 for v in xywh)
    assert stats == {"images": 4, "labels": 4, "classes": CLASSES, "below_min_confidence": 0,
                     "without_box": 3, "unanswered_images": ["/data/missing.png"]}
    assert (tmp_path / "yolo" / "classes.txt").read_text() == "blue square\ngreen triangle\nred circle\n"


def test_yolo_threshold_filters_and_counts_keeping_class_ids(run, tmp_path):
    from pipeline.export import export, to_yolo

    stats = to_yolo(str(run), str(tmp_path / "yolo"), min_confidence=0.5)
    labels = _labels(tmp_path / "yolo")
    # qa2 (0.3) and qb2 (no confidence: 0) fall below 0.5; their images keep their (now shorter) files
    assert labels == {"a": ["2 0.187500 0.333333 0.250000 0.333333"], "b": [], "missing": [],
                      "k7": ["1 0.500000 0.500000 0.500000 0.500000"]}
    assert (stats["labels"], stats["below_min_confidence"], stats["without_box"], stats["images"]) == (2, 2, 3, 4)
    assert stats["classes"] == CLASSES  # ids do not depend on the threshold
    # the threshold is inclusive, on the same column as the COCO export's score
    assert export(str(run), "yolo", str(tmp_path / "y75"), min_confidence=0.75) == 2
    assert export(str(run), "yolo", str(tmp_path / "y76"), min_confidence=0.76) == 1


def test_yolo_given_classes_fix_ids_and_yaml_quotes_names(run, tmp_path):
    from pipeline.export import to_yolo

    yaml = pytest.importorskip("yaml")
    classes = ["sign: stop", "red circle", "green triangle", "blue square"]  # a train set's order
    to_yolo(str(run), str(tmp_path / "yolo"), classes=classes)
    labels = _labels(tmp_path / "yolo")
    assert labels["a"] == ["1 0.187500 0.333333 0.250000 0.333333", "3 0.500000 0.500000 1.000000 1.000000"]
    assert labels["k7"] == ["2 0.500000 0.500000 0.500000 0.500000"]
    data = yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text())
    assert data["nc"] == 4 and data["names"] == dict(enumerate(classes))
    with pytest.raises(ValueError, match=r"categories \['green triangle'\] of .* are not among the given classes"):
        to_yolo(str(run), str(tmp_path / "bad"), classes=["red circle", "blue square"])


def test_yolo_refuses_two_images_of_one_name(run, tmp_path):
    from pipeline.export import to_yolo

    copy = tmp_path / "run"
    (copy / "boxes").mkdir(parents=True)
    t = pq.read_table(run / "boxes" / "s0.parquet").to_pylist()
    t[0]["image_uri"] = "/other/a.png"  # qa1 now on another a.png
    pq.write_table(pa.Table.from_pylist(t, schema=BOXES_SCHEMA), copy / "boxes" / "s0.parquet")
    with pytest.raises(ValueError, match="images /data/a.png and /other/a.png share the label file name a.txt"):
        to_yolo(str(copy), str(tmp_path / "yolo"))


def test_export_job_yolo_says_what_it_did_not_write(run, tmp_path, capsys):
    from jobs.export import main

    out = tmp_path / "yolo"
    assert main([str(run), "--format", "yolo", "--output", str(out), "--min-confidence", "0.5"]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == (f"wrote 2 labels for 4 images (3 classes, yolo) to {out}; not written: "
                               "2 below --min-confidence 0.5, 3 without a box (status not ok)")
    assert "1 image(s) have an empty label file but the model never answered" in cap.err
    assert "/data/missing.png" in cap.err
    # a folder that is not a labelled run: exit 2 and one line, not an empty export
    assert main([str(tmp_path / "nothing"), "--format", "coco", "--output", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert err == f"acs export: {tmp_path / 'nothing'} has no boxes/ rows: is it the output of `acs label`?\n"


def test_coco_export_loads_with_pycocotools_loadres(run, tmp_path):
    """The COCO export as pycocotools reads detections: its annotations through `loadRes` against
    the export's own images, then COCOeval, which must find every box (AP 1 against itself)."""
    from pipeline.export import export

    path = tmp_path / "coco.json"
    assert export(str(run), "coco", str(path)) == 4
    data = json.loads(path.read_text())
    gt = COCO(str(path))
    res = gt.loadRes(data["annotations"])
    assert len(res.getAnnIds()) == 4
    cat = {c["name"]: c["id"] for c in data["categories"]}
    img = {i["file_name"]: i["id"] for i in data["images"]}
    assert sorted(cat) == CLASSES and set(img) == {"/data/a.png", "/data/b.png", SHARD_IMAGE}
    (ann,) = res.loadAnns(res.getAnnIds(imgIds=[img["/data/a.png"]], catIds=[cat["red circle"]]))
    assert ann["bbox"] == [10.0, 20.0, 40.0, 40.0] and ann["area"] == 1600.0 and ann["score"] == 0.9
    (ann,) = res.loadAnns(res.getAnnIds(imgIds=[img["/data/b.png"]]))
    assert ann["score"] == 0.0  # no confidence: scored 0, as --min-confidence and `acs evaluate` read it
    ev = COCOeval(gt, res, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # AP@[.5:.95]
