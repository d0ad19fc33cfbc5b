"""Fixtures of the storage-fault tests: moto's S3 server on 127.0.0.1 behind a fault-injecting
proxy (`_faultproxy.FaultProxy`) and a small synthetic dataset uploaded to it (the session's Ray,
`ray_session`, is in tests/conftest.py).

Clients talk to the proxy with `_faultproxy.storage_options` (botocore's retries off, so faults
reach the pipeline's own retry layer; s3fs still retries timeouts itself, as in production). The
tests prepare and inspect the bucket through a boto3 client that talks to moto directly.
"""

from __future__ import annotations

import pytest

from _faultproxy import BUCKET, KEY, SECRET, FaultProxy, storage_options


@pytest.fixture(scope="module")
def s3():
    """moto on 127.0.0.1, the proxy in front of it, a bucket; {"proxy", "client", "storage_options"}."""
    import boto3
    from moto.server import ThreadedMotoServer

    env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        proxy = None
        try:
            host, port = server.get_host_and_port()
            upstream = f"http://{host}:{port}"
            client = boto3.client("s3", endpoint_url=upstream, region_name="us-east-1",
                                  aws_access_key_id=KEY, aws_secret_access_key=SECRET)
            client.create_bucket(Bucket=BUCKET)
            proxy = FaultProxy(upstream).start()
            yield {"proxy": proxy, "client": client, "upstream": upstream,
                   "storage_options": storage_options(proxy.endpoint)}
        finally:
            if proxy is not None:
                proxy.stop()
            server.stop()


@pytest.fixture
def proxy(s3):
    """The module's proxy with no fault rules and empty counters; cleared again after the test."""
    s3["proxy"].reset()
    yield s3["proxy"]
    s3["proxy"].reset()


@pytest.fixture(scope="module")
def s3_data(s3, tmp_path_factory):
    """make_synthetic(n=3) uploaded to s3://BUCKET/data/ (annotations.json, images/, shards/), directly to moto."""
    from pipeline.organism.scenes import make_synthetic

    root = tmp_path_factory.mktemp("faults-synthetic")
    summary = make_synthetic(str(root), "shapes", "test", n=3, seed=0)
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and (rel == "annotations.json" or rel.startswith(("images/", "shards/"))):
            s3["client"].upload_file(str(p), BUCKET, f"data/{rel}")
    return {"root": root, "summary": summary, "coco": f"s3://{BUCKET}/data/annotations.json",
            "images": f"s3://{BUCKET}/data", "shards": f"s3://{BUCKET}/data/shards/"}
