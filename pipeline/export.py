"""Auto-labels for other tools: COCO detection results or Label Studio predictions, with confidence.

Only queries with status `ok` produce a label; `--min-confidence` filters on the same
`confidence` column users see in boxes/ (predicted IoU with a regressor, else a normalised score).
"""

from __future__ import annotations

import json

import polars as pl


def _boxes(url: str, storage_options: dict | None, min_confidence: float) -> pl.DataFrame:
    from .evaluate import read_table

    b = read_table(url, "boxes", storage_options)
    return b.filter((pl.col("status") == "ok") & (pl.col("confidence").fill_null(0.0) >= min_confidence)).sort("query_id")


def to_coco(url: str, storage_options: dict | None = None, min_confidence: float = 0.0) -> dict:
    """A COCO dataset (images, categories, annotations with `score`), loadable by pycocotools."""
    b = _boxes(url, storage_options, min_confidence)
    images = {}
    cats = {c: i + 1 for i, c in enumerate(sorted(b["category"].unique().to_list()))}
    anns = []
    for r in b.iter_rows(named=True):
        key = r["image_uri"] or r["image_id"]
        if key not in images:
            images[key] = {"id": len(images) + 1, "file_name": r["image_uri"], "width": r["image_width"],
                           "height": r["image_height"], "acs_image_id": r["image_id"]}
        w, h = r["x2"] - r["x1"], r["y2"] - r["y1"]
        anns.append({"id": len(anns) + 1, "image_id": images[key]["id"], "category_id": cats[r["category"]],
                     "bbox": [r["x1"], r["y1"], w, h], "area": w * h, "iscrowd": 0, "score": r["confidence"],
                     "acs_query_id": r["query_id"], "acs_selector": r["selector"]})
    return {"info": {"description": f"acs-pipeline auto-labels from {url}"}, "images": list(images.values()),
            "categories": [{"id": i, "name": c} for c, i in cats.items()], "annotations": anns}


def to_labelstudio(url: str, storage_options: dict | None = None, min_confidence: float = 0.0) -> list[dict]:
    """Label Studio tasks with one `prediction` per image; boxes in percent of the image size."""
    b = _boxes(url, storage_options, min_confidence)
    tasks: dict[str, dict] = {}
    for r in b.iter_rows(named=True):
        key = r["image_uri"] or r["image_id"]
        task = tasks.setdefault(key, {"data": {"image": r["image_uri"]},
                                      "predictions": [{"model_version": r["model_id"], "score": 0.0, "result": []}]})
        W, H = r["image_width"], r["image_height"]
        pred = task["predictions"][0]
        pred["result"].append({
            "id": r["query_id"], "from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": W, "original_height": H, "score": r["confidence"],
            "value": {"x": 100 * r["x1"] / W, "y": 100 * r["y1"] / H, "width": 100 * (r["x2"] - r["x1"]) / W,
                      "height": 100 * (r["y2"] - r["y1"]) / H, "rotation": 0, "rectanglelabels": [r["category"]]}})
        pred["score"] = min(x["score"] or 0.0 for x in pred["result"])
    return list(tasks.values())


def export(url: str, fmt: str, output: str, storage_options: dict | None = None, min_confidence: float = 0.0) -> int:
    import fsspec

    data = {"coco": to_coco, "labelstudio": to_labelstudio}[fmt](url, storage_options, min_confidence)
    with fsspec.open(output, "w", **(storage_options or {})) as f:
        json.dump(data, f)
    return len(data["annotations"]) if fmt == "coco" else sum(len(t["predictions"][0]["result"]) for t in data)
