"""Labelling from and to S3 (moto's server on 127.0.0.1): inputs listed and images read by Ray
workers through s3fs with the storage options carried in the config; outputs read back; a rerun of
the same CLI command skips everything; credentials never reach the run JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from _label_helpers import K, N, TINY_TOKENS, assert_exactly_once, label_config

BUCKET = "acs-test"
KEY = "testing"
SECRET = "testing-secret-4f1c9e"  # distinctive: searched for in every text the runs leave behind


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3
    from moto.server import ThreadedMotoServer

    env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                  aws_access_key_id=KEY, aws_secret_access_key=SECRET)
            client.create_bucket(Bucket=BUCKET)
            yield {"endpoint": endpoint, "client": client,
                   "storage_options": {"endpoint_url": endpoint, "key": KEY, "secret": SECRET}}
        finally:
            server.stop()


@pytest.fixture(scope="module")
def s3_data(s3, tmp_path_factory):
    """make_synthetic(n=3) uploaded to s3://BUCKET/data/ (annotations.json, images/, shards/)."""
    from pipeline.inputs import dedupe, list_coco
    from pipeline.organism.scenes import make_synthetic

    root = tmp_path_factory.mktemp("s3-synthetic")
    summary = make_synthetic(str(root), "shapes", "test", n=3, seed=0)
    uploaded = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and (rel == "annotations.json" or rel.startswith(("images/", "shards/"))):
            s3["client"].upload_file(str(p), BUCKET, f"data/{rel}")
            uploaded.append(rel)
    assert "shards/shard-00000.parquet" in uploaded and sum(u.startswith("images/") for u in uploaded) == 3
    ids = {q["query_id"] for q in dedupe(list_coco(str(root / "annotations.json"), str(root)))}
    assert len(ids) == summary["n_queries"]
    return {"root": root, "summary": summary, "query_ids": ids,
            "coco": f"s3://{BUCKET}/data/annotations.json", "images": f"s3://{BUCKET}/data"}


def _download(s3, prefix: str, dest: Path) -> list[str]:
    keys = []
    for page in s3["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) + 1:]
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            s3["client"].download_file(BUCKET, obj["Key"], str(dest / rel))
            keys.append(rel)
    return sorted(keys)


def _run_json_text(s3, prefix: str, run_id: str) -> str:
    return s3["client"].get_object(Bucket=BUCKET, Key=f"{prefix}/_runs/{run_id}.json")["Body"].read().decode()


def _assert_no_secrets(text: str, s3) -> None:
    assert SECRET not in text and "testing" not in text
    assert s3["endpoint"] not in text


@pytest.fixture(scope="module")
def coco_run(ray_session, s3, s3_data, tiny_model_dir):
    from pipeline.label import run_label

    out = f"s3://{BUCKET}/out"
    cfg = label_config(output=out, coco=s3_data["coco"], images=s3_data["images"], model=str(tiny_model_dir),
                       max_new_tokens=TINY_TOKENS, shard_size=4, storage_options=dict(s3["storage_options"]))
    return {"out": out, "summary": run_label(cfg), "cfg": cfg}


def test_s3_coco_run_tables_read_back(coco_run, s3, s3_data, tmp_path):
    import duckdb
    import polars as pl

    from pipeline.evaluate import load_tables

    n = len(s3_data["query_ids"])
    c = coco_run["summary"]["counters"]
    assert n == 10 and c["queries"] == n and c["shards"] == 3 and c["shards_written"] == 3 and c["shards_skipped"] == 0
    # image bytes were read from S3 by the Ray workers: every image decoded (the random model finds no box)
    assert c["status"] == {"no_box": n}
    boxes, cands = load_tables(coco_run["out"], s3["storage_options"])
    assert boxes.height == n and cands.height == n * K
    assert set(boxes["query_id"].to_list()) == s3_data["query_ids"]
    assert set(boxes["image_uri"].to_list()) == {f"s3://{BUCKET}/data/images/shapes-test-{i:06d}.jpg" for i in range(3)}
    # the same tables, downloaded, through polars and DuckDB
    local = tmp_path / "out"
    keys = _download(s3, "out", local)
    shards = sorted(k[len("_shards/"):-5] for k in keys if k.startswith("_shards/"))
    assert len(shards) == 3
    for t in ("boxes", "candidates", "attention"):
        assert sorted(k for k in keys if k.startswith(t + "/")) == [f"{t}/{s}.parquet" for s in shards]
    assert_exactly_once(local, s3_data["query_ids"], K)
    assert pl.read_parquet(f"{local}/boxes/*.parquet").height == n
    assert dict(pl.read_parquet(f"{local}/boxes/*.parquet").group_by("status").len().iter_rows()) == {"no_box": n}
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{local}/candidates/*.parquet')").fetchall()[0][0] == n * K
    assert duckdb.sql(f"SELECT count(DISTINCT query_id) FROM read_parquet('{local}/boxes/*.parquet')").fetchall()[0][0] == n


def test_s3_run_json_has_no_credentials(coco_run, s3):
    run_id = coco_run["summary"]["run_id"]
    text = _run_json_text(s3, "out", run_id)
    _assert_no_secrets(text, s3)
    j = json.loads(text)
    assert j["config"]["storage_options"] == {"endpoint_url": "***", "key": "***", "secret": "***"}
    assert j["counters"] == coco_run["summary"]["counters"]
    # the summary returned to the caller is the same masked document
    assert j["config"] == coco_run["summary"]["config"]
    assert coco_run["cfg"].storage_options["secret"] == SECRET  # the live config still works


def test_s3_rerun_same_cli_command_skips_everything(coco_run, s3, s3_data, tiny_model_dir, tmp_path):
    """`python -m jobs.label` with the same input/output: every shard is skipped, nothing rewritten."""
    argv = [sys.executable, "-m", "jobs.label", "--coco", s3_data["coco"], "--images", s3_data["images"],
            "--output", coco_run["out"], "--model", str(tiny_model_dir), "--num-candidates", str(N),
            "--max-new-tokens", str(TINY_TOKENS), "--shard-size", "4", "--no-progress", "--run-id", "rerun-cli",
            "--storage-option", f"endpoint_url={s3['endpoint']}",
            "--storage-option", f"key={KEY}", "--storage-option", f"secret={SECRET}"]
    before = {o["Key"]: o["ETag"] for o in s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="out/")["Contents"]}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=str(tmp_path),
                       env=dict(os.environ, RAY_ADDRESS=""))
    assert r.returncode == 0, r.stderr[-3000:]
    assert SECRET not in r.stdout + r.stderr
    n = len(s3_data["query_ids"])
    assert f"run rerun-cli: {n} queries in 3 shard(s) (3 already done, 0 written)" in r.stdout
    text = _run_json_text(s3, "out", "rerun-cli")
    _assert_no_secrets(text, s3)
    j = json.loads(text)
    assert j["counters"]["shards_written"] == 0 and j["counters"]["shards_skipped"] == 3
    assert j["counters"]["queries_pending"] == 0 and j["counters"]["queries"] == n
    after = {o["Key"]: o["ETag"] for o in s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="out/")["Contents"]}
    assert set(after) - set(before) == {"out/_runs/rerun-cli.json"}
    assert {k: v for k, v in after.items() if k in before} == before  # nothing rewritten
    local = tmp_path / "out"
    _download(s3, "out", local)
    assert_exactly_once(local, s3_data["query_ids"], K)




def test_s3_in_process_rerun_recomputes_a_deleted_marker(coco_run, s3, s3_data, tiny_model_dir, tmp_path):
    """A notebook-style session: run (all done), a marker disappears (deleted by another client), run again."""
    from pipeline.label import run_label

    def run():
        return run_label(label_config(output=coco_run["out"], coco=s3_data["coco"], images=s3_data["images"],
                                      model=str(tiny_model_dir), max_new_tokens=TINY_TOKENS, shard_size=4,
                                      storage_options=dict(s3["storage_options"])))

    again = run()["counters"]
    assert again["shards_written"] == 0 and again["shards_skipped"] == 3
    keys = sorted(o["Key"] for o in s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="out/_shards/")["Contents"])
    assert len(keys) == 3
    s3["client"].delete_object(Bucket=BUCKET, Key=keys[1])
    c = run()["counters"]
    local = tmp_path / "out"
    _download(s3, "out", local)
    assert_exactly_once(local, s3_data["query_ids"], K)  # holds either way: files are overwritten by name
    assert (c["shards_written"], c["shards_skipped"]) == (1, 2), c


def test_s3_shards_folder_input(ray_session, s3, s3_data, tiny_model_dir):
    from pipeline.label import run_label

    summary = run_label(label_config(output=f"s3://{BUCKET}/out-shards-folder", shards=f"s3://{BUCKET}/data/shards/",
                                     model=str(tiny_model_dir), max_new_tokens=TINY_TOKENS,
                                     storage_options=dict(s3["storage_options"])))
    assert summary["counters"]["queries"] == len(s3_data["query_ids"])


def test_s3_shards_glob_input(ray_session, s3, s3_data, tiny_model_dir):
    from pipeline.evaluate import load_tables
    from pipeline.label import run_label

    out = f"s3://{BUCKET}/out-shards"
    summary = run_label(label_config(output=out, shards=f"s3://{BUCKET}/data/shards/*.parquet",
                                     model=str(tiny_model_dir), max_new_tokens=TINY_TOKENS,
                                     storage_options=dict(s3["storage_options"])))
    n = len(s3_data["query_ids"])
    c = summary["counters"]
    assert c["queries"] == n and c["shards_written"] == c["shards"] == 1
    assert c["status"] == {"no_box": n}  # bytes read out of the S3 Parquet shard by the workers
    boxes, cands = load_tables(out, s3["storage_options"])
    assert boxes.height == n and cands.height == n * K and boxes["query_id"].n_unique() == n
    assert Counter(boxes["image_id"].to_list()) == Counter(q.split(":")[0] for q in s3_data["query_ids"])
    assert all(u.startswith(f"s3://{BUCKET}/data/shards/shard-00000.parquet#") for u in boxes["image_uri"].to_list())
    _assert_no_secrets(_run_json_text(s3, "out-shards", summary["run_id"]), s3)


def test_s3_secret_not_in_ray_session_logs(coco_run, ray_session):
    """Storage options travel to the workers inside the task arguments: never in Ray's logs."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # private API: this session's logs
    assert logs.is_dir()
    leaked = [str(p) for p in logs.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked


def test_s3_no_secret_in_any_output_object(coco_run, s3):
    """Every object the run wrote (Parquet tables with their schema and key-value metadata, shard
    markers, run JSON), scanned as bytes: neither the secret, the key nor the endpoint appears."""
    import pyarrow.parquet as pq

    objs = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="out/")["Contents"]
    keys = [o["Key"] for o in objs]
    assert any(k.endswith(".parquet") for k in keys) and any("/_shards/" in k for k in keys)
    for k in keys:
        body = s3["client"].get_object(Bucket=BUCKET, Key=k)["Body"].read()
        assert SECRET.encode() not in body and KEY.encode() not in body, k
        assert s3["endpoint"].encode() not in body, k
        if k.endswith(".parquet"):
            import io

            md = pq.ParquetFile(io.BytesIO(body)).metadata.metadata or {}
            assert all(SECRET.encode() not in v and b"storage_options" not in v for v in md.values()), k
