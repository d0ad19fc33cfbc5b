"""Ray Data stages: thin wrappers over plain functions.

    listed queries (driver) -> load_images (CPU tasks) -> ACSStage (actor pool, model loaded
    once per actor) -> result rows (small) -> ShardWriter (driver, per-shard files + marker)

Each stage keeps the contract "one output row per input row": a failed image or query leaves the
stage as a row with a status, never as an exception that kills the batch, and never filtered out.
"""

from __future__ import annotations

import time
import traceback
from collections import defaultdict

import numpy as np

from .images import ImageError, decode_image
from .storage import DEFAULT_BACKOFF_S, DEFAULT_RETRIES, StorageError, retry_io

# Columns every stage passes through untouched (the query's listing row).
META_COLUMNS = ("query_id", "image_id", "image_uri", "category", "gt_x1", "gt_y1", "gt_x2", "gt_y2",
                "gt_area", "shard_id", "shard_file", "row_index", "shard_member", "pre_status", "pre_error", "width",
                "height")


# A row whose bytes could not be read because of a storage fault that outlasted the retries
# (not a missing or broken file: those are `image_error`). It is a transient status that never
# reaches the tables: the driver writes no file and no marker for a shard holding such a row and
# reports the shard as failed, so that a rerun of the same command reads and labels it again.
STORAGE_FAULT = "storage_error"


# The image column of the last Parquet shard this process read, for one run: [(run key, shard
# URI), column]. A batch needs a few rows, but a column chunk is read whole (img2dataset writes one
# row group per shard), so without it every batch re-reads its shard's images: per query the
# bytes of a shard / batch size, a whole 10,000-image shard per 8 queries. Ray reuses a decoding
# worker for the next batches, which come in listing order, so each worker reads a shard about
# once. One entry: memory stays one shard's images per worker. Keyed by run: inputs do not change
# during a run, but may between runs (and a later run must see its own storage faults).
_LAST_COLUMN: list = [None, None]


def _read_bytes(rows: list[dict], storage_options: dict | None, retries: int = DEFAULT_RETRIES,
                backoff: float = DEFAULT_BACKOFF_S, cache_key: str | None = None) -> list[bytes | Exception]:
    """Image bytes per row: a file per row for paths/URLs, one column read per shard file. Every
    read is retried on transient storage faults (`retry_io`); one that still fails leaves a
    `StorageError` for its rows, any other failure an `ImageError`."""
    import fsspec
    import pyarrow.parquet as pq

    so = storage_options or {}

    def read_file(uri: str) -> bytes:
        with fsspec.open(uri, "rb", **so) as f:
            return f.read()

    def read_parquet_column(shard: str):
        if cache_key is not None and _LAST_COLUMN[0] == (cache_key, shard):
            return _LAST_COLUMN[1]
        with fsspec.open(shard, "rb", **so) as f:
            pf = pq.ParquetFile(f)
            col = next(c for c in ("jpg", "png", "webp", "image") if c in pf.schema_arrow.names)
            data = pf.read(columns=[col]).column(col)
        if cache_key is not None:
            _LAST_COLUMN[:] = [(cache_key, shard), data]
        return data

    out: list[bytes | Exception | None] = [None] * len(rows)
    by_shard = defaultdict(list)
    for i, r in enumerate(rows):
        if r.get("pre_status"):
            out[i] = ImageError("not read: query rejected before loading")
        elif r.get("shard_file"):
            by_shard[r["shard_file"]].append(i)
        else:
            try:
                out[i] = retry_io(lambda: read_file(r["image_uri"]), f"read {r['image_uri']}", retries, backoff)
            except FileNotFoundError:
                out[i] = ImageError(f"{r['image_uri']}: file not found")
            except StorageError as e:
                out[i] = e
            except Exception as e:  # other read errors become the row's error, with the cause's words
                out[i] = ImageError(f"{r['image_uri']}: cannot read ({type(e).__name__}: {e})")
    for shard, idxs in by_shard.items():
        try:
            if shard.endswith(".tar"):
                # one streaming pass; a retry starts the pass again and overwrites the same slots
                retry_io(lambda: _read_tar_members(shard, rows, idxs, out, so), f"read {shard}", retries, backoff)
                continue
            data = retry_io(lambda: read_parquet_column(shard), f"read {shard}", retries, backoff)
            for i in idxs:
                out[i] = data[rows[i]["row_index"]].as_py()
        except StorageError as e:
            for i in idxs:
                out[i] = e
        except Exception as e:
            for i in idxs:
                out[i] = ImageError(f"{shard}: cannot read shard ({type(e).__name__}: {e})")
    return out


def _read_tar_members(shard: str, rows, idxs, out, storage_options) -> None:
    """One streaming pass over the tar for the members this batch needs."""
    import tarfile

    import fsspec

    want: dict[str, list[int]] = defaultdict(list)
    for i in idxs:
        want[rows[i]["shard_member"]].append(i)
    with fsspec.open(shard, "rb", **(storage_options or {})) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            if m.name in want:
                data = tar.extractfile(m).read()
                for i in want.pop(m.name):
                    out[i] = data
                if not want:
                    break
    for name, missing in want.items():
        for i in missing:
            out[i] = ImageError(f"{shard}: member {name} not found")


def load_images(batch: dict, storage_options: dict | None = None, max_pixels: int = 100_000_000,
                io_retries: int = DEFAULT_RETRIES, io_backoff: float = DEFAULT_BACKOFF_S,
                cache_key: str | None = None) -> dict:
    """CPU stage: read and decode; adds `pixels` (H, W, 3 uint8), width, height, status, error.
    Status is `ok`, the query's `pre_status`, `image_error`, or STORAGE_FAULT (see above).
    `cache_key` (the run's id) keeps the last Parquet shard's image column for the next batches."""
    n = len(batch["query_id"])
    # Ray turns all-null columns into float NaN: normalise back to None before looking at values.
    rows = [{c: (_py(batch[c][i]) if c in batch else None) for c in META_COLUMNS} for i in range(n)]
    data = _read_bytes(rows, storage_options, io_retries, io_backoff, cache_key)
    pixels, status, error, width, height = [], [], [], [], []
    for r, d in zip(rows, data):
        if r.get("pre_status"):
            pixels.append(np.zeros((0, 0, 3), np.uint8))
            status.append(r["pre_status"]), error.append(r["pre_error"])
            width.append(r.get("width") or 0), height.append(r.get("height") or 0)
            continue
        if isinstance(d, StorageError):
            pixels.append(np.zeros((0, 0, 3), np.uint8))
            status.append(STORAGE_FAULT), error.append(str(d))
            width.append(r.get("width") or 0), height.append(r.get("height") or 0)
            continue
        try:
            if isinstance(d, Exception):
                raise d
            img = decode_image(d, r["image_uri"], max_pixels)
            pixels.append(np.asarray(img, dtype=np.uint8))
            status.append("ok"), error.append(None)
            width.append(img.width), height.append(img.height)
        except ImageError as e:
            pixels.append(np.zeros((0, 0, 3), np.uint8))
            status.append("image_error"), error.append(str(e))
            width.append(r.get("width") or 0), height.append(r.get("height") or 0)
    out = {c: np.array([r[c] for r in rows], dtype=object) for c in META_COLUMNS}
    out.update(pixels=np.array(pixels + [None], dtype=object)[:-1], load_status=np.array(status, dtype=object),
               load_error=np.array(error, dtype=object), width=np.array(width, dtype=np.int64),
               height=np.array(height, dtype=np.int64))
    return out


class ACSStage:
    """Actor: the model loaded once per actor; per batch, ground every loadable query and return
    result rows. Only small results leave the actor (no images, no raw maps)."""

    def __init__(self, model: str, ground_cfg, selector: str, run_id: str, micro_batch: int = 8,
                 device: str | None = None, trust_remote_code: bool = False, dump_maps: bool = False,
                 torch_threads: int = 0):
        import torch

        from .ground import Grounder
        from .models.base import load_adapter

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)  # Ray's OMP_NUM_THREADS=<reserved CPUs> otherwise

        self.adapter = load_adapter(model, device=device, trust_remote_code=trust_remote_code)
        self.grounder = Grounder(self.adapter, ground_cfg)
        self.selector = selector
        self.run_id = run_id
        self.micro_batch = micro_batch
        self.dump_maps = dump_maps
        self.k = ground_cfg.sampling.num_candidates + 1

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        from .ground import Query
        from .records import rows_for_query

        n = len(batch["query_id"])
        metas = [{c: _py(batch[c][i]) for c in META_COLUMNS if c in batch} for i in range(n)]
        for i, m in enumerate(metas):
            m["width"], m["height"] = int(batch["width"][i]), int(batch["height"][i])
        results: list = [None] * n
        failures: dict[int, tuple[str, str]] = {}
        todo = []
        for i in range(n):
            if batch["load_status"][i] != "ok":
                failures[i] = (_py(batch["load_status"][i]), _py(batch["load_error"][i]))
            else:
                todo.append(i)
        t0 = time.perf_counter()
        for s in range(0, len(todo), self.micro_batch):
            chunk = todo[s:s + self.micro_batch]
            queries = []
            for i in chunk:
                m = metas[i]
                gt = None
                if all(m.get(c) is not None for c in ("gt_x1", "gt_y1", "gt_x2", "gt_y2")):
                    gt = (m["gt_x1"], m["gt_y1"], m["gt_x2"], m["gt_y2"])
                queries.append(Query(m["query_id"], Image.fromarray(batch["pixels"][i]), m["category"], gt))
            try:
                for i, res in zip(chunk, self.grounder.ground(queries)):
                    results[i] = res
            except Exception as e:
                # A per-batch model failure (e.g. an input the processor rejects) fails these
                # queries with the exception's words; the actor and the rest of the job go on.
                import torch

                if isinstance(e, torch.cuda.OutOfMemoryError):
                    raise  # fatal for the actor: let Ray restart it rather than mislabel rows
                msg = f"{type(e).__name__}: {e}".strip()[:500]
                for i in chunk:
                    failures[i] = ("model_error", msg)
                traceback.print_exc()
        elapsed = time.perf_counter() - t0
        boxes, cands, attn = [], [], []
        for i in range(n):
            status, error = failures.get(i, (None, None))
            b, c, a = rows_for_query(metas[i], results[i], selector=self.selector, k=self.k, run_id=self.run_id,
                                     model_id=self.adapter.model_id, status=status, error=error,
                                     dump_maps=self.dump_maps)
            boxes.append(b), cands.append(c), attn.append(a)
        return {"query_id": np.array([m["query_id"] for m in metas], dtype=object),
                "shard_id": np.array([m.get("shard_id") for m in metas], dtype=object),
                "box": np.array(boxes + [None], dtype=object)[:-1],
                "candidates": np.array(cands + [None], dtype=object)[:-1],
                "attention": np.array(attn + [None], dtype=object)[:-1],
                "acs_seconds": np.full(n, elapsed / max(1, n)),
                "generated_tokens": np.array([(r.timings.get("generated_tokens", 0) if r else 0) for r in results],
                                             dtype=np.float64)}


def _py(v):
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v
