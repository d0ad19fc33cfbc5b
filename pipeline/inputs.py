"""Listing queries from the three input kinds, deterministically, and cutting them into shards.

Listing reads metadata only (annotation JSON, manifests, the non-image columns of image shards):
image bytes are read later, by the CPU stage, next to where they are decoded. Every listed query
carries a `shard_id`; output files and completion markers are named after it, which is what makes
reruns skip finished work and never duplicate rows.

A query that is unusable on its face (empty or absurd text, unknown category, duplicate id) is
still listed, with `pre_status`/`pre_error` set: it gets its row, it just never reaches the model.
An input that is unusable as a whole (not a COCO file, a manifest without its columns, a URL that
matches no shard, a listing of zero queries) raises `InputError` before anything runs: a job that
"succeeds" with nothing to label tells a user who pointed at the wrong file nothing for hours.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from pathlib import Path

import fsspec

MAX_QUERY_CHARS = 200


class InputError(ValueError):
    """An input that cannot be what the user meant; the message names the input and what is wrong.
    A ValueError, not an OSError: `retry_io` retries OSErrors as storage faults, and retrying a
    wrong file cannot help."""


class NoQueries(InputError):
    """An input that lists no query at all; the message says why."""


def _hash(*parts) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:8]


def join_uri(root: str, name: str) -> str:
    if "://" in name or name.startswith("/"):
        return name
    return posixpath.join(root.rstrip("/"), name) if "://" in root else str(Path(root) / name)


def check_query_text(text) -> str | None:
    """Why a query text is unusable, or None."""
    if not isinstance(text, str) or not text.strip():
        return "empty query text"
    if len(text) > MAX_QUERY_CHARS:
        return f"query text of {len(text)} characters exceeds {MAX_QUERY_CHARS}"
    if any(ord(ch) < 32 for ch in text):
        return "query text contains control characters"
    return None


def _query(query_id, image_id, image_uri, category, gt=None, gt_area=None, **extra) -> dict:
    q = {"query_id": str(query_id), "image_id": None if image_id is None else str(image_id),
         "image_uri": image_uri, "category": category,
         "gt_x1": None, "gt_y1": None, "gt_x2": None, "gt_y2": None, "gt_area": gt_area,
         "pre_status": None, "pre_error": None, "shard_file": None, "row_index": None, "shard_member": None}
    if gt is not None:
        q.update(gt_x1=gt[0], gt_y1=gt[1], gt_x2=gt[2], gt_y2=gt[3])
    q.update(extra)
    bad = check_query_text(category)
    if bad:
        q.update(pre_status="query_error", pre_error=bad)
    return q


def list_coco(ann_uri: str, images_root: str, storage_options: dict | None = None,
              multi_instance: bool = False) -> list[dict]:
    """One query per (image, category) with exactly one instance (METHOD.md); annotations that
    name an unknown category become `query_error` rows rather than disappearing."""
    coco = _read_coco(ann_uri, storage_options)
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    images = {im["id"]: im for im in coco["images"]}
    by_pair: dict[tuple, list] = {}
    bad: list[dict] = []
    crowd = 0
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0):
            crowd += 1
            continue
        key = (ann["image_id"], ann["category_id"])
        if ann["category_id"] not in cats or ann["image_id"] not in images:
            what = "category" if ann["category_id"] not in cats else "image"
            bad_id = ann["category_id"] if what == "category" else ann["image_id"]
            q = _query(f"{ann['image_id']}:{ann['category_id']}:ann{ann.get('id')}", ann["image_id"], None,
                       str(ann["category_id"]))
            q.update(pre_status="query_error", pre_error=f"annotation {ann.get('id')} names unknown {what} id {bad_id}")
            bad.append(q)
            continue
        by_pair.setdefault(key, []).append(ann)
    out = []
    for (image_id, cat_id), anns in sorted(by_pair.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        if len(anns) != 1 and not multi_instance:
            continue  # ambiguous ground truth: not a query (METHOD.md), counted in the listing summary
        ann = anns[0]
        x, y, w, h = ann["bbox"]
        im = images[image_id]
        q = _query(f"{image_id}:{cat_id}", image_id, join_uri(images_root, im["file_name"]), cats[cat_id],
                   gt=(x, y, x + w, y + h), gt_area=ann.get("area"), width=im.get("width"),
                   height=im.get("height"))
        out.append(q)
    if not out and not bad:
        raise NoQueries(f"{ann_uri} lists no query: {_why_no_coco_query(coco, crowd, by_pair)}")
    return out + bad


COCO_KEYS = ("images", "annotations", "categories")


def _read_coco(ann_uri: str, storage_options: dict | None) -> dict:
    """The annotation JSON, checked to be a COCO dataset: any other JSON (a run summary, a COCO
    results list) would otherwise list zero queries and the run would end "successfully"."""
    with fsspec.open(ann_uri, "r", **(storage_options or {})) as f:
        try:
            coco = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{ann_uri} is not JSON ({e})") from e
    if not isinstance(coco, dict):
        hint = " (a COCO results file?)" if isinstance(coco, list) else ""
        raise InputError(f"{ann_uri} holds a JSON {type(coco).__name__}{hint}, not a COCO annotation "
                         f"file: an object with {', '.join(f'`{k}`' for k in COCO_KEYS)} lists")
    missing = [k for k in COCO_KEYS if not isinstance(coco.get(k), list)]
    if missing:
        keys = ", ".join(sorted(map(str, coco))[:8]) or "none"
        raise InputError(f"{ann_uri} is not a COCO annotation file: it has no "
                         f"{' and no '.join(f'`{k}` list' for k in missing)} (its top-level keys: {keys})")
    return coco


def _why_no_coco_query(coco: dict, crowd: int, by_pair: dict) -> str:
    if not coco["images"]:
        return "it has no images"
    if not coco["annotations"]:
        return "it has no annotations (queries come from ground truth; an image list without them is " \
               "labelled with --queries or --shards --categories)"
    if crowd == len(coco["annotations"]):
        return f"all {crowd} annotations are crowd regions (iscrowd=1)"
    return (f"none of its {len(by_pair)} (image, category) pairs has exactly one instance, and a query needs "
            "an unambiguous ground truth (METHOD.md)")


def list_manifest(uri: str, images_root: str | None, storage_options: dict | None = None) -> list[dict]:
    """Parquet, CSV or JSONL with `image` and `category` (optional `query_id`, `gt_x1..gt_y2`)."""
    import polars as pl

    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        data = f.read()
    import io

    lower = uri.lower()
    if lower.endswith(".parquet"):
        df = pl.read_parquet(io.BytesIO(data))
    elif lower.endswith(".csv"):
        df = pl.read_csv(io.BytesIO(data))
    elif lower.endswith((".jsonl", ".ndjson")):
        df = pl.read_ndjson(io.BytesIO(data))
    else:
        raise InputError(f"manifest {uri}: unknown format (use .parquet, .csv or .jsonl)")
    missing = {"image", "category"} - set(df.columns)
    if missing:
        raise InputError(f"manifest {uri}: missing column(s) {sorted(missing)}; need `image` and `category` "
                         f"(it has {sorted(df.columns)})")
    if not df.height:
        raise NoQueries(f"manifest {uri} lists no query: it has no rows")
    out = []
    for i, row in enumerate(df.iter_rows(named=True)):
        qid = row.get("query_id")
        qid = f"q{i:08d}" if qid is None or str(qid) == "" else str(qid)
        gt = None
        if all(row.get(c) is not None for c in ("gt_x1", "gt_y1", "gt_x2", "gt_y2")):
            gt = tuple(float(row[c]) for c in ("gt_x1", "gt_y1", "gt_x2", "gt_y2"))
        image = str(row["image"])
        out.append(_query(qid, row.get("image_id") or image, join_uri(images_root, image) if images_root else image,
                          row["category"], gt=gt, gt_area=row.get("gt_area")))
    return out


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _tar_rows(f) -> list[dict]:
    """WebDataset convention: members sharing a key (name up to the first dot) form one sample;
    the image is KEY.jpg/png/webp, optional metadata KEY.json may hold `categories` or `category`."""
    import tarfile

    samples: dict[str, dict] = {}
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = posixpath.basename(m.name)
            key, _, ext = base.partition(".")
            key = posixpath.join(posixpath.dirname(m.name), key)
            s = samples.setdefault(key, {"key": key})
            if ext.lower() in IMAGE_EXTS:
                s["member"] = m.name
            elif ext.lower() == "json":
                meta = json.loads(tar.extractfile(m).read() or b"{}")
                s.update({k: meta[k] for k in ("categories", "category", "image_id", "width", "height") if k in meta})
    return [s for s in samples.values() if "member" in s]


def list_shards(url: str, storage_options: dict | None = None, categories: list[str] | None = None) -> list[dict]:
    """Image shards: img2dataset-style Parquet or WebDataset tars; one query per (image, category).
    Bytes stay in the shard until the CPU stage reads them."""
    import pyarrow.parquet as pq

    if categories is not None:
        _check_categories(categories)
    fs, _, paths = fsspec.get_fs_token_paths(url, storage_options=storage_options or {})
    if len(paths) <= 1 and fs.isdir(paths[0] if paths else url):  # a folder: every shard under it
        paths = fs.find(paths[0] if paths else url)
    paths = sorted(p for p in paths if p.endswith((".parquet", ".tar")))
    if not paths:
        raise NoQueries(f"--shards {url} lists no query: no Parquet or WebDataset (.tar) shard matches it")
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    out = []
    n_images = 0
    for path in paths:
        uri = path if protocol in ("file", "local") else f"{protocol}://{path}"
        shard = f"{posixpath.basename(path).rsplit('.', 1)[0]}-{_hash(uri)}"
        if path.endswith(".tar"):
            with fs.open(path, "rb") as f:
                rows = _tar_rows(f)
            n_images += len(rows)
            for row in rows:
                cats = categories or row.get("categories") or ([row["category"]] if row.get("category") else [])
                for cat in cats:
                    out.append(_query(f"{row['key']}:{cat}", row.get("image_id", row["key"]), f"{uri}#{row['member']}",
                                      cat, shard_file=uri, shard_member=row["member"], shard_id=shard,
                                      width=row.get("width"), height=row.get("height")))
            continue
        # No read-ahead: the metadata columns are a sliver of an image shard, and s3fs's default
        # 50 MB read-ahead from each column's offset would fetch the image bytes too (the whole
        # dataset read on every listing, i.e. on every resume).
        with fs.open(path, "rb", cache_type="none") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            cols = [c for c in ("key", "image_id", "categories", "category", "width", "height") if c in names]
            table = pf.read(columns=cols)
        n_images += table.num_rows
        for i, row in enumerate(table.to_pylist()):
            cats = categories or row.get("categories") or ([row["category"]] if row.get("category") else [])
            key = str(row.get("key") or i)
            for cat in cats:
                out.append(_query(f"{key}:{cat}", row.get("image_id", key), f"{uri}#{key}", cat,
                                  shard_file=uri, row_index=i, shard_id=shard,
                                  width=row.get("width"), height=row.get("height")))
    if not out:
        if not n_images:
            why = f"its {len(paths)} shard file(s) hold no image"
        else:
            why = (f"none of its {n_images} image(s) in {len(paths)} shard file(s) names a category (a `categories` "
                   "or `category` column, or `categories` in a tar's KEY.json); pass --categories a,b")
        raise NoQueries(f"--shards {url} lists no query: {why}")
    return out


def _check_categories(categories: list[str]) -> None:
    """`--categories` replaces each image's own categories: an empty list would silently fall back
    to them (or to nothing), and a blank name would make every query a `query_error`."""
    if not categories:
        raise InputError("--categories names no category; name at least one (a,b) or leave it out to use "
                         "each image's own `categories`")
    for c in categories:
        bad = check_query_text(c)
        if bad:
            raise InputError(f"--categories {','.join(map(str, categories))!r}: category {c!r}: {bad}")


def dedupe(queries: list[dict]) -> list[dict]:
    """Later duplicates of a query_id get a unique id and `query_error`: still one row each."""
    seen: dict[str, int] = {}
    for q in queries:
        n = seen.get(q["query_id"], 0)
        seen[q["query_id"]] = n + 1
        if n:
            q["query_id"] = f"{q['query_id']}~dup{n}"
            q.update(pre_status="query_error", pre_error=f"duplicate query_id (occurrence {n + 1})")
    return queries


def assign_shards(queries: list[dict], shard_size: int, source_key: str) -> list[dict]:
    """Consecutive chunks of `shard_size` in listing order; ids carry a hash of the input spec so
    two different inputs written to one output never share a shard name."""
    prefix = _hash(source_key)
    for i, q in enumerate(queries):
        if not q.get("shard_id"):
            q["shard_id"] = f"shard-{prefix}-{i // shard_size:05d}"
    return queries
