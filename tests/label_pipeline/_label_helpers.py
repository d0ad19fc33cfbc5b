"""Helpers shared by the Ray Data labelling tests (tests/label_pipeline/): small datasets and output
readers. Not a test module (no `test_` prefix); imported by name (pytest puts this directory on sys.path).
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Small everywhere: N=2 sampled candidates (+ greedy), short answers. The parrot needs ~18 tokens
# to close its box ("[10, 20, 50, 60]"); the random tiny model never produces one anyway.
N = 2
K = N + 1
PARROT_TOKENS = 24
TINY_TOKENS = 12




def label_config(**kw):
    from pipeline.label import LabelConfig

    kw.setdefault("num_candidates", N)
    kw.setdefault("batch_size", 4)
    kw.setdefault("progress", False)
    return LabelConfig(**kw)


# ------------------------------------------------------------------------------------ parrot dataset
# Mirrors tests/conftest.py: the parrot answers PARROT_BOX in resized-input pixels. Image sizes are
# multiples of 28 inside the processor's pixel range, so the resize is the identity and the box
# comes back as exactly PARROT_BOX in original pixels.
PARROT_BOX = (10.0, 20.0, 50.0, 60.0)
PARROT_CATEGORIES = ("red circle", "blue square", "green triangle")
CAT_ID = {name: i + 1 for i, name in enumerate(PARROT_CATEGORIES)}

# (file, width, height, seed, [(category, gt xyxy)])
PARROT_IMAGES = [
    ("images/p1.png", 112, 84, 11, [("red circle", (10, 20, 50, 60))]),        # medium, IoU 1
    ("images/p2.png", 140, 112, 12, [("blue square", (12, 22, 40, 48)),        # small
                                     ("green triangle", (0, 0, 120, 100))]),   # large
    ("images/p3.png", 84, 84, 13, [("green triangle", (30, 30, 80, 80))]),     # medium
    ("images/p4.png", 112, 84, 14, [("blue square", (60, 10, 100, 40))]),      # medium, IoU 0
    ("images/p5.png", 140, 112, 15, [("red circle", (5, 15, 25, 35))]),        # small
    ("images/p6.png", 84, 84, 16, [("red circle", (10, 20, 50, 60))]),         # medium, IoU 1
]
# Bad inputs added by write_parrot_coco(bad=True): (file, content or None = not created, category, gt)
BAD_IMAGES = [
    ("images/missing.jpg", None, "red circle", (10, 20, 50, 60)),
    ("images/empty.jpg", b"", "blue square", (10, 20, 50, 60)),
    ("images/notimage.jpg", b"this is a text file, not a JPEG\n", "green triangle", (10, 20, 50, 60)),
]
UNKNOWN_CATEGORY_ID = 99


def iou(a, b) -> float:
    """Plain-Python IoU of two xyxy boxes (independent of pipeline.metrics)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def bucket(area: float) -> str:
    return "small" if area < 32 ** 2 else "medium" if area < 96 ** 2 else "large"


def write_parrot_coco(root: Path, make_image, bad: bool = False, name: str = "annotations.json") -> dict:
    """A COCO dataset the parrot model answers: returns {"ann": path, "root": dir, "good": {qid: (cat, gt, (w, h))},
    "bad": {qid: expected (status, error substrings)}}."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns, good, badq = [], [], {}, {}

    def ann(image_id, cat_id, gt):
        x1, y1, x2, y2 = gt
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat_id,
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float((x2 - x1) * (y2 - y1)), "iscrowd": 0})
        return anns[-1]["id"]

    for i, (fname, w, h, seed, objs) in enumerate(PARROT_IMAGES):
        image_id = i + 1
        path = root / fname
        if not path.exists():
            make_image(w, h, seed=seed).save(path)
        images.append({"id": image_id, "file_name": fname, "width": w, "height": h})
        for cat, gt in objs:
            ann(image_id, CAT_ID[cat], gt)
            good[f"{image_id}:{CAT_ID[cat]}"] = (cat, tuple(map(float, gt)), (w, h))
    if bad:
        for j, (fname, content, cat, gt) in enumerate(BAD_IMAGES):
            image_id = 100 + j
            if content is not None:
                (root / fname).write_bytes(content)
            images.append({"id": image_id, "file_name": fname, "width": 112, "height": 84})
            ann(image_id, CAT_ID[cat], gt)
            words = {"missing.jpg": ["missing.jpg", "file not found"],
                     "empty.jpg": ["empty.jpg", "empty file (0 bytes)"],
                     "notimage.jpg": ["notimage.jpg", "not a decodable image"]}[Path(fname).name]
            badq[f"{image_id}:{CAT_ID[cat]}"] = ("image_error", words)
        ann_id = ann(1, UNKNOWN_CATEGORY_ID, (0, 0, 20, 20))
        badq[f"1:{UNKNOWN_CATEGORY_ID}:ann{ann_id}"] = (
            "query_error", [f"annotation {ann_id}", f"unknown category id {UNKNOWN_CATEGORY_ID}"])
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": i, "name": n, "supercategory": "shape"} for n, i in CAT_ID.items()]}
    ann_path = root / name
    ann_path.write_text(json.dumps(coco))
    return {"ann": str(ann_path), "root": str(root), "good": good, "bad": badq}


# ------------------------------------------------------------------------------------ reading outputs
def table_files(out: str | Path, name: str) -> list[str]:
    return sorted(glob.glob(os.path.join(str(out), name, "*.parquet")))


def read(out: str | Path, name: str) -> pa.Table:
    files = table_files(out, name)
    assert files, f"no {name} files under {out}"
    return pa.concat_tables([pq.read_table(f) for f in files])


def markers(out: str | Path) -> dict[str, dict]:
    return {Path(p).stem: json.loads(Path(p).read_text())
            for p in sorted(glob.glob(os.path.join(str(out), "_shards", "*.json")))}


def run_json(out: str | Path, run_id: str) -> dict:
    return json.loads((Path(out) / "_runs" / f"{run_id}.json").read_text())


def assert_exactly_once(out: str | Path, expected_ids: set[str], k: int) -> None:
    """Row invariants of a finished output: one boxes row per query, K candidate rows per query."""
    boxes, cands = read(out, "boxes"), read(out, "candidates")
    qids = boxes.column("query_id").to_pylist()
    dup = [q for q, n in Counter(qids).items() if n > 1]
    assert not dup, f"query ids written more than once: {dup[:5]}"
    assert set(qids) == expected_ids
    pairs = list(zip(cands.column("query_id").to_pylist(), cands.column("cand_idx").to_pylist()))
    assert len(pairs) == len(set(pairs)) == k * len(expected_ids)
    per_q: dict[str, list[int]] = {}
    for q, c in pairs:
        per_q.setdefault(q, []).append(c)
    assert set(per_q) == expected_ids
    assert all(sorted(v) == list(range(k)) for v in per_q.values())
