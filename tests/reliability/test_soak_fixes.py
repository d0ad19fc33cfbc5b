"""What the soak (`python -m benchmarks.soak`, docs/reliability.md) found, each at small scale.

* Local Ray instances stay on 127.0.0.1. Ray maps an explicit loopback node address to the
  machine's outward one, so the test session's instance and the one `acs label` / `make demo`
  start registered (and talked over) eth0; `pipeline.label.init_ray` keeps them on loopback.
  On a machine whose only address is loopback these tests pass either way.
* Listing Parquet image shards on S3 read the image bytes too: s3fs's 50 MB read-ahead from the
  metadata columns' offsets fetched whole shards, so every listing (every resume) read the data
  set. `list_shards` now fetches only the ranges it reads.
* The decoding stage re-read a shard's whole image column for every batch (a batch needs a few
  rows; a column chunk is read whole): per query the shard's bytes / batch size. It now keeps
  the last shard's column for the next batches of the same run.

S3 is moto on 127.0.0.1 behind the recording proxy of this folder (conftest.py, _faultproxy.py).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from _faultproxy import BUCKET
from test_storage_faults import _batch

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ loopback
def test_session_instance_is_on_loopback(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    def worker_ip() -> str:
        import ray

        return ray.util.get_node_ip_address()

    assert [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]] == ["127.0.0.1"]
    assert ray.get(worker_ip.remote()) == "127.0.0.1"


# A fresh process: the instance `run_label` starts when no cluster is named (`acs label`, make demo).
LOCAL_INSTANCE = r"""
import json, ray
from pipeline.label import init_ray
init_ray(None, num_cpus=1, include_dashboard=False, log_to_driver=False)

@ray.remote(num_cpus=0)
def worker_ip():
    import ray
    return ray.util.get_node_ip_address()

print("NODES" + json.dumps({"nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
                            "gcs": ray.get_runtime_context().gcs_address, "worker": ray.get(worker_ip.remote())}))
ray.shutdown()
"""


def test_local_instance_of_the_job_is_on_loopback():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", LOCAL_INSTANCE], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=180)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("NODES")]
    assert lines, f"{r.returncode}\n{r.stderr[-3000:]}"
    got = json.loads(lines[-1][len("NODES"):])
    assert got["nodes"] == ["127.0.0.1"] and got["worker"] == "127.0.0.1"
    assert got["gcs"].startswith("127.0.0.1:")


# ------------------------------------------------------------------------------------ listing
def test_listing_parquet_shards_reads_metadata_not_images(s3, proxy, monkeypatch):
    """A shard of 4 images of 1 MB each: listing it fetches its footer and metadata columns only."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    from pipeline.inputs import list_shards
    from pipeline.organism.scenes import SHARD_SCHEMA

    rng = np.random.default_rng(0)
    rows = [{"key": f"big-{i}", "image_id": i, "file_name": f"big-{i}.jpg", "jpg": rng.bytes(2 ** 20),
             "width": 64, "height": 64, "categories": ["red circle", "blue square"]} for i in range(4)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), buf)  # uncompressible: ~4 MB on S3
    size = len(buf.getvalue())
    s3["client"].put_object(Bucket=BUCKET, Key="big/shard-00000.parquet", Body=buf.getvalue())

    fetched = []  # bytes s3fs fetched, per ranged GET (a spy: the real read runs)
    fetch = s3fs.core.S3File._fetch_range

    def counted(self, start, end):
        data = fetch(self, start, end)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted)
    queries = list_shards(f"s3://{BUCKET}/big/", s3["storage_options"])
    assert sorted(q["query_id"] for q in queries) == sorted(f"big-{i}:{c}" for i in range(4)
                                                             for c in ("red circle", "blue square"))
    assert size > 4 * 2 ** 20 and proxy.seen("GET", r"/big/shard-00000\.parquet") >= 1
    # pyarrow's footer read (64 kB) and the small columns; before the fix the whole shard, 4 MB
    assert 0 < sum(fetched) < 200_000, (sum(fetched), size)


# ------------------------------------------------------------------------------------ decoding
def test_decoding_reads_a_shard_once_per_run(s3, s3_data, proxy):
    """Three batches of one Parquet shard in one process: the run's first batch reads the shard,
    the next two reuse its image column; another run reads it again. Pixels as without it."""
    from pipeline.inputs import list_shards
    from pipeline.stages import load_images

    so = s3["storage_options"]
    queries = list_shards(s3_data["shards"], so)
    assert len(queries) >= 3 and len({q["shard_file"] for q in queries}) == 1
    shard_gets = r"/data/shards/shard-00000\.parquet"
    batches = [queries[i::3] for i in range(3)]

    plain = [load_images(_batch(b), so) for b in batches]  # no run key: every batch reads
    assert proxy.seen("GET", shard_gets) >= 3
    for run in ("run-a", "run-b"):
        before = proxy.seen("GET", shard_gets)
        first = load_images(_batch(batches[0]), so, cache_key=run)
        after_first = proxy.seen("GET", shard_gets)
        rest = [load_images(_batch(b), so, cache_key=run) for b in batches[1:]]
        assert after_first > before, "each run reads the shard itself"
        assert proxy.seen("GET", shard_gets) == after_first, "later batches of the run re-read the shard"
        for got, want in zip([first, *rest], plain):
            assert list(got["load_status"]) == ["ok"] * len(want["load_status"])
            assert all(np.array_equal(a, b) for a, b in zip(got["pixels"], want["pixels"]))
