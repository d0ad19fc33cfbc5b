"""The labelling job (`run_label`, on the session's Ray) against S3 behind the fault proxy: one
shard whose output PUTs always fail and one whose image GETs always fail, next to a shard that
gets only transient faults. The run completes the healthy shard, fails the other two with their
paths and causes, and records them in the run JSON; the same command again, faults off, writes
exactly those two, skips the finished one, and every query is in the tables exactly once."""

from __future__ import annotations

import io
import json
from collections import Counter

import polars as pl
import pytest

from _faultproxy import BUCKET, storage_options

N_CAND = 2  # sampled candidates; greedy on top
K = N_CAND + 1
OUT = "out-faults"


def _objects(s3, prefix: str) -> dict[str, str]:
    resp = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1:]: o["ETag"] for o in resp.get("Contents", [])}


def _table(s3, prefix: str, name: str) -> pl.DataFrame:
    keys = sorted(k for k in _objects(s3, prefix) if k.startswith(name + "/"))
    return pl.concat([pl.read_parquet(io.BytesIO(s3["client"].get_object(Bucket=BUCKET, Key=f"{prefix}/{k}")["Body"].read()))
                      for k in keys], how="diagonal_relaxed")


@pytest.mark.timeout(300)
def test_label_run_fails_per_shard_and_rerun_completes(ray_session, s3, s3_data, proxy, tiny_model_dir):
    from pipeline.label import LabelConfig, ShardsFailed, _list, run_label

    def cfg(run_id: str) -> LabelConfig:  # "the same command": only the run id differs
        return LabelConfig(output=f"s3://{BUCKET}/{OUT}", coco=s3_data["coco"], images=s3_data["images"],
                           model=str(tiny_model_dir), num_candidates=N_CAND, max_new_tokens=12, batch_size=4,
                           shard_size=4, progress=False, storage_options=storage_options(proxy.endpoint),
                           io_retries=2, io_backoff=0.02, run_id=run_id)

    queries, _ = _list(cfg("probe"))
    ids = {q["query_id"] for q in queries}
    shard_of = {q["query_id"]: q["shard_id"] for q in queries}
    shards = sorted(set(shard_of.values()))
    assert len(queries) == 10 and len(shards) == 3
    ok_shard, write_shard, read_shard = shards
    images = {s: {q["image_uri"] for q in queries if q["shard_id"] == s} for s in shards}
    # an image only the read-fault shard uses; a flaky one the healthy shard uses
    bad_image = sorted(images[read_shard] - images[ok_shard] - images[write_shard])[0]
    flaky_image = sorted(images[ok_shard] - images[read_shard])[0]
    bad_reads = sum(q["image_uri"] == bad_image for q in queries)
    key = lambda uri: uri.split(f"{BUCKET}/", 1)[1].replace(".", r"\.")  # noqa: E731

    proxy.fail("PUT", rf"/{OUT}/boxes/{write_shard}\.parquet")          # always: retries run out
    proxy.fail("GET", key(bad_image))                                   # always: retries run out
    proxy.fail("GET", key(flaky_image), first=1)                        # transient: retried
    proxy.fail("PUT", rf"/{OUT}/candidates/{ok_shard}\.parquet", first=1)  # transient: retried
    with pytest.raises(ShardsFailed) as e:
        run_label(cfg("faulty"))

    err = e.value
    assert set(err.failed) == {write_shard, read_shard}
    assert err.failed[write_shard].startswith(
        f"write s3://{BUCKET}/{OUT}/boxes/{write_shard}.parquet: failed after 3 attempt(s): ")
    assert err.failed[read_shard].startswith(f"read {bad_image}: failed after 3 attempt(s): ")
    for cause in err.failed.values():
        assert "Please try again (injected by the test proxy)" in cause
    msg = str(err)
    assert msg.startswith("2 of 3 shard(s) failed") and "rerun the same command" in msg
    assert write_shard in msg and read_shard in msg
    c = err.summary["counters"]
    assert (c["shards"], c["shards_written"], c["shards_failed"], c["shards_skipped"]) == (3, 1, 2, 0)
    healthy = sum(s == ok_shard for s in shard_of.values())
    assert healthy == 4 and sum(c["status"].values()) == healthy and "storage_error" not in c["status"]  # the healthy shard only
    # exactly the faults asked for: 3 attempts per exhausted PUT and per read of the bad image
    assert proxy.count("503", "PUT", rf"boxes/{write_shard}") == 3
    assert proxy.count("503", "GET", key(bad_image)) == 3 * bad_reads
    assert proxy.count("503", "GET", key(flaky_image)) == 1
    assert proxy.count("503", "PUT", rf"candidates/{ok_shard}") == 1

    after_faulty = _objects(s3, OUT)
    assert set(after_faulty) == {f"{t}/{ok_shard}.parquet" for t in ("boxes", "candidates", "attention")} | {
        f"_shards/{ok_shard}.json", "_runs/faulty.json", "_config.json"}  # nothing of the failed shards
    run_json = json.loads(s3["client"].get_object(Bucket=BUCKET, Key=f"{OUT}/_runs/faulty.json")["Body"].read())
    assert run_json["failed_shards"] == err.failed and run_json["counters"] == c

    proxy.reset()  # faults off; the same command again
    summary = run_label(cfg("rerun"))
    c2 = summary["counters"]
    assert (c2["shards_written"], c2["shards_failed"], c2["shards_skipped"]) == (2, 0, 1)
    assert c2["queries_pending"] == sum(shard_of[q] != ok_shard for q in ids) == len(ids) - healthy
    assert sum(c2["status"].values()) == len(ids) - healthy and "storage_error" not in c2["status"]
    assert summary["failed_shards"] == {}
    assert proxy.count() == 0 and proxy.seen("PUT", rf"/{OUT}/\w+/{ok_shard}\.") == 0  # finished shard untouched

    final = _objects(s3, OUT)
    assert {k: v for k, v in final.items() if k in after_faulty} == after_faulty  # not rewritten
    assert set(final) == {f"{t}/{s}.parquet" for t in ("boxes", "candidates", "attention") for s in shards} | {
        f"_shards/{s}.json" for s in shards} | {"_runs/faulty.json", "_runs/rerun.json", "_config.json"}
    boxes, cands = _table(s3, OUT, "boxes"), _table(s3, OUT, "candidates")
    assert Counter(boxes["query_id"].to_list()) == Counter(ids)  # every query exactly once
    assert set(boxes["status"].to_list()) <= {"ok", "no_box"}
    assert {r["query_id"]: r["shard_id"] for r in boxes.select("query_id", "shard_id").to_dicts()} == shard_of
    pairs = Counter(zip(cands["query_id"].to_list(), cands["cand_idx"].to_list()))
    assert set(pairs) == {(q, i) for q in ids for i in range(K)} and set(pairs.values()) == {1}
