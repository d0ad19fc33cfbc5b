"""Output storage: one fsspec filesystem in front of local paths and object stores.

Files are named by shard id; a shard's marker (`_shards/SHARD.json`) is written last, after its
three table files, so a marker means "this shard is complete" and a rerun can skip it. Writing the
same shard again replaces its files (same names): a crash between the files and the marker costs a
recomputation, never a duplicate row. Local writes go through a temporary name and a rename so a
reader never sees half a file.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

SAFE_NAME = re.compile(r"^[A-Za-z0-9._:~=-]+$")
TABLES = ("boxes", "candidates", "attention")


class Output:
    def __init__(self, root: str, storage_options: dict | None = None, retries: int = 4):
        self.fs, self.root = fsspec.core.url_to_fs(root, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.url = root
        self.retries = retries
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else [self.fs.protocol])

    def path(self, *parts: str) -> str:
        for p in parts:
            # Shard ids come from input names: refuse anything that could leave the output prefix.
            if not SAFE_NAME.match(p) or p in (".", ".."):
                raise ValueError(f"unsafe output name {p!r}")
        return posixpath.join(self.root, *parts)

    def _retry(self, fn, what: str):
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except (OSError, TimeoutError) as e:  # storage faults: retried with backoff
                if attempt == self.retries or isinstance(e, (FileNotFoundError, PermissionError)):
                    raise OSError(f"{what}: failed after {attempt + 1} attempt(s): {type(e).__name__}: {e}") from e
                time.sleep(delay)
                delay *= 2

    def write_bytes(self, path: str, data: bytes) -> None:
        def put():
            if self.local:
                self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp"
                with self.fs.open(tmp, "wb") as f:
                    f.write(data)
                self.fs.mv(tmp, path)
            else:
                with self.fs.open(path, "wb") as f:
                    f.write(data)
        self._retry(put, f"write {path}")

    def write_table(self, table: pa.Table, *parts: str) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(self.path(*parts), buf.getvalue())

    def write_json(self, obj, *parts: str) -> None:
        self.write_bytes(self.path(*parts), json.dumps(obj, indent=2, default=str).encode())

    def exists(self, *parts: str) -> bool:
        return self._retry(lambda: self.fs.exists(self.path(*parts)), "exists")

    def done_shards(self) -> set[str]:
        d = self.path("_shards")
        # fsspec caches listings per filesystem instance (one per process and options): markers
        # written or removed by another process must be seen, so always list afresh.
        self.fs.invalidate_cache(d)
        try:
            names = self._retry(lambda: self.fs.ls(d, detail=False), f"list {d}")
        except OSError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return set()  # no marker folder yet: nothing is done
            raise
        return {posixpath.basename(n)[:-5] for n in names if n.endswith(".json")}
