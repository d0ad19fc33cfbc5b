"""Fixtures of the Ray Data labelling tests: small datasets and labelled runs shared by
test_label / test_analytics (the session's one Ray instance, `ray_session`, is in tests/conftest.py).

Models come from tests/conftest.py (`tiny_model_dir`: random weights, every candidate `no_box`;
`parrot_model_dir`: always answers PARROT_BOX, so candidates are `ok`).

The helpers module is imported by name: pytest puts this directory on sys.path (no __init__.py).
"""

from __future__ import annotations

import os

import pytest

from _label_helpers import PARROT_BOX, PARROT_TOKENS, label_config, write_parrot_coco


@pytest.fixture(scope="session")
def synthetic6(tmp_path_factory):
    """make_synthetic(n=6): 6 JPEGs (336x252), annotations.json, shards/shard-00000.parquet; 21 queries."""
    from pipeline.inputs import dedupe, list_coco
    from pipeline.organism.scenes import make_synthetic

    root = tmp_path_factory.mktemp("synthetic6")
    summary = make_synthetic(str(root), "shapes", "test", n=6, seed=0)
    ann = os.path.join(root, "annotations.json")
    ids = [q["query_id"] for q in dedupe(list_coco(ann, str(root)))]
    assert len(ids) == summary["n_queries"] == len(set(ids))
    return {"root": str(root), "ann": ann, "summary": summary, "query_ids": ids}


@pytest.fixture(scope="session")
def parrot_data(tmp_path_factory, make_image, parrot_box):
    """Small images the parrot answers, plus `annotations_bad.json` = the same + bad inputs."""
    assert tuple(map(float, parrot_box)) == PARROT_BOX, "tests/conftest.py's parrot box changed"
    root = tmp_path_factory.mktemp("parrot-data")
    clean = write_parrot_coco(root, make_image, bad=False, name="annotations.json")
    bad = write_parrot_coco(root, make_image, bad=True, name="annotations_bad.json")
    return {"clean": clean, "bad": bad, "root": str(root)}


@pytest.fixture(scope="session")
def synthetic_run(ray_session, synthetic6, parrot_model_dir, tmp_path_factory):
    """The synthetic dataset labelled by the parrot (its 336x252 images are out of its training
    distribution: a mix of `ok` and `no_box`), 3 shards of <= 8 queries."""
    from pipeline.label import run_label

    out = tmp_path_factory.mktemp("synthetic-run") / "out"
    cfg = label_config(output=str(out), coco=synthetic6["ann"], images=synthetic6["root"],
                       model=str(parrot_model_dir), max_new_tokens=PARROT_TOKENS, shard_size=8)
    summary = run_label(cfg)
    return {"out": str(out), "summary": summary, "cfg": cfg, "query_ids": synthetic6["query_ids"]}


@pytest.fixture(scope="session")
def parrot_run(ray_session, parrot_data, parrot_model_dir, tmp_path_factory):
    """Parrot dataset + bad inputs in ONE shard: good queries `ok`, bad ones image/query errors."""
    from pipeline.label import run_label

    data = parrot_data["bad"]
    out = tmp_path_factory.mktemp("parrot-run") / "out"
    cfg = label_config(output=str(out), coco=data["ann"], images=data["root"], model=str(parrot_model_dir),
                       max_new_tokens=PARROT_TOKENS)
    summary = run_label(cfg)
    return {"out": str(out), "summary": summary, "cfg": cfg, "data": data,
            "query_ids": set(data["good"]) | set(data["bad"])}
