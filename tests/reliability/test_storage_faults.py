"""Storage faults without Ray: the job's readers (listings, image files, Parquet image shards) and
its writer (`pipeline.storage.Output`) against S3 behind a proxy that answers 503 or stalls.

Reads and writes must come back correct after transient faults, and the proxy must have injected
exactly the faults the test asked for (so no test passes because no fault happened). When the
retries run out, the error names the path, the number of attempts and the cause.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from _faultproxy import BUCKET, storage_options

RETRIES, BACKOFF = 3, 0.02  # short backoff: these tests measure behaviour, not patience


def _batch(queries: list[dict]) -> dict:
    """The listing rows as the numpy batch Ray Data hands to `load_images`."""
    from pipeline.stages import META_COLUMNS

    return {c: np.array([q.get(c) for q in queries], dtype=object) for c in META_COLUMNS}


def _local_pixels(root, uri: str) -> np.ndarray:
    from pipeline.images import decode_image

    rel = uri.split("/data/", 1)[1]
    return np.asarray(decode_image((root / rel).read_bytes(), rel))


def _get(s3, key: str) -> bytes:
    return s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.mark.timeout(120)
def test_reads_retried_listing_and_image_files(s3, s3_data, proxy, monkeypatch):
    """COCO listing and per-file image reads survive 503s on GET and HEAD and a stalled GET;
    every image decodes to exactly the bytes uploaded."""
    from pipeline.label import LabelConfig, _list
    from pipeline.stages import load_images

    so = storage_options(proxy.endpoint, read_timeout=0.5)
    cfg = LabelConfig(output="unused", coco=s3_data["coco"], images=s3_data["images"], storage_options=so,
                      io_retries=RETRIES, io_backoff=BACKOFF)

    proxy.fail("GET", r"/data/annotations\.json", first=2)
    queries, _ = _list(cfg)
    assert len(queries) == s3_data["summary"]["n_queries"] == 10
    assert proxy.count("503", "GET", r"annotations\.json") == 2
    assert proxy.seen("GET", r"annotations\.json") == 3  # two faults, then the read that counted

    # s3fs retries a timed-out request by itself (5 x 5 attempts for a read): with that switched
    # off, the stall below reaches the pipeline's retry, which reopens the file.
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    img = [f"/data/images/shapes-test-{i:06d}\\.jpg" for i in range(3)]
    proxy.reset()
    proxy.fail("GET", img[0], first=2)
    proxy.fail("HEAD", img[1], first=1)
    proxy.stall("GET", img[2], 1.5, first=1)  # held past the 0.5 s read timeout
    out = load_images(_batch(queries), so, io_retries=RETRIES, io_backoff=BACKOFF)

    assert list(out["load_status"]) == ["ok"] * len(queries), list(out["load_error"])
    for q, px in zip(queries, out["pixels"]):
        np.testing.assert_array_equal(px, _local_pixels(s3_data["root"], q["image_uri"]))
    assert proxy.count("503", "GET", img[0]) == 2
    assert proxy.count("503", "HEAD", img[1]) == 1
    assert proxy.count("stall", "GET", img[2]) == 1
    assert proxy.count() == 4
    n_img2 = sum(q["image_uri"].endswith("shapes-test-000002.jpg") for q in queries)
    assert proxy.seen("HEAD", img[2]) >= n_img2 + 1  # the stalled read was retried by reopening the file


@pytest.mark.timeout(120)
def test_reads_retried_parquet_shards(s3, s3_data, proxy):
    """Shard input: the folder listing and the Parquet footer/column reads survive 503s, on the
    driver (listing) and in the CPU stage (image bytes out of the shard)."""
    from pipeline.images import decode_image
    from pipeline.label import LabelConfig, _list
    from pipeline.stages import load_images

    so = storage_options(proxy.endpoint)
    cfg = LabelConfig(output="unused", shards=s3_data["shards"], storage_options=so,
                      io_retries=RETRIES, io_backoff=BACKOFF)
    proxy.fail("GET", r"list-type=2", first=2)
    proxy.fail("GET", r"/data/shards/shard-00000\.parquet", first=1)
    queries, _ = _list(cfg)
    assert len(queries) == 10 and {q["shard_file"] for q in queries} == {f"s3://{BUCKET}/data/shards/shard-00000.parquet"}
    assert proxy.count("503", "GET", "list-type=2") == 2
    assert proxy.count("503", "GET", r"shard-00000\.parquet") == 1

    proxy.reset()
    proxy.fail("GET", r"/data/shards/shard-00000\.parquet", first=2)
    out = load_images(_batch(queries), so, io_retries=RETRIES, io_backoff=BACKOFF)
    assert list(out["load_status"]) == ["ok"] * len(queries), list(out["load_error"])
    assert proxy.count("503", "GET", r"shard-00000\.parquet") == 2

    local = pq.read_table(s3_data["root"] / "shards" / "shard-00000.parquet")
    col = next(c for c in ("jpg", "png", "webp", "image") if c in local.column_names)
    for q, px in zip(queries, out["pixels"]):
        np.testing.assert_array_equal(px, np.asarray(decode_image(local[col][q["row_index"]].as_py())))


@pytest.mark.timeout(120)
def test_reads_retried_webdataset_tar(s3, s3_data, proxy):
    """WebDataset input: listing and the streaming pass over the tar survive 503s; a retried pass
    starts again from the first member and still yields each image once, byte-identical."""
    import tarfile

    from pipeline.label import LabelConfig, _list
    from pipeline.stages import load_images

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            for name, data in ((f"s{i}.jpg", (s3_data["root"] / "images" / f"shapes-test-{i:06d}.jpg").read_bytes()),
                               (f"s{i}.json", json.dumps({"categories": ["red circle"]}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    s3["client"].put_object(Bucket=BUCKET, Key="data/tar/part-0.tar", Body=buf.getvalue())

    so = storage_options(proxy.endpoint)
    cfg = LabelConfig(output="unused", shards=f"s3://{BUCKET}/data/tar/", storage_options=so,
                      io_retries=RETRIES, io_backoff=BACKOFF)
    proxy.fail("GET", r"/data/tar/part-0\.tar", first=1)
    queries, _ = _list(cfg)
    assert [q["shard_member"] for q in queries] == ["s0.jpg", "s1.jpg", "s2.jpg"]
    assert proxy.count("503", "GET", r"part-0\.tar") == 1

    proxy.reset()
    proxy.fail("GET", r"/data/tar/part-0\.tar", first=2)  # two passes fail, the third reads all
    out = load_images(_batch(queries), so, io_retries=RETRIES, io_backoff=BACKOFF)
    assert list(out["load_status"]) == ["ok"] * 3, list(out["load_error"])
    for i, px in enumerate(out["pixels"]):
        np.testing.assert_array_equal(px, _local_pixels(s3_data["root"], f"s3://{BUCKET}/data/images/shapes-test-{i:06d}.jpg"))
    assert proxy.count("503", "GET", r"part-0\.tar") == 2


@pytest.mark.timeout(120)
def test_reads_exhausted_are_storage_faults_not_image_errors(s3, s3_data, proxy):
    """A read that still fails after the retries is marked as a storage fault (the driver then
    fails its shard, see test_label_faults.py), never as a broken image; a missing file stays an
    `image_error` and is not retried."""
    from pipeline.stages import STORAGE_FAULT, load_images

    so = storage_options(proxy.endpoint)
    bad = f"s3://{BUCKET}/data/images/shapes-test-000001.jpg"
    missing = f"s3://{BUCKET}/data/images/no-such-image.jpg"
    good = f"s3://{BUCKET}/data/images/shapes-test-000000.jpg"
    proxy.fail("GET", r"shapes-test-000001\.jpg")  # always
    rows = [{"query_id": f"q{i}", "image_uri": u, "category": "red circle"} for i, u in enumerate((bad, missing, good))]
    out = load_images(_batch(rows), so, io_retries=2, io_backoff=BACKOFF)
    assert list(out["load_status"]) == [STORAGE_FAULT, "image_error", "ok"]
    err = out["load_error"][0]
    assert f"read {bad}: failed after 3 attempt(s)" in err and "Please try again" in err
    assert "file not found" in out["load_error"][1]
    assert proxy.count("503", "GET", r"shapes-test-000001") == 3
    assert proxy.seen("HEAD", r"no-such-image") == 1  # a missing file is not retried


def _tables(shard: str) -> dict[str, pa.Table]:
    n = {"s-a": 3, "s-b": 2}[shard]
    return {"boxes": pa.table({"query_id": [f"{shard}-q{i}" for i in range(n)], "x1": [float(i) for i in range(n)]}),
            "candidates": pa.table({"query_id": [f"{shard}-q{i // 3}" for i in range(3 * n)],
                                    "cand_idx": [i % 3 for i in range(3 * n)]}),
            "attention": pa.table({"query_id": [f"{shard}-q{i}" for i in range(n)],
                                   "entropy": [[0.5 * i, 1.0] for i in range(n)]})}


@pytest.mark.timeout(120)
def test_writes_retried(s3, proxy):
    """Parquet tables and shard markers written through `Output` survive 503s on PUT, the marker
    listing survives 503s on GET and `exists` a 503 on HEAD; every object reads back equal."""
    import polars as pl

    from pipeline.storage import Output

    out = Output(f"s3://{BUCKET}/w", storage_options(proxy.endpoint), retries=RETRIES, backoff=BACKOFF)
    proxy.fail("PUT", r"/w/boxes/", first=2)
    proxy.fail("PUT", r"/w/(candidates|attention)/", every=2)
    proxy.fail("PUT", r"/w/_shards/", first=1)
    written = {}
    for shard in ("s-a", "s-b"):
        for name, table in _tables(shard).items():
            out.write_table(table, name, f"{shard}.parquet")
            written[f"w/{name}/{shard}.parquet"] = table
        marker = {"shard_id": shard, "queries": written[f"w/boxes/{shard}.parquet"].num_rows}
        out.write_json(marker, "_shards", f"{shard}.json")
        written[f"w/_shards/{shard}.json"] = marker
    # 2 on boxes, 3 on candidates/attention (matches 2, 4 and 6 of their 7 PUTs), 1 on the markers
    assert proxy.count("503", "PUT") == 6
    assert proxy.seen("PUT") == len(written) + 6

    proxy.reset()
    proxy.fail("GET", r"list-type=2", first=2)
    proxy.fail("HEAD", r"/w/boxes/s-b\.parquet", first=1)
    assert out.done_shards() == {"s-a", "s-b"}
    assert out.exists("boxes", "s-b.parquet")
    assert proxy.count("503") == 3

    keys = {o["Key"] for o in s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="w/")["Contents"]}
    assert keys == set(written)  # nothing else (no temporary names, no duplicates)
    for key, expected in written.items():
        data = _get(s3, key)
        if key.endswith(".json"):
            assert json.loads(data) == expected
        else:
            assert pq.read_table(io.BytesIO(data)).equals(expected)
            assert pl.read_parquet(io.BytesIO(data)).equals(pl.from_arrow(expected))


@pytest.mark.timeout(120)
def test_write_retries_exhausted_names_path_and_cause(s3, proxy):
    from pipeline.storage import Output, StorageError

    out = Output(f"s3://{BUCKET}/w-fail", storage_options(proxy.endpoint), retries=2, backoff=BACKOFF)
    proxy.fail("PUT", r"/w-fail/boxes/s-x\.parquet")  # always
    with pytest.raises(StorageError) as e:
        out.write_table(_tables("s-a")["boxes"], "boxes", "s-x.parquet")
    msg = str(e.value)
    assert msg.startswith(f"write s3://{BUCKET}/w-fail/boxes/s-x.parquet: failed after 3 attempt(s): ")
    assert "Please try again (injected by the test proxy)" in msg
    assert proxy.count("503", "PUT") == 3 == proxy.seen("PUT")
    assert "Contents" not in s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="w-fail/")
