"""Output storage: one fsspec filesystem in front of local paths and object stores.

Files are named by shard id; a shard's marker (`_shards/SHARD.json`) is written last, after its
three table files, so a marker means "this shard is complete" and a rerun can skip it. Writing the
same shard again replaces its files (same names): a crash between the files and the marker costs a
recomputation, never a duplicate row. Local writes go through a temporary name and a rename so a
reader never sees half a file.

Every storage call of the job (listing inputs, reading images and shards, writing tables and
markers) goes through `retry_io`: transient faults (5xx answers, timeouts, dropped connections,
which s3fs surfaces as `OSError`) are retried with exponential backoff; a missing file or a refused
permission is not transient and is raised at once. When the retries run out the error names the
path, the number of attempts and the cause.
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

# Defaults of `retry_io` (the run's `--io-retries` / `--io-backoff` override them): 4 retries after
# the first attempt, waiting 0.5, 1, 2, 4 s. s3fs and botocore retry some faults themselves first.
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF_S = 0.5
# Not transient: retrying cannot help, so these are raised unchanged on the first attempt.
PERMANENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class StorageError(OSError):
    """A storage call that still failed after its retries; the message names the path and cause."""


def _transient() -> tuple[type[BaseException], ...]:
    types: tuple[type[BaseException], ...] = (OSError, TimeoutError)
    try:  # a truncated body surfaces from s3fs as aiohttp's ClientPayloadError, not an OSError
        import aiohttp

        types += (aiohttp.ClientError,)
    except ImportError:
        pass
    return types


def retry_io(fn, what: str, retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF_S):
    """`fn()`, retried on transient storage faults with exponential backoff (backoff, 2*backoff, ...).

    `fn` must be idempotent (a whole read or a whole write). After `retries` retries the last
    fault is raised as a `StorageError` "WHAT: failed after N attempt(s): Type: message"."""
    transient = _transient()
    delay = backoff
    for attempt in range(retries + 1):
        try:
            return fn()
        except PERMANENT:
            raise
        except transient as e:  # storage faults: retried with backoff
            if attempt == retries:
                raise StorageError(f"{what}: failed after {attempt + 1} attempt(s): {type(e).__name__}: {e}") from e
            time.sleep(delay)
            delay *= 2


class Output:
    def __init__(self, root: str, storage_options: dict | None = None, retries: int = DEFAULT_RETRIES,
                 backoff: float = DEFAULT_BACKOFF_S):
        self.fs, self.root = fsspec.core.url_to_fs(root, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.url = root
        self.retries = retries
        self.backoff = backoff
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else [self.fs.protocol])

    def path(self, *parts: str) -> str:
        for p in parts:
            # Shard ids come from input names: refuse anything that could leave the output prefix.
            if not SAFE_NAME.match(p) or p in (".", ".."):
                raise ValueError(f"unsafe output name {p!r}")
        return posixpath.join(self.root, *parts)

    def url_of(self, path: str) -> str:
        """The path as a URL for messages (s3://bucket/key rather than bucket/key)."""
        proto = self.fs.protocol[0] if isinstance(self.fs.protocol, (tuple, list)) else self.fs.protocol
        return path if self.local else f"{proto}://{path}"

    def _retry(self, fn, what: str):
        return retry_io(fn, what, self.retries, self.backoff)

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
        self._retry(put, f"write {self.url_of(path)}")

    def write_table(self, table: pa.Table, *parts: str) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(self.path(*parts), buf.getvalue())

    def write_json(self, obj, *parts: str) -> None:
        self.write_bytes(self.path(*parts), json.dumps(obj, indent=2, default=str).encode())

    def read_json(self, *parts: str):
        """The JSON document at these parts, or None when there is none."""
        p = self.path(*parts)
        self.fs.invalidate_cache(posixpath.dirname(p))
        try:
            data = self._retry(lambda: self.fs.cat_file(p), f"read {self.url_of(p)}")
        except FileNotFoundError:
            return None
        return json.loads(data)

    def exists(self, *parts: str) -> bool:
        p = self.path(*parts)
        return self._retry(lambda: self.fs.exists(p), f"exists {self.url_of(p)}")

    def done_shards(self) -> set[str]:
        d = self.path("_shards")
        # fsspec caches listings per filesystem instance (one per process and options): markers
        # written or removed by another process must be seen, so always list afresh.
        self.fs.invalidate_cache(d)
        try:
            names = self._retry(lambda: self.fs.ls(d, detail=False), f"list {self.url_of(d)}")
        except FileNotFoundError:
            return set()  # no marker folder yet: nothing is done
        return {posixpath.basename(n)[:-5] for n in names if n.endswith(".json")}
