"""Auto-labels for other tools: COCO detection results, Label Studio predictions, or YOLO txt
labels (what Ultralytics and autodistill train on), with confidence.

Only queries with status `ok` produce a label; `--min-confidence` filters on the same
`confidence` column users see in boxes/ (predicted IoU with a regressor, else a normalised score).
"""

from __future__ import annotations

import json
import posixpath

import polars as pl


def _all_boxes(url: str, storage_options: dict | None) -> pl.DataFrame:
    from .evaluate import read_table
    from .schema import BOXES_SCHEMA

    b = read_table(url, "boxes", storage_options, BOXES_SCHEMA)
    if not b.height:  # a wrong path would otherwise export an empty, valid-looking file
        raise ValueError(f"{url} has no boxes/ rows: is it the output of `acs label`?")
    return b


# A row that can be a label: `ok`, with its box and its image (every `ok` row has them; the check
# keeps a hand-edited table from breaking an export).
LABELLED = (pl.col("status") == "ok") & pl.col("x1").is_not_null() & pl.col("image_uri").is_not_null()


def _confident(min_confidence: float) -> pl.Expr:
    return pl.col("confidence").fill_null(0.0) >= min_confidence


def _boxes(url: str, storage_options: dict | None, min_confidence: float) -> pl.DataFrame:
    return _all_boxes(url, storage_options).filter(LABELLED & _confident(min_confidence)).sort("query_id")


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
        # A box without a confidence (say, greedy with no finite log-probability) scores 0, as it does
        # for --min-confidence and for `acs evaluate`'s AP: COCOeval sorts by score and fails on null.
        score = r["confidence"] if r["confidence"] is not None else 0.0
        anns.append({"id": len(anns) + 1, "image_id": images[key]["id"], "category_id": cats[r["category"]],
                     "bbox": [r["x1"], r["y1"], w, h], "area": w * h, "iscrowd": 0, "score": score,
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


# Suffixes stripped from an image's name to name its label file; any other dot belongs to the name.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def yolo_stem(image_uri: str) -> str:
    """The name of an image's label file: YOLO loaders pair images/NAME.jpg with labels/NAME.txt.
    Shard images are `SHARD.parquet#KEY` or `SHARD.tar#MEMBER`: the key or member names the image."""
    path = image_uri
    head, sep, tail = image_uri.rpartition("#")
    if sep and head.endswith((".parquet", ".tar")):
        path = tail
    name = posixpath.basename(path)
    root, ext = posixpath.splitext(name)
    return root if ext.lower() in IMAGE_SUFFIXES else name


def yolo_line(class_id: int, box: tuple[float, float, float, float], width: float, height: float) -> str:
    """`class cx cy w h`, normalised by the image size (boxes are already clamped to the image)."""
    x1, y1, x2, y2 = box
    return (f"{class_id} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
            f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")


def to_yolo(url: str, output: str, storage_options: dict | None = None, min_confidence: float = 0.0,
            classes: list[str] | None = None) -> dict:
    """OUTPUT/labels/<image stem>.txt for every image of the run (empty when nothing is kept, so an
    image without a label reads as "no object", not as a file that went missing), data.yaml and
    classes.txt with the class names in id order. Returns the counts, filtered rows included.

    Class ids are 0-based in sorted category order (the COCO export's order), taken from every `ok`
    row whatever the threshold, so two thresholds give the same ids; `classes` fixes the order
    across runs (a train and a val run exported apart must agree)."""
    import fsspec

    b = _all_boxes(url, storage_options).sort("query_id")
    labelled = b.filter(LABELLED)
    names = list(classes) if classes is not None else sorted(labelled["category"].unique().to_list())
    class_id = {c: i for i, c in enumerate(names)}
    unknown = sorted(set(labelled["category"].to_list()) - set(class_id))
    if unknown:
        raise ValueError(f"categories {unknown} of {url} are not among the given classes {names}")
    kept = labelled.filter(_confident(min_confidence))

    # One file per image; two images of one stem would write one file, losing the other's labels.
    stems: dict[str, str] = {}
    for uri in b["image_uri"].drop_nulls().unique().sort().to_list():
        other = stems.setdefault(yolo_stem(uri), uri)
        if other != uri:
            raise ValueError(f"images {other} and {uri} share the label file name {yolo_stem(uri)}.txt; "
                             "YOLO pairs a label file with its image by name: rename one of them")
    # An empty label file says "no object here". For an image the model never answered on (every
    # query an image, model or query error) that is not known: name those so they can be left out.
    answered = b.filter(pl.col("status").is_in(["ok", "no_box"]))["image_uri"].drop_nulls().unique().to_list()
    unread = sorted(set(stems.values()) - set(answered))
    lines: dict[str, list[str]] = {stem: [] for stem in stems}
    for r in kept.iter_rows(named=True):
        box = (r["x1"], r["y1"], r["x2"], r["y2"])
        lines[yolo_stem(r["image_uri"])].append(
            yolo_line(class_id[r["category"]], box, r["image_width"], r["image_height"]))

    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    root = root.rstrip("/")
    fs.makedirs(posixpath.join(root, "labels"), exist_ok=True)
    for stem, ls in lines.items():
        with fs.open(posixpath.join(root, "labels", f"{stem}.txt"), "w") as f:
            f.write("".join(line + "\n" for line in ls))
    with fs.open(posixpath.join(root, "classes.txt"), "w") as f:
        f.write("".join(n + "\n" for n in names))
    with fs.open(posixpath.join(root, "data.yaml"), "w") as f:
        # JSON strings are valid YAML scalars: names with colons or quotes need no YAML library.
        f.write(f"# acs-pipeline auto-labels from {url} (confidence >= {min_confidence}); add `path`, "
                "`train` and `val` (image folders beside labels/) to train on them\n")
        f.write(f"nc: {len(names)}\nnames:\n" + "".join(f"  {i}: {json.dumps(n)}\n" for i, n in enumerate(names)))
    return {"images": len(lines), "labels": kept.height, "classes": names,
            "below_min_confidence": labelled.height - kept.height, "without_box": b.height - labelled.height,
            "unanswered_images": unread}


def export(url: str, fmt: str, output: str, storage_options: dict | None = None, min_confidence: float = 0.0) -> int:
    """Writes the export and returns its number of labels. `yolo` writes a folder (see `to_yolo`)."""
    import fsspec

    if fmt == "yolo":
        return to_yolo(url, output, storage_options, min_confidence)["labels"]
    data = {"coco": to_coco, "labelstudio": to_labelstudio}[fmt](url, storage_options, min_confidence)
    with fsspec.open(output, "w", **(storage_options or {})) as f:
        json.dump(data, f)
    return len(data["annotations"]) if fmt == "coco" else sum(len(t["predictions"][0]["result"]) for t in data)
