"""The output tables' Parquet schemas, defined once: the writer, the tests and docs/schema.md use these.

Tables under OUT/: `boxes/` (one row per query), `candidates/` (one row per candidate, cand_idx 0 =
greedy), `attention/` (one row per candidate with a captured map), `_shards/` (completion markers),
`_runs/RUN_ID.json` (resolved config, versions, counters, timings).
"""

from __future__ import annotations

import pyarrow as pa

# Query-level status: a small enum; `error` says in words what happened.
QUERY_STATUS = {
    "ok": "a box was selected",
    "no_box": "the model produced no parseable box in any candidate (raw texts are in candidates/)",
    "image_error": "the image could not be read or decoded (missing, empty, corrupt, not an image, too large)",
    "query_error": "the query itself is unusable (empty or absurd text, unknown category, duplicate id)",
    "model_error": "the model failed on this query's batch (the error names the exception)",
}
# Candidate-level status.
CANDIDATE_STATUS = {
    "ok": "a box was parsed (possibly reordered/clamped: see box_fixed)",
    "no_box": "no well-formed box in the text (kept in `text`)",
    "missing": "no candidate was generated because the query failed before sampling",
    "skipped": "not sampled: adaptive K stopped early because the first candidates agreed",
}

# One score column per selector; `score_<name>` with '-' as '_'. Higher is better for all.
SELECTOR_COLUMNS = {
    "acs-learned": "score_acs_learned",
    "acs-free": "score_acs_free",
    "greedy": "score_greedy",
    "random": "score_random",
    "logprob": "score_logprob",
    "vote": "score_vote",
    "loc-mass": "score_loc_mass",
    "loc-heads": "score_loc_heads",
    "oracle": "score_oracle",
}

_GT = [pa.field(f"gt_{c}", pa.float64()) for c in ("x1", "y1", "x2", "y2")]
_BOX = [pa.field(c, pa.float64()) for c in ("x1", "y1", "x2", "y2")]

BOXES_SCHEMA = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("image_id", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("category", pa.string()),
    pa.field("selector", pa.string()),
    pa.field("cand_idx", pa.int32()),  # the selected candidate; null when none
    *_BOX,
    pa.field("score", pa.float64()),  # the selector's score of the selected candidate
    pa.field("predicted_iou", pa.float64()),  # ACS-Learned's prediction; null without a regressor
    pa.field("confidence", pa.float64()),  # predicted IoU, else a [0, 1] normalised selector score
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("n_candidates", pa.int32()),
    pa.field("n_ok_candidates", pa.int32()),
    pa.field("image_width", pa.int32()),
    pa.field("image_height", pa.int32()),
    pa.field("model_id", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("shard_id", pa.string()),
    *_GT,
    pa.field("gt_area", pa.float64()),
    pa.field("iou", pa.float64()),
    pa.field("size_bucket", pa.string()),
])

CANDIDATES_SCHEMA = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("cand_idx", pa.int32(), nullable=False),
    pa.field("text", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    *_BOX,
    pa.field("box_fixed", pa.bool_()),
    pa.field("mean_logprob", pa.float64()),
    pa.field("n_tokens", pa.int32()),
    *[pa.field(col, pa.float64()) for col in SELECTOR_COLUMNS.values()],
    pa.field("iou", pa.float64()),
    pa.field("run_id", pa.string()),
    pa.field("shard_id", pa.string()),
])


def attention_schema(dump_maps: bool = False) -> pa.Schema:
    """Entropy is a flat list in (coordinate, layer, head) order, length 4 * len(layers) * len(heads);
    `layers` and `heads` name what was captured, so the list is self-describing per row."""
    fields = [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("cand_idx", pa.int32(), nullable=False),
        pa.field("grid_h", pa.int32()),
        pa.field("grid_w", pa.int32()),
        pa.field("layers", pa.list_(pa.int16())),
        pa.field("heads", pa.list_(pa.int16())),
        pa.field("entropy", pa.list_(pa.float32())),
        # Per query, on its first attention row only (null on the others): the prompt's last token's
        # share of attention on the image and the spatial entropy of its map, (layer, head) order.
        pa.field("prompt_mass", pa.list_(pa.float32())),
        pa.field("prompt_spatial_entropy", pa.list_(pa.float32())),
        pa.field("run_id", pa.string()),
        pa.field("shard_id", pa.string()),
    ]
    if dump_maps:
        # Pooled to G x G: (4, L, H, G, G) flattened, float16 to keep files analytics-sized.
        fields += [pa.field("map_grid", pa.int32()), pa.field("maps", pa.list_(pa.float16()))]
    return pa.schema(fields)


def schema_markdown() -> str:
    """docs/schema.md is generated from this module so that it never drifts."""
    lines = ["# Output tables", "", "Generated from `pipeline/schema.py` (`python -m pipeline.schema`).", ""]
    for name, schema in (("boxes", BOXES_SCHEMA), ("candidates", CANDIDATES_SCHEMA),
                         ("attention", attention_schema(True))):
        lines += [f"## `{name}/`", "", "| column | type | nullable |", "|---|---|---|"]
        lines += [f"| `{f.name}` | `{f.type}` | {'yes' if f.nullable else 'no'} |" for f in schema]
        lines.append("")
    lines += ["## Query status (`boxes.status`)", "", "| status | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in QUERY_STATUS.items()]
    lines += ["", "## Candidate status (`candidates.status`)", "", "| status | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in CANDIDATE_STATUS.items()]
    lines += ["", "Selector score columns (higher is better): " +
              ", ".join(f"`{c}` ({s})" for s, c in SELECTOR_COLUMNS.items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(schema_markdown())
