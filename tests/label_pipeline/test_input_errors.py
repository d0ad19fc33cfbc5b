"""A run that finds nothing is an error (issue 16): every input that lists no query, or nothing a
model could be asked, is refused before Ray starts, with a message naming the input and the cause;
`acs label` turns it into exit code 2 and one line on stderr. A finished output still reruns.

The listing functions are tested directly (no Ray, no model); `jobs.label.main` for the exit codes.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _label_helpers import label_config
from pipeline.inputs import InputError, NoQueries, list_coco, list_manifest, list_shards


def _coco(tmp_path, name="ann.json", **kw):
    """A COCO file: one 100x80 image with one red circle, unless the caller overrides a key."""
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400}],
            "categories": [{"id": 1, "name": "red circle"}]}
    coco.update(kw)
    path = tmp_path / name
    path.write_text(json.dumps(coco))
    return str(path)


# ------------------------------------------------------------------------------------ --coco
def test_coco_that_is_a_run_summary_names_file_and_missing_keys(synthetic6):
    """The reported case: make-synthetic's summary.json given as --coco."""
    summary = os.path.join(synthetic6["root"], "summary.json")
    with pytest.raises(InputError) as e:
        list_coco(summary, synthetic6["root"])
    msg = str(e.value)
    assert summary in msg and "is not a COCO annotation file" in msg
    assert "no `images` list and no `annotations` list and no `categories` list" in msg
    assert "top-level keys: geometry, n_annotations" in msg  # what the file does hold
    # A ValueError, not an OSError: the listing's storage retries must not retry a wrong file.
    assert isinstance(e.value, ValueError) and not isinstance(e.value, OSError)


def test_coco_missing_only_annotations_names_only_that(tmp_path):
    path = tmp_path / "image_info.json"  # COCO test-dev style: images and categories, no ground truth
    path.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(InputError) as e:
        list_coco(str(path), str(tmp_path))
    assert str(e.value) == (f"{path} is not a COCO annotation file: it has no `annotations` list "
                            "(its top-level keys: categories, images)")


def test_coco_results_list_and_non_json_are_refused(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]))
    with pytest.raises(InputError, match=r"holds a JSON list \(a COCO results file\?\), not a COCO annotation file"):
        list_coco(str(results), str(tmp_path))
    broken = tmp_path / "broken.json"
    broken.write_text("{images: ")
    with pytest.raises(InputError, match=re.escape(f"{broken} is not JSON")):
        list_coco(str(broken), str(tmp_path))


@pytest.mark.parametrize("override, why", [
    ({"images": [], "annotations": []}, "it has no images"),
    ({"annotations": []}, "it has no annotations"),
    ({"annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1}]},
     "all 1 annotations are crowd regions"),
    ({"annotations": [{"id": i, "image_id": 1, "category_id": 1, "bbox": [10 * i, 0, 5, 5]} for i in (1, 2)]},
     "none of its 1 (image, category) pairs has exactly one instance"),
])
def test_coco_with_no_query_says_why(tmp_path, override, why):
    ann = _coco(tmp_path, **override)
    with pytest.raises(NoQueries) as e:
        list_coco(ann, str(tmp_path))
    assert str(e.value).startswith(f"{ann} lists no query: {why}")


def test_coco_whose_every_query_is_unusable_is_refused_by_the_run_listing(tmp_path):
    """Annotations naming unknown category ids are listed as query_error rows: alone, the run would
    write error rows only, so the run's listing refuses it and counts the causes."""
    from pipeline.label import _list

    ann = _coco(tmp_path, categories=[{"id": 7, "name": "blue square"}])
    assert [q["pre_status"] for q in list_coco(ann, str(tmp_path))] == ["query_error"]  # the lister keeps the row
    with pytest.raises(NoQueries, match=re.escape(f"{ann}: none of its 1 listed queries is usable "
                                                  "(1 x annotation 1 names unknown category id 1)")):
        _list(label_config(output=str(tmp_path / "out"), coco=ann, images=str(tmp_path)))


def test_categories_with_coco_is_refused(synthetic6, tmp_path):
    from pipeline.label import _list

    cfg = label_config(output=str(tmp_path / "out"), coco=synthetic6["ann"], images=synthetic6["root"],
                       categories=["red circle"])
    with pytest.raises(InputError, match="--categories applies to --shards only"):
        _list(cfg)


# ------------------------------------------------------------------------------------ --queries
def test_manifest_without_needed_columns_names_them(tmp_path):
    manifest = tmp_path / "queries.csv"
    manifest.write_text("file,label\nimages/p1.png,red circle\n")
    with pytest.raises(InputError) as e:
        list_manifest(str(manifest), str(tmp_path))
    assert str(e.value) == (f"manifest {manifest}: missing column(s) ['category', 'image']; need `image` and "
                            "`category` (it has ['file', 'label'])")


def test_manifest_with_only_a_header_is_empty(tmp_path):
    manifest = tmp_path / "queries.csv"
    manifest.write_text("image,category\n")
    with pytest.raises(NoQueries, match=re.escape(f"manifest {manifest} lists no query: it has no rows")):
        list_manifest(str(manifest), str(tmp_path))


def test_manifest_of_unknown_format(tmp_path):
    manifest = tmp_path / "queries.txt"
    manifest.write_text("image,category\na.jpg,cat\n")
    with pytest.raises(InputError, match=re.escape(f"manifest {manifest}: unknown format")):
        list_manifest(str(manifest), str(tmp_path))


# ------------------------------------------------------------------------------------ --shards
def test_shards_matching_no_file(synthetic6, tmp_path):
    glob = os.path.join(synthetic6["root"], "shards", "*.tar")  # the folder holds Parquet only
    with pytest.raises(NoQueries, match=re.escape(f"--shards {glob} lists no query: no Parquet or WebDataset")):
        list_shards(glob)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoQueries, match="no Parquet or WebDataset"):
        list_shards(str(tmp_path / "empty") + "/")


def test_shards_without_categories_ask_for_them(tmp_path):
    shard = tmp_path / "shards" / "s0.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.table({"key": ["k0", "k1"], "jpg": [b"x", b"y"]}), shard)
    with pytest.raises(NoQueries) as e:
        list_shards(str(shard.parent) + "/")
    msg = str(e.value)
    assert msg.startswith(f"--shards {shard.parent}/ lists no query: none of its 2 image(s) in 1 shard file(s)")
    assert "pass --categories a,b" in msg
    # ... and with them, one query per image
    assert [q["query_id"] for q in list_shards(str(shard), categories=["dog"])] == ["k0:dog", "k1:dog"]

    pq.write_table(pa.table({"key": pa.array([], pa.string())}), shard)
    with pytest.raises(NoQueries, match="its 1 shard file\\(s\\) hold no image"):
        list_shards(str(shard))


@pytest.mark.parametrize("categories, why", [
    ([], "--categories names no category"),
    (["red circle", " "], "--categories 'red circle, ': category ' ': empty query text"),
])
def test_empty_categories_are_refused(synthetic6, categories, why):
    with pytest.raises(InputError) as e:
        list_shards(os.path.join(synthetic6["root"], "shards") + "/", categories=categories)
    assert str(e.value).startswith(why)


# ------------------------------------------------------------------------------------ images root
def test_images_root_under_which_no_image_exists(synthetic6, tmp_path):
    from pipeline.label import check_images_found

    wrong = os.path.join(synthetic6["root"], "images")  # file names already start with images/
    queries = list_coco(synthetic6["ann"], wrong)
    with pytest.raises(InputError) as e:
        check_images_found(queries, wrong)
    first = os.path.join(wrong, "images", "shapes-test-000000.jpg")
    assert str(e.value) == (f"none of the first 8 images exists under --images {wrong}, e.g. {first}; "
                            "is --images the folder the file names are relative to?")
    check_images_found(list_coco(synthetic6["ann"], synthetic6["root"]), synthetic6["root"])  # the right root
    one_missing = list_coco(synthetic6["ann"], synthetic6["root"])
    one_missing[0]["image_uri"] += ".gone"  # a single missing image stays a row (image_error)
    check_images_found(one_missing, synthetic6["root"])
    manifest_paths = [dict(q, image_uri="images/" + os.path.basename(q["image_uri"])) for q in queries]
    with pytest.raises(InputError, match="none of the first 8 images the manifest names exists, e.g. images/"):
        check_images_found(manifest_paths, None)  # relative paths, no --images


# ------------------------------------------------------------------------------------ the job
def test_job_exits_2_with_one_line_naming_the_file(synthetic6, tmp_path, capsys):
    """`acs label --coco summary.json`: exit 2, one line, no traceback, and no configuration record
    left in the output (which would refuse the corrected command as "another configuration")."""
    from jobs.label import main

    summary = os.path.join(synthetic6["root"], "summary.json")
    out = tmp_path / "out"
    rc = main(["--coco", summary, "--images", synthetic6["root"], "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(f"acs label: {summary} is not a COCO annotation file")
    assert "Traceback" not in err
    assert not (out / "_config.json").exists()


def test_job_shards_inputs_exit_2(synthetic6, tmp_path, capsys):
    from jobs.label import main

    folder = os.path.join(synthetic6["root"], "shards") + "/"
    rc = main(["--shards", folder, "--categories", " ,", "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("acs label: --categories names no category")

    glob = os.path.join(synthetic6["root"], "shards", "*.tar")
    rc = main(["--shards", glob, "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"acs label: --shards {glob} lists no query: no Parquet or WebDataset (.tar) shard")


def test_job_wrong_images_root_exits_2(synthetic6, tmp_path, capsys):
    from jobs.label import main

    wrong = os.path.join(synthetic6["root"], "images")
    rc = main(["--coco", synthetic6["ann"], "--images", wrong, "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"acs label: none of the first 8 images exists under --images {wrong}")
    assert not (tmp_path / "out" / "_config.json").exists()


def test_finished_output_reruns_even_when_its_images_are_gone(synthetic6, tmp_path, capsys):
    """The checks above look at what a run would do, never at an output that is already complete:
    a rerun of a finished run skips every shard and exits 0, even with its images moved away. The
    finished output is written by hand (markers and the configuration record, as the job writes
    them), so no Ray is needed; a run with pending work would be refused for the missing images."""
    from jobs.label import main
    from pipeline.assets import default_paths
    from pipeline.label import CONFIG_RECORD, _list, resolve_selector, result_config, run_label
    from pipeline.storage import Output

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(synthetic6["ann"], data / "annotations.json")  # no images beside it
    out = str(tmp_path / "out")
    cfg = label_config(output=out, coco=str(data / "annotations.json"), images=str(data), shard_size=8)
    with pytest.raises(InputError, match="none of the first 8 images exists"):
        run_label(cfg)

    queries, _ = _list(cfg)
    profile, regressor = default_paths(cfg.model, cfg.profile, cfg.regressor)
    o = Output(out)
    o.write_json(result_config(cfg, resolve_selector(cfg, regressor), profile, regressor), CONFIG_RECORD)
    shards = sorted({q["shard_id"] for q in queries})
    for s in shards:
        o.write_json({"shard_id": s, "queries": sum(q["shard_id"] == s for q in queries)}, "_shards", f"{s}.json")

    c = run_label(cfg)["counters"]
    assert (c["queries"], c["shards"], c["shards_skipped"], c["queries_pending"], c["shards_written"]) == \
        (21, 3, 3, 0, 0)
    rc = main(["--coco", cfg.coco, "--images", cfg.images, "--output", out, "--shard-size", "8",
               "--num-candidates", str(cfg.num_candidates), "--batch-size", str(cfg.batch_size), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "21 queries in 3 shard(s) (3 already done, 0 written)" in capsys.readouterr().out


def test_evaluate_with_a_non_coco_gt_exits_2_naming_the_file(tmp_path, capsys):
    import json

    from jobs.evaluate import main

    bad = tmp_path / "summary.json"
    bad.write_text(json.dumps({"n_images": 3, "geometry": {}}))
    assert main([str(tmp_path / "run"), "--gt", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("acs evaluate: ") and "summary.json is not a COCO annotation file" in err
