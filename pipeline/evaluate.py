"""Re-scoring a labelled run without the model: every selector is a column of `candidates/`.

For each selector, each query's choice is the candidate with the highest score (ties: lowest
cand_idx, i.e. greedy first; `no_box` candidates have no score and are never chosen). A query
whose selector chose nothing counts as IoU 0: failures stay in the denominator.
"""

from __future__ import annotations

import io
import posixpath

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import BOXES_SCHEMA, CANDIDATES_SCHEMA, SELECTOR_COLUMNS


def read_table(url: str, name: str, storage_options: dict | None = None, schema: pa.Schema | None = None) -> pl.DataFrame:
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    d = posixpath.join(root.rstrip("/"), name)
    files = sorted(p for p in (fs.ls(d, detail=False) if fs.exists(d) else []) if p.endswith(".parquet"))
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(io.BytesIO(f.read())))
    if not tables:
        return pl.from_arrow(schema.empty_table()) if schema is not None else pl.DataFrame()
    return pl.from_arrow(pa.concat_tables(tables, promote_options="default"))


def load_tables(url: str, storage_options: dict | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    return (read_table(url, "boxes", storage_options, BOXES_SCHEMA),
            read_table(url, "candidates", storage_options, CANDIDATES_SCHEMA))


def selector_rows(boxes: pl.DataFrame, cands: pl.DataFrame) -> pl.DataFrame:
    """(query_id, selector, size_bucket, iou, cand_idx) for every selector present in the run."""
    queries = boxes.filter(pl.col("size_bucket").is_not_null()).select("query_id", "size_bucket")
    frames = []
    always = {"greedy", "random", "logprob", "vote"}  # computed for every processed query
    for sel, col in SELECTOR_COLUMNS.items():
        if col not in cands.columns:
            continue
        scored = cands[col].drop_nulls().drop_nans().len() > 0
        if not scored and sel not in always:
            continue
        valid = cands.filter(pl.col(col).is_not_null() & pl.col(col).is_not_nan())
        chosen = (valid.sort(["query_id", col, "cand_idx"], descending=[False, True, False])
                  .group_by("query_id", maintain_order=True).first()
                  .select("query_id", "cand_idx", pl.col("iou").fill_null(0.0)))
        frames.append(queries.join(chosen, on="query_id", how="left")
                      .with_columns(pl.lit(sel).alias("selector"), pl.col("iou").fill_null(0.0)))
    if not frames:
        return pl.DataFrame(schema={"query_id": pl.String, "size_bucket": pl.String, "cand_idx": pl.Int32,
                                    "iou": pl.Float64, "selector": pl.String})
    return pl.concat(frames, how="vertical_relaxed")
