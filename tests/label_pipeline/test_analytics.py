"""The README's analytics queries, run verbatim on labelled outputs and checked against pyarrow.

The strings below are the README's text: `out` (polars) and `OUT` (SQL) stand for the output
prefix. Keep them copy-pasteable; the tests substitute the real prefix and run them as written.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import duckdb
import polars as pl
import pytest

from _label_helpers import K, read

# ---- polars (Python expressions; `out` is the output prefix, e.g. "out/run1") ----------------------
POLARS_STATUS_COUNTS = 'pl.read_parquet(f"{out}/boxes/*.parquet").group_by("status").len()'

POLARS_CANDIDATES_PER_QUERY = (
    'pl.read_parquet(f"{out}/boxes/*.parquet")'
    '.join(pl.read_parquet(f"{out}/candidates/*.parquet"), on="query_id", suffix="_cand")'
    '.group_by("query_id", "status")'
    '.agg(pl.len().alias("candidates"), (pl.col("status_cand") == "ok").sum().alias("ok_candidates"))'
)

POLARS_SELECTED_CANDIDATE = (
    'pl.read_parquet(f"{out}/boxes/*.parquet").filter(pl.col("status") == "ok")'
    '.join(pl.read_parquet(f"{out}/candidates/*.parquet"), on=["query_id", "cand_idx"], suffix="_cand")'
    '.select("query_id", "category", "cand_idx", "x1", "y1", "x2", "y2", "text", "iou")'
)

# ---- DuckDB (SQL; OUT is the output prefix) --------------------------------------------------------
DUCKDB_SELECTOR_COUNTS = "SELECT selector, count(*) FROM read_parquet('OUT/boxes/*.parquet') GROUP BY 1"

DUCKDB_IOU_BY_SIZE = (
    "SELECT size_bucket, avg(iou) AS mean_iou, avg(CASE WHEN iou >= 0.5 THEN 1 ELSE 0 END) AS acc50, "
    "count(*) AS n FROM read_parquet('OUT/boxes/*.parquet') WHERE size_bucket IS NOT NULL "
    "GROUP BY 1 ORDER BY 1"
)

DUCKDB_STATUS_CANDIDATES = (
    "SELECT b.status, count(DISTINCT b.query_id) AS queries, count(*) AS candidates "
    "FROM read_parquet('OUT/boxes/*.parquet') b "
    "JOIN read_parquet('OUT/candidates/*.parquet') c USING (query_id) GROUP BY 1 ORDER BY 1"
)

RUNS = ["synthetic_run", "parrot_run"]


def _polars(expr: str, out: str) -> pl.DataFrame:
    return eval(expr, {"pl": pl, "out": out})  # the README text, verbatim


def _duckdb(sql: str, out: str) -> list[tuple]:
    assert "OUT/" in sql
    return duckdb.sql(sql.replace("OUT/", f"{out}/")).fetchall()


@pytest.fixture(params=RUNS)
def run(request):
    return request.getfixturevalue(request.param)


def test_polars_status_counts(run):
    out = run["out"]
    got = dict(_polars(POLARS_STATUS_COUNTS, out).iter_rows())
    want = Counter(read(out, "boxes").column("status").to_pylist())
    assert got == dict(want) == run["summary"]["counters"]["status"]
    assert sum(got.values()) == len(run["query_ids"])


def test_polars_join_candidates_per_query(run):
    out = run["out"]
    df = _polars(POLARS_CANDIDATES_PER_QUERY, out)
    boxes, cands = read(out, "boxes"), read(out, "candidates")
    assert df.height == boxes.num_rows == len(run["query_ids"])
    assert set(df["candidates"].to_list()) == {K}
    ok_per_q = Counter(q for q, s in zip(cands.column("query_id").to_pylist(), cands.column("status").to_pylist())
                       if s == "ok")
    n_ok = dict(zip(boxes.column("query_id").to_pylist(), boxes.column("n_ok_candidates").to_pylist()))
    for qid, status, n, ok in df.iter_rows():
        assert ok == ok_per_q.get(qid, 0) == n_ok[qid], qid
        assert (status in ("ok", "model_error")) == (ok > 0), (qid, status, ok)


def test_polars_join_selected_candidate(run):
    out = run["out"]
    df = _polars(POLARS_SELECTED_CANDIDATE, out)
    boxes = {r["query_id"]: r for r in read(out, "boxes").to_pylist()}
    ok = {q for q, r in boxes.items() if r["status"] == "ok"}
    assert set(df["query_id"].to_list()) == ok and df.height == len(ok)
    cands = {(r["query_id"], r["cand_idx"]): r for r in read(out, "candidates").to_pylist()}
    for r in df.iter_rows(named=True):
        c = cands[(r["query_id"], r["cand_idx"])]
        assert (r["x1"], r["y1"], r["x2"], r["y2"]) == (c["x1"], c["y1"], c["x2"], c["y2"])
        assert r["text"] == c["text"] and r["iou"] == boxes[r["query_id"]]["iou"]


def test_duckdb_selector_counts(run):
    out = run["out"]
    got = dict(_duckdb(DUCKDB_SELECTOR_COUNTS, out))
    assert got == dict(Counter(read(out, "boxes").column("selector").to_pylist()))
    assert got == {run["summary"]["selector"]: len(run["query_ids"])}


def test_duckdb_iou_by_size_bucket(run):
    out = run["out"]
    rows = _duckdb(DUCKDB_IOU_BY_SIZE, out)
    per = defaultdict(list)
    for r in read(out, "boxes").to_pylist():
        if r["size_bucket"] is not None:
            per[r["size_bucket"]].append(r["iou"])
    assert [r[0] for r in rows] == sorted(per)
    for bucket, mean_iou, acc50, n in rows:
        xs = per[bucket]
        assert n == len(xs)
        assert all(x is not None for x in xs), "every query with ground truth has an IoU (misses are 0)"
        assert mean_iou == pytest.approx(sum(xs) / len(xs))
        assert acc50 == pytest.approx(sum(x >= 0.5 for x in xs) / len(xs))
    with_gt = sum(x is not None for x in read(out, "boxes").column("gt_x1").to_pylist())
    assert sum(r[3] for r in rows) == with_gt > 0


def test_duckdb_join_status_candidates(run):
    out = run["out"]
    rows = _duckdb(DUCKDB_STATUS_CANDIDATES, out)
    want = Counter(read(out, "boxes").column("status").to_pylist())
    assert {s: q for s, q, _ in rows} == dict(want)
    assert {s: c for s, _, c in rows} == {s: K * n for s, n in want.items()}


def test_parrot_run_has_nonzero_iou(parrot_run):
    """On the parrot run the IoU table is not all zeros: the query is meaningful, not vacuous."""
    rows = {b: (m, a, n) for b, m, a, n in _duckdb(DUCKDB_IOU_BY_SIZE, parrot_run["out"])}
    assert set(rows) == {"small", "medium", "large"}
    assert rows["medium"][0] > 0 and rows["medium"][2] == 7 and rows["small"][2] == 2 and rows["large"][2] == 1
