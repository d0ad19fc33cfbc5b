"""`acs report`: one self-contained static HTML page about a labelled run.

Everything is inline: CSS in a <style> block, plots as hand-written inline SVG (no plotting
dependency), gallery images as base64 PNG data URIs. Nothing is fetched when the page is opened,
so it can be mailed, attached to a ticket or stored next to the run.

Sections: header (run ids, model, queries, status counts, the run's selector); the per-selector x
size-bucket table from `evaluate_run`; where the answers landed among all objects of their image
(when a COCO file holds them all); plots (Acc@0.5 by bucket, the ACS-Learned reliability
diagram, mean attention entropy by layer for high/low/zero-IoU candidates); a gallery of queries
where the run's selector chose another candidate than greedy, with the "deciding heads'" pooled
attention over the image when the run was labelled with --dump-maps; how to read it.

Only the attention rows the page needs are read (projected columns, and row groups filtered by
query id for the maps), so a run with large pooled maps does not have to fit in memory.
"""

from __future__ import annotations

import base64
import html
import io
import math
import posixpath
from dataclasses import dataclass, field

import fsspec
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .evaluate import load_tables
from .metrics import BUCKETS
from .schema import QUERY_STATUS

ALL_BUCKETS = (*BUCKETS, "all")
EPS = 1e-9  # an IoU change below this is "no change"
DEFAULT_TOP_HEADS = 8

# Box colours (RGB) in the gallery; the legend in the page uses the same values.
GREEDY_RGB = (255, 140, 0)
SELECTED_RGB = (0, 200, 70)
GT_RGB = (30, 144, 255)

SELECTOR_COLOURS = {
    "greedy": "#f28e2b", "acs-learned": "#1b7837", "acs-free": "#5aae61", "random": "#9e9e9e",
    "logprob": "#4e79a7", "vote": "#b07aa1", "loc-mass": "#9c755f", "loc-heads": "#edc948", "oracle": "#333333",
}
CURVE_COLOURS = {"high": "#1b9e77", "low": "#e6ab02", "zero": "#d95f02"}


# ------------------------------------------------------------------------------------ reading


def _parquet_files(url: str, name: str, storage_options: dict | None):
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    d = posixpath.join(root.rstrip("/"), name)
    files = sorted(p for p in (fs.ls(d, detail=False) if fs.exists(d) else []) if p.endswith(".parquet"))
    return fs, files


def read_columns(url: str, name: str, columns: list[str], keys: pl.DataFrame | None = None,
                 storage_options: dict | None = None) -> pl.DataFrame:
    """Only `columns` of table `name` (those a file has), and with `keys` (query_id, cand_idx) only
    those rows; row groups without any of the keys' query ids are skipped before reading `columns`."""
    fs, files = _parquet_files(url, name, storage_options)
    qids = pa.array(keys["query_id"].unique().to_list(), pa.string()) if keys is not None else None
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in columns if c in pf.schema_arrow.names]
            for rg in range(pf.num_row_groups):
                if qids is None:
                    tables.append(pf.read_row_group(rg, columns=cols))
                    continue
                mask = pc.is_in(pf.read_row_group(rg, columns=["query_id"])["query_id"], value_set=qids)
                if not pc.any(mask).as_py():
                    continue
                tables.append(pf.read_row_group(rg, columns=cols).filter(mask))
    if not tables:
        return pl.DataFrame()
    df = pl.from_arrow(pa.concat_tables(tables, promote_options="default"))
    if keys is not None:
        df = df.join(keys.select("query_id", pl.col("cand_idx").cast(df.schema["cand_idx"])),
                     on=["query_id", "cand_idx"], how="semi")
    return df


# ------------------------------------------------------------------------------------ text


def _t(value) -> str:
    """HTML-escaped text; '://' is written as an entity so that no literal URL (an image URI, an
    error message) appears in the page: it stays visibly the same but is never a reference."""
    return html.escape("" if value is None else str(value)).replace("://", "&#58;//")


def _num(x, spec: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


# ------------------------------------------------------------------------------------ SVG plots


def _svg_open(w: int, h: int, label: str) -> list[str]:
    # Inline SVG in HTML needs no namespace attribute (and so no URL in the page).
    return [f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{_t(label)}" '
            'font-family="system-ui, sans-serif" font-size="11">']


def _axes(parts: list[str], x0: float, y0: float, pw: float, ph: float, yticks, ymap, ylabel: str,
          yfmt: str = ".2f") -> None:
    for v in yticks:
        y = ymap(v)
        parts.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" stroke="#e3e3e3"/>')
        parts.append(f'<text x="{x0 - 5}" y="{y + 4:.1f}" text-anchor="end">{format(v, yfmt)}</text>')
    parts.append(f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y0 + ph}" stroke="#555"/>')
    parts.append(f'<line x1="{x0}" y1="{y0 + ph}" x2="{x0 + pw}" y2="{y0 + ph}" stroke="#555"/>')
    parts.append(f'<text transform="translate({x0 - 38},{y0 + ph / 2:.1f}) rotate(-90)" '
                 f'text-anchor="middle">{_t(ylabel)}</text>')


def svg_bars(table: list[dict]) -> str:
    """Grouped bars: Acc@0.5 per size bucket (groups) and selector (bars)."""
    selectors = list(dict.fromkeys(r["selector"] for r in table))
    cells = {(r["selector"], r["size_bucket"]): r for r in table}
    groups = [b for b in ALL_BUCKETS if any(cells.get((s, b), {}).get("n", 0) for s in selectors)]
    w, h, left, top, bottom, right = 780, 300, 56, 16, 40, 130
    pw, ph = w - left - right, h - top - bottom
    ymap = lambda v: top + ph * (1 - v)  # noqa: E731
    parts = _svg_open(w, h, "Acc@0.5 by size bucket per selector")
    _axes(parts, left, top, pw, ph, [0, 0.25, 0.5, 0.75, 1.0], ymap, "Acc@0.5")
    gw = pw / max(1, len(groups))
    bw = gw * 0.8 / max(1, len(selectors))
    for gi, b in enumerate(groups):
        gx = left + gi * gw + gw * 0.1
        n = max(cells.get((s, b), {}).get("n", 0) for s in selectors)
        parts.append(f'<text x="{left + gi * gw + gw / 2:.1f}" y="{top + ph + 16}" text-anchor="middle">'
                     f'{_t(b)} (n={n})</text>')
        for si, s in enumerate(selectors):
            r = cells.get((s, b))
            if r is None or not _finite(r["acc50"]):
                continue
            x, y = gx + si * bw, min(ymap(r["acc50"]), top + ph - 1.5)  # a zero stays visible
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bw - 1, 1):.1f}" '
                         f'height="{top + ph - y:.1f}" fill="{SELECTOR_COLOURS.get(s, "#777")}">'
                         f'<title>{_t(s)}, {_t(b)}: Acc@0.5 {r["acc50"]:.3f}, mIoU {_num(r["miou"])} '
                         f'(n={r["n"]})</title></rect>')
    for si, s in enumerate(selectors):
        y = top + 6 + si * 17
        parts.append(f'<rect x="{w - right + 14}" y="{y}" width="12" height="12" '
                     f'fill="{SELECTOR_COLOURS.get(s, "#777")}"/>')
        parts.append(f'<text x="{w - right + 31}" y="{y + 10}">{_t(s)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def svg_reliability(rel: dict, stats: dict) -> str:
    """Reliability diagram: per bin of predicted IoU, the mean observed IoU (bars) and the
    (mean predicted, mean observed) point; the diagonal is perfect calibration."""
    edges = np.asarray(rel["bin_edges"], float)
    mp, mt = np.asarray(rel["mean_pred"], float), np.asarray(rel["mean_target"], float)
    count = np.asarray(rel["count"], int)
    w, h, left, top, bottom, right = 380, 340, 56, 16, 44, 14
    pw, ph = w - left - right, h - top - bottom
    xmap = lambda v: left + pw * v  # noqa: E731
    ymap = lambda v: top + ph * (1 - v)  # noqa: E731
    parts = _svg_open(w, h, "reliability diagram of predicted IoU")
    _axes(parts, left, top, pw, ph, [0, 0.25, 0.5, 0.75, 1.0], ymap, "mean observed IoU")
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{xmap(v):.1f}" y="{top + ph + 15}" text-anchor="middle">{v:.2f}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{h - 6}" text-anchor="middle">'
                 'predicted IoU (ACS-Learned score)</text>')
    for i in range(len(count)):
        if count[i] == 0 or not math.isfinite(mt[i]):
            continue
        x0, x1, y = xmap(edges[i]), xmap(edges[i + 1]), ymap(mt[i])
        parts.append(f'<rect x="{x0 + 1:.1f}" y="{y:.1f}" width="{x1 - x0 - 2:.1f}" height="{top + ph - y:.1f}" '
                     f'fill="#9ecae1"><title>bin [{edges[i]:.1f}, {edges[i + 1]:.1f}): {count[i]} candidates, '
                     f'mean predicted {mp[i]:.3f}, mean observed {mt[i]:.3f}</title></rect>')
    parts.append(f'<line x1="{xmap(0)}" y1="{ymap(0)}" x2="{xmap(1)}" y2="{ymap(1)}" stroke="#666" '
                 'stroke-dasharray="4 3"/>')
    for i in range(len(count)):
        if count[i] and math.isfinite(mp[i]) and math.isfinite(mt[i]):
            parts.append(f'<circle cx="{xmap(mp[i]):.1f}" cy="{ymap(mt[i]):.1f}" r="3.5" fill="#08519c"/>')
    parts.append(f'<text x="{left + 8}" y="{top + 14}">ECE {_num(rel.get("ece"))}</text>')
    parts.append(f'<text x="{left + 8}" y="{top + 28}">Pearson {_num(stats.get("pearson"))}, '
                 f'Spearman {_num(stats.get("spearman"))}, n={stats.get("n", int(count.sum()))}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def svg_layer_curves(curves: dict, layers: list[int]) -> str:
    """Mean attention entropy per layer for the high/low/zero-IoU candidate groups."""
    series = [(name, c) for name, c in curves.items() if c.get("mean_entropy")]
    vals = np.array([v for _, c in series for v in c["mean_entropy"]], float)
    lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
    pad = max((hi - lo) * 0.1, 1e-3)
    lo, hi = lo - pad, hi + pad
    # The legend ("low (0 < IoU < 0.5), n=1234") sits right of the plot: its margin is sized from the
    # longest label (about 6.5 px a character at font-size 11), else the SVG clips the counts.
    longest = max((len(f"{name}, n={c['n']}") for name, c in series), default=0)
    right = max(170, 45 + int(6.5 * longest))
    w, h, left, top, bottom = 390 + right, 300, 60, 16, 40
    pw, ph = w - left - right, h - top - bottom
    lmin, lmax = (min(layers), max(layers)) if layers else (0, 1)
    xmap = lambda l: left + (pw * (l - lmin) / (lmax - lmin) if lmax > lmin else pw / 2)  # noqa: E731
    ymap = lambda v: top + ph * (1 - (v - lo) / (hi - lo))  # noqa: E731
    parts = _svg_open(w, h, "mean attention entropy by layer")
    _axes(parts, left, top, pw, ph, list(np.linspace(lo, hi, 5)), ymap, "mean entropy (nats)")
    step = max(1, len(layers) // 12)
    for l in layers[::step]:
        parts.append(f'<text x="{xmap(l):.1f}" y="{top + ph + 15}" text-anchor="middle">{l}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{h - 4}" text-anchor="middle">layer</text>')
    for k, (name, c) in enumerate(series):
        colour = CURVE_COLOURS.get(name.split()[0], "#555")
        pts = " ".join(f"{xmap(l):.1f},{ymap(v):.1f}" for l, v in zip(layers, c["mean_entropy"]))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for l, v in zip(layers, c["mean_entropy"]):
            parts.append(f'<circle cx="{xmap(l):.1f}" cy="{ymap(v):.1f}" r="2.5" fill="{colour}">'
                         f'<title>{_t(name)}, layer {l}: {v:.3f}</title></circle>')
        y = top + 8 + k * 18
        parts.append(f'<line x1="{w - right + 12}" y1="{y}" x2="{w - right + 30}" y2="{y}" stroke="{colour}" '
                     'stroke-width="2"/>')
        parts.append(f'<text x="{w - right + 35}" y="{y + 4}">{_t(name)}, n={c["n"]}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def svg_head_curve(curve: list[dict], greedy: dict | None = None) -> str:
    """ACS-Free's Acc@0.5 (all, small) and within-query Spearman as its head set grows (k on a
    doubling axis); greedy's Acc@0.5 as dashed lines for reference."""
    series = [("all Acc@0.5", "all", "#4e79a7"), ("small Acc@0.5", "small", "#e15759"),
              ("within-query Spearman", "spearman", "#59a14f")]
    vals = [r[key] for r in curve for _, key, _ in series if _finite(r.get(key))]
    vals += [v for v in (greedy or {}).values() if _finite(v)]
    lo, hi = min([0.0, *vals]), max([0.1, *vals])
    hi += (hi - lo) * 0.08
    w, h, left, top, bottom, right = 600, 300, 56, 16, 40, 200
    pw, ph = w - left - right, h - top - bottom
    xmap = lambda i: left + (pw * i / (len(curve) - 1) if len(curve) > 1 else pw / 2)  # noqa: E731
    ymap = lambda v: top + ph * (1 - (v - lo) / (hi - lo))  # noqa: E731
    parts = _svg_open(w, h, "ACS-Free by number of heads")
    _axes(parts, left, top, pw, ph, list(np.linspace(lo, hi, 5)), ymap, "Acc@0.5 / Spearman")
    for i, r in enumerate(curve):
        parts.append(f'<text x="{xmap(i):.1f}" y="{top + ph + 15}" text-anchor="middle">{r["k"]}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{h - 4}" text-anchor="middle">heads (top k on calib)</text>')
    legend = []
    for name, key, colour in series:
        pts = [(xmap(i), ymap(r[key]), r) for i, r in enumerate(curve) if _finite(r.get(key))]
        if not pts:
            continue
        parts.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y, _ in pts)}" fill="none" '
                     f'stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"><title>{_t(name)}, k={r["k"]}: '
                  f'{r[key]:.3f}</title></circle>' for x, y, r in pts]
        legend.append((name, colour, ""))
    for key, colour in (("all", "#4e79a7"), ("small", "#e15759")):
        v = (greedy or {}).get(key)
        if _finite(v):
            parts.append(f'<line x1="{left}" y1="{ymap(v):.1f}" x2="{left + pw}" y2="{ymap(v):.1f}" '
                         f'stroke="{colour}" stroke-dasharray="4 3"/>')
            legend.append((f"greedy {key} Acc@0.5", colour, ' stroke-dasharray="4 3"'))
    for j, (name, colour, dash) in enumerate(legend):
        y = top + 8 + j * 18
        parts.append(f'<line x1="{w - right + 12}" y1="{y}" x2="{w - right + 30}" y2="{y}" stroke="{colour}" '
                     f'stroke-width="2"{dash}/><text x="{w - right + 35}" y="{y + 4}">{_t(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def svg_head_heatmap(values: np.ndarray, layers: list[int], heads: list[int], label: str) -> str:
    """(layer x head) heatmap, brighter = larger; each cell's value in its tooltip."""
    nl, nh = values.shape
    cell = max(6, min(22, int(420 / max(nh, 1))))
    left, top = 44, 24
    w, h = left + nh * cell + 80, top + nl * cell + 34
    vmax = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
    parts = _svg_open(w, h, label)
    for i in range(nl):
        for j in range(nh):
            v = values[i, j]
            rgb = _CMAP[int(255 * min(1.0, v / vmax))] if np.isfinite(v) and vmax > 0 else (200, 200, 200)
            parts.append(f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" '
                         f'fill="rgb({int(rgb[0])},{int(rgb[1])},{int(rgb[2])})"><title>layer {layers[i]}, head '
                         f'{heads[j]}: {_num(float(v), ".4f")}</title></rect>')
    step_l, step_h = max(1, nl // 14), max(1, nh // 16)
    for i in range(0, nl, step_l):
        parts.append(f'<text x="{left - 5}" y="{top + i * cell + cell / 2 + 4:.1f}" text-anchor="end">{layers[i]}</text>')
    for j in range(0, nh, step_h):
        parts.append(f'<text x="{left + j * cell + cell / 2:.1f}" y="{top - 6}" text-anchor="middle">{heads[j]}</text>')
    parts.append(f'<text x="{left + nh * cell / 2:.1f}" y="{h - 8}" text-anchor="middle">head (rows: layers); '
                 f'max {vmax:.3f}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------ images


def _png_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# A perceptual dark-to-bright colour map (inferno-like), interpolated from a few stops.
_CMAP_STOPS = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66),
                        (245, 125, 21), (250, 193, 39), (252, 255, 164)], float)
_CMAP = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_CMAP_STOPS)), _CMAP_STOPS[:, c])
                  for c in range(3)], 1)


def _valid_box(b) -> bool:
    return b is not None and all(_finite(v) for v in b)


def _dashed_rect(draw, box, colour, under=(255, 255, 255), width: int = 2, dash: int = 6) -> None:
    x1, y1, x2, y2 = box
    draw.rectangle((x1, y1, x2, y2), outline=under, width=width)  # white under the dashes: visible anywhere
    for (ax, ay, bx, by) in ((x1, y1, x2, y1), (x2, y1, x2, y2), (x2, y2, x1, y2), (x1, y2, x1, y1)):
        length = math.hypot(bx - ax, by - ay)
        n = max(1, int(length // dash))
        for i in range(0, n, 2):
            t0, t1 = i / n, min(1.0, (i + 1) / n)
            draw.line((ax + (bx - ax) * t0, ay + (by - ay) * t0, ax + (bx - ax) * t1, ay + (by - ay) * t1),
                      fill=colour, width=width)


def _draw_boxes(img, boxes: dict, transform) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    if _valid_box(boxes.get("gt")):
        _dashed_rect(draw, transform(boxes["gt"]), GT_RGB)
    if _valid_box(boxes.get("greedy")):
        draw.rectangle(transform(boxes["greedy"]), outline=GREEDY_RGB, width=3)
    if _valid_box(boxes.get("selected")):
        draw.rectangle(transform(boxes["selected"]), outline=SELECTED_RGB, width=2)


def crop_view(img, boxes: dict, size: int = 280, max_zoom: float = 8.0):
    """The image cropped around the union of the boxes (with margin), scaled so its longest side is
    `size` (at most `max_zoom` x), with the boxes drawn after scaling (constant line width)."""
    from PIL import Image

    W, H = img.size
    valid = [b for b in boxes.values() if _valid_box(b)]
    if valid:
        a = np.array(valid, float)
        ux1, uy1, ux2, uy2 = a[:, 0].min(), a[:, 1].min(), a[:, 2].max(), a[:, 3].max()
        side = max(ux2 - ux1, uy2 - uy1, 1.0)
        m = max(0.35 * side, 12.0)
        cx1, cy1, cx2, cy2 = ux1 - m, uy1 - m, ux2 + m, uy2 + m  # then at least 48 px a side
        if cx2 - cx1 < 48:
            c = (cx1 + cx2) / 2
            cx1, cx2 = c - 24, c + 24
        if cy2 - cy1 < 48:
            c = (cy1 + cy2) / 2
            cy1, cy2 = c - 24, c + 24
        cx1, cy1 = max(0, int(math.floor(cx1))), max(0, int(math.floor(cy1)))
        cx2, cy2 = min(W, int(math.ceil(cx2))), min(H, int(math.ceil(cy2)))
        if cx2 - cx1 < 2 or cy2 - cy1 < 2:  # boxes outside the image: show all of it
            cx1, cy1, cx2, cy2 = 0, 0, W, H
    else:
        cx1, cy1, cx2, cy2 = 0, 0, W, H
    crop = img.crop((cx1, cy1, cx2, cy2))
    s = min(size / max(crop.size), max_zoom)
    out_size = (max(1, round(crop.width * s)), max(1, round(crop.height * s)))
    resample = Image.Resampling.NEAREST if s > 2 else Image.Resampling.LANCZOS
    view = crop.resize(out_size, resample).convert("RGB")
    _draw_boxes(view, boxes, lambda b: ((b[0] - cx1) * s, (b[1] - cy1) * s, (b[2] - cx1) * s, (b[3] - cy1) * s))
    return view, (cx1, cy1, cx2, cy2)


def heatmap_view(img, heat: np.ndarray, boxes: dict, size: int = 280):
    """`heat` (G, G) over the whole image, bilinearly upsampled and blended over it."""
    from PIL import Image

    W, H = img.size
    s = size / max(W, H)
    out_size = (max(1, round(W * s)), max(1, round(H * s)))
    base = np.asarray(img.resize(out_size, Image.Resampling.LANCZOS).convert("RGB"), float)
    peak = float(heat.max())
    norm = (heat / peak if peak > 0 else np.zeros_like(heat)).astype(np.float32)
    up = np.asarray(Image.fromarray(norm, mode="F").resize(out_size, Image.Resampling.BILINEAR), float)
    up = np.clip(up, 0, 1)
    colour = _CMAP[(up * 255).astype(int)]
    alpha = (0.15 + 0.7 * up)[..., None]
    blended = Image.fromarray((base * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8), "RGB")
    _draw_boxes(blended, {"gt": boxes.get("gt"), "selected": boxes.get("selected")},
                lambda b: (b[0] * s, b[1] * s, b[2] * s, b[3] * s))
    return blended


def mass_in_box(heat: np.ndarray, box, width: float, height: float) -> float | None:
    """Share of the (G, G) map's mass inside `box` (original pixels), cells counted by overlap."""
    if not _valid_box(box) or not (width and height) or heat.sum() <= 0:
        return None
    g_h, g_w = heat.shape
    x1, y1, x2, y2 = box[0] * g_w / width, box[1] * g_h / height, box[2] * g_w / width, box[3] * g_h / height
    cx, cy = np.arange(g_w), np.arange(g_h)
    ox = np.clip(np.minimum(cx + 1, x2) - np.maximum(cx, x1), 0, 1)
    oy = np.clip(np.minimum(cy + 1, y2) - np.maximum(cy, y1), 0, 1)
    return float((heat * oy[:, None] * ox[None, :]).sum() / heat.sum())


# ------------------------------------------------------------------------------------ gallery


@dataclass
class Entry:
    query_id: str
    kind: str  # helps | hurts | same | no_gt
    row: dict
    gain: float | None
    heads_note: str = ""
    images: list[tuple[str, str]] = field(default_factory=list)  # (data uri, alt)
    notes: list[str] = field(default_factory=list)


def greedy_choice(cands: pl.DataFrame) -> pl.DataFrame:
    """Per query the candidate the greedy selector takes (as `selector_rows` does: highest
    score_greedy, i.e. the first candidate with a box), with its box and IoU."""
    col = "score_greedy"
    if col in cands.columns and cands[col].drop_nulls().drop_nans().len() > 0:
        valid = cands.filter(pl.col(col).is_not_null() & pl.col(col).is_not_nan())
        order = valid.sort(["query_id", col, "cand_idx"], descending=[False, True, False])
    else:  # runs without the column: the first candidate with a box
        order = cands.filter(pl.col("status") == "ok").sort(["query_id", "cand_idx"])
    return (order.group_by("query_id", maintain_order=True).first()
            .select("query_id", pl.col("cand_idx").alias("g_idx"), pl.col("x1").alias("g_x1"),
                    pl.col("y1").alias("g_y1"), pl.col("x2").alias("g_x2"), pl.col("y2").alias("g_y2"),
                    pl.col("iou").alias("g_iou")))


def pick_gallery(boxes: pl.DataFrame, cands: pl.DataFrame, max_gallery: int) -> tuple[list[Entry], dict]:
    """Queries whose selected candidate is not greedy's. With ground truth first: the largest IoU
    changes, about half helps and half hurts when both exist; then equal-IoU ones; then queries
    without ground truth. Also returns how many of each kind the whole run has."""
    if boxes.height == 0:
        return [], {"changed": 0, "helps": 0, "hurts": 0, "same": 0, "no_gt": 0}
    changed = (boxes.filter((pl.col("status") == "ok") & pl.col("cand_idx").is_not_null())
               .join(greedy_choice(cands), on="query_id", how="inner")
               .filter(pl.col("g_idx").is_not_null() & (pl.col("cand_idx") != pl.col("g_idx"))))
    rows = changed.to_dicts()
    with_gt, no_gt = [], []
    for r in rows:
        has_gt = _valid_box([r["gt_x1"], r["gt_y1"], r["gt_x2"], r["gt_y2"]]) and _finite(r["iou"])
        if has_gt:
            gain = float(r["iou"]) - (float(r["g_iou"]) if _finite(r["g_iou"]) else 0.0)
            with_gt.append((r, gain))
        else:
            no_gt.append(r)
    helps = sorted([x for x in with_gt if x[1] > EPS], key=lambda x: (-x[1], x[0]["query_id"]))
    hurts = sorted([x for x in with_gt if x[1] < -EPS], key=lambda x: (x[1], x[0]["query_id"]))
    same = sorted([x for x in with_gt if abs(x[1]) <= EPS], key=lambda x: x[0]["query_id"])
    totals = {"changed": len(rows), "helps": len(helps), "hurts": len(hurts), "same": len(same),
              "no_gt": len(no_gt)}
    n = max(0, max_gallery)
    n_help = min(len(helps), (n + 1) // 2)
    n_hurt = min(len(hurts), n - n_help)
    n_help = min(len(helps), n - n_hurt)
    out = [Entry(r["query_id"], "helps", r, g) for r, g in helps[:n_help]]
    out += [Entry(r["query_id"], "hurts", r, g) for r, g in hurts[:n_hurt]]
    room = n - len(out)
    out += [Entry(r["query_id"], "same", r, g) for r, g in same[:room]]
    room = n - len(out)
    out += [Entry(r["query_id"], "no_gt", r, None) for r in sorted(no_gt, key=lambda r: r["query_id"])[:room]]
    return out, totals


def _profile_indices(profile, layers: list[int], heads: list[int]) -> tuple[list[tuple[int, int]], int]:
    """(layer index, head index) positions in the captured lists of the profile's pairs, and how
    many pairs were not captured."""
    lpos, hpos = {l: i for i, l in enumerate(layers)}, {h: i for i, h in enumerate(heads)}
    idx = [(lpos[l], hpos[h]) for l, h in profile.heads if l in lpos and h in hpos]
    return idx, len(profile.heads) - len(idx)


def deciding_heat(attn_row: dict, profile, top_k: int = DEFAULT_TOP_HEADS) -> tuple[np.ndarray | None, str]:
    """Mean over the 4 coordinates and the deciding (layer, head) pairs of a candidate's pooled map
    -> (G, G), with a note that says which heads. None when the row has no usable maps."""
    layers, heads = list(attn_row.get("layers") or []), list(attn_row.get("heads") or [])
    maps, g = attn_row.get("maps"), attn_row.get("map_grid")
    nl, nh = len(layers), len(heads)
    if maps is None or not g or not nl or not nh:
        return None, "no pooled maps for this candidate"
    m = np.asarray(maps, dtype=np.float32)
    if m.size != 4 * nl * nh * g * g:
        return None, f"pooled maps have {m.size} values, expected 4 x {nl} x {nh} x {g} x {g}"
    m = m.reshape(4, nl, nh, g, g)
    note = ""
    idx: list[tuple[int, int]] = []
    if profile is not None:
        idx, missing = _profile_indices(profile, layers, heads)
        if idx:
            note = f"{len(idx)} profile heads" + (f" ({missing} not captured in this run)" if missing else "")
        else:
            note = "none of the profile's heads were captured; "
    if not idx:
        ent = attn_row.get("entropy")
        if ent is not None and len(ent) == 4 * nl * nh:
            mean_ent = np.asarray(ent, float).reshape(4, nl, nh).mean(0)
            flat = np.argsort(np.where(np.isfinite(mean_ent), mean_ent, np.inf), axis=None)[:top_k]
            idx = [(int(i // nh), int(i % nh)) for i in flat]
            note += f"{len(idx)} lowest-entropy heads of this candidate"
        else:
            idx = [(l, h) for l in range(nl) for h in range(nh)]
            note += "all captured heads (no entropy to rank them)"
    li, hi = np.array([i for i, _ in idx]), np.array([j for _, j in idx])
    heat = m[:, li, hi].mean((0, 1)).astype(np.float64)  # (G, G)
    pairs = ", ".join(f"L{layers[a]}H{heads[b]}" for a, b in idx[:12]) + (" ..." if len(idx) > 12 else "")
    return heat, f"{note}: {pairs}"


def _load_image(uri, width, height, boxes: dict, cache: dict, storage_options: dict | None):
    """(RGB image, note). Unreadable images become a grey canvas of the recorded size (or one that
    holds the boxes), with the reason in the note."""
    from PIL import Image

    from .images import read_image

    if uri in cache:
        return cache[uri]
    err = "no image_uri recorded"
    if uri:
        try:
            res = (read_image(uri, storage_options), "")
            if len(cache) >= 8:
                cache.clear()
            cache[uri] = res
            return res
        except Exception as e:  # noqa: BLE001 - any reader failure (ImageError, storage errors) is shown
            err = f"{type(e).__name__}: {e}"
    valid = [b for b in boxes.values() if _valid_box(b)]
    ext_w = max([b[2] for b in valid], default=64.0) * 1.1 + 16
    ext_h = max([b[3] for b in valid], default=64.0) * 1.1 + 16
    w = int(width) if _finite(width) and width > 0 else int(math.ceil(ext_w))
    h = int(height) if _finite(height) and height > 0 else int(math.ceil(ext_h))
    res = (Image.new("RGB", (max(1, w), max(1, h)), (128, 128, 128)),
           f"image unreadable ({err}); boxes drawn on a grey canvas")
    cache[uri] = res
    return res


def render_entries(entries: list[Entry], attn_rows: dict, profile, storage_options: dict | None,
                   have_maps: bool) -> None:
    cache: dict = {}
    for e in entries:
        r = e.row
        boxes = {"gt": [r["gt_x1"], r["gt_y1"], r["gt_x2"], r["gt_y2"]],
                 "greedy": [r["g_x1"], r["g_y1"], r["g_x2"], r["g_y2"]],
                 "selected": [r["x1"], r["y1"], r["x2"], r["y2"]]}
        img, note = _load_image(r.get("image_uri"), r.get("image_width"), r.get("image_height"), boxes, cache,
                                storage_options)
        if note:
            e.notes.append(note)
        view, _ = crop_view(img, boxes)
        e.images.append((_png_uri(view), f"crop of {r['query_id']} with greedy, selected and ground-truth boxes"))
        if not have_maps:
            continue
        arow = attn_rows.get((r["query_id"], int(r["cand_idx"])))
        if arow is None:
            e.notes.append("no attention row for the selected candidate")
            continue
        heat, heads_note = deciding_heat(arow, profile)
        if heat is None:
            e.notes.append(heads_note)
            continue
        e.heads_note = heads_note
        W, H = img.size
        sel_mass, gt_mass = mass_in_box(heat, boxes["selected"], W, H), mass_in_box(heat, boxes["gt"], W, H)
        e.heads_note += f". Attention mass in the selected box {_num(sel_mass, '.0%')}" + (
            f", in the ground truth {_num(gt_mass, '.0%')}" if gt_mass is not None else "")
        e.images.append((_png_uri(heatmap_view(img, heat, boxes)),
                         f"attention of the deciding heads for {r['query_id']}"))


# ------------------------------------------------------------------------------------ HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#222;padding:0 16px;line-height:1.4}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f4f4f4}
td.sel,th.sel,td.ans,th.ans{text-align:left}tr.oracle td{color:#777;font-style:italic}
td.best{background:#d9f2d9;font-weight:bold}.pos{color:#1a7f37}.neg{color:#c62828}.ns{color:#888}td small{display:block;font-size:10px;line-height:1.15;color:#666;max-width:9em;margin-left:auto}
.outcomes{display:flex;flex-wrap:wrap;gap:0 24px;align-items:flex-start}table.landing th{font-weight:normal}
table.landing thead tr:first-child th{font-weight:bold}tr.cands td{border-top:2px solid #999}
.meta td,.meta th{text-align:left}.tag{font-size:11px;background:#eef;border-radius:3px;padding:0 4px}
.plots{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.plot{border:1px solid #eee;padding:8px}.plot h3{font-size:14px;margin:0 0 6px}
.gallery{display:flex;flex-wrap:wrap;gap:16px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;width:560px;font-size:12px}
.card .imgs{display:flex;gap:8px;align-items:flex-start}.card img{max-width:276px;image-rendering:auto}
/* 276: two images and the 8 px gap fill the 560 px card exactly (280 ran into its padding) */
.label{font-weight:bold;font-size:13px;padding:2px 6px;border-radius:3px;color:#fff;display:inline-block}
/* Scoped to the label: the card carries the same kind class, and its grey text is unreadable on the
   label's colour; the card shows its kind by a coloured left edge instead. */
.label.helps{background:#1a7f37}.label.hurts{background:#c62828}.label.same{background:#777}.label.no_gt{background:#555}
.card.helps{border-left:4px solid #1a7f37}.card.hurts{border-left:4px solid #c62828}
.note{color:#8a5a00;background:#fff7e0;padding:4px 8px;border-left:3px solid #e0a800;font-size:13px}
.legend span{display:inline-block;margin-right:16px}.sw{display:inline-block;width:18px;height:0;
vertical-align:middle;margin-right:4px;border-top:3px solid}
"""


def _gain_html(g, vs: dict | None = None, metric: str = "acc50") -> str:
    """The relative gain; under it, from the paired bootstrap (`vs`), its 95% interval and the
    queries won / lost, or "no measurable difference" where the interval of the difference
    crosses zero (then the number is greyed: it is not evidence either way)."""
    if not _finite(g):
        return "–"
    if vs is None:
        cls = "pos" if g > 0 else "neg" if g < 0 else ""
        return f'<span class="{cls}">{g:+.1%}</span>'
    ci = vs["acc_diff_ci"] if metric == "acc50" else vs["miou_diff_ci"]
    if ci is None or ci[0] <= 0 <= ci[1]:
        return f'<span class="ns">{g:+.1%}</span><small>no measurable difference</small>'
    cls = "pos" if ci[0] > 0 else "neg"
    if metric == "acc50" and vs.get("gain_ci"):
        interval = f"[{vs['gain_ci'][0]:+.0%}, {vs['gain_ci'][1]:+.0%}]"
    else:
        interval = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"
    won = f" &middot; {vs['won']}/{vs['lost']}" if metric == "acc50" else ""
    return f'<span class="{cls}">{g:+.1%}</span><small>{interval}{won}</small>'


def table_html(table: list[dict], run_selectors: set[str]) -> str:
    cells = {(r["selector"], r["size_bucket"]): r for r in table}
    selectors = list(dict.fromkeys(r["selector"] for r in table))  # greedy first, oracle last
    best: dict[tuple[str, str], set[str]] = {}
    for b in ALL_BUCKETS:
        for metric in ("acc50", "miou"):
            vals = {s: cells[(s, b)][metric] for s in selectors
                    if s != "oracle" and (s, b) in cells and _finite(cells[(s, b)][metric])}
            if vals:
                top = max(vals.values())
                best[(b, metric)] = {s for s, v in vals.items() if v >= top - 1e-12}
    out = ['<table class="results"><thead><tr><th class="sel" rowspan="2">selector</th>']
    for b in ALL_BUCKETS:
        n = max((cells.get((s, b), {}).get("n", 0) for s in selectors), default=0)
        out.append(f'<th colspan="4">{_t(b)} (n={n})</th>')
    out.append("</tr><tr>" + "<th>Acc@0.5</th><th>gain</th><th>mIoU</th><th>gain</th>" * len(ALL_BUCKETS)
               + "</tr></thead><tbody>")
    for s in selectors:
        tag = ' <span class="tag">run\'s selector</span>' if s in run_selectors else ""
        out.append(f'<tr class="{"oracle" if s == "oracle" else ""}"><td class="sel">{_t(s)}{tag}</td>')
        for b in ALL_BUCKETS:
            r = cells.get((s, b))
            if r is None:
                out.append("<td>–</td>" * 4)
                continue
            for metric, gain in (("acc50", "gain_acc50_vs_greedy"), ("miou", "gain_miou_vs_greedy")):
                cls = ' class="best"' if s in best.get((b, metric), set()) else ""
                g = "baseline" if s == "greedy" else _gain_html(r.get(gain), r.get("vs_greedy"), metric)
                out.append(f"<td{cls}>{_num(r[metric])}</td><td>{g}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


# Cell tints of the landing tables, by outcome: the target green, another object red (the model
# found an object, not the one asked for), near amber, nothing grey; stronger with the share.
OUTCOME_RGB = {"right": (26, 127, 55), "other_instance": (198, 40, 40), "other_object": (198, 40, 40),
               "near": (224, 168, 0), "nowhere": (120, 120, 120), "no_box": (120, 120, 120)}


def outcomes_html(landing: dict) -> str:
    """Where the answers landed: one small table per size bucket (side by side where the page is
    wide enough), a row per selector and per candidate set, the share per outcome with its count."""
    from .evaluate import OUTCOME_HEADERS, outcome_row_name
    from .metrics import OUTCOMES

    tables = []
    for b in ALL_BUCKETS:
        rows = [r for r in landing["rows"] if r["size_bucket"] == b]
        n_q = max((r["n"] for r in rows if r["group"] == "selected"), default=0)
        if not any(r["n"] for r in rows):
            continue
        out = [f'<table class="landing"><thead><tr><th class="ans" colspan="{2 + len(OUTCOMES)}">{_t(b)} '
               f'({n_q} quer{"y" if n_q == 1 else "ies"})</th></tr><tr><th class="ans">answers</th><th>n</th>'
               # Two-word headers on two lines: two bucket tables then fit side by side on the page.
               + "".join(f"<th>{'<br>'.join(map(_t, OUTCOME_HEADERS[o].split()))}</th>" for o in OUTCOMES)
               + "</tr></thead><tbody>"]
        first_cand = True
        for r in rows:
            cls = ""
            if r["group"] == "candidates" and first_cand:
                cls, first_cand = ' class="cands"', False
            out.append(f'<tr{cls}><td class="ans">{_t(outcome_row_name(r))}</td><td>{r["n"]}</td>')
            for o in OUTCOMES:
                share = r["share"][o]
                if not r[o] or share is None:
                    out.append(f"<td>{'0' if r['n'] else '–'}</td>")
                    continue
                rgb = ",".join(map(str, OUTCOME_RGB[o]))
                out.append(f'<td style="background:rgba({rgb},{0.08 + 0.5 * share:.2f})">{share:.0%}'
                           f"<small>{r[o]}</small></td>")
            out.append("</tr>")
        out.append("</tbody></table>")
        tables.append("".join(out))
    return '<div class="outcomes">' + "".join(tables) + "</div>"


OUTCOMES_HOW_TO_READ = """<p>Each answer box read against <em>every</em> object of its image
in {ann} ({source}; {queries} queries{left_out}), the first that holds: <b>right</b> (IoU &ge; 0.5 with the
target, as Acc@0.5); <b>other instance</b> / <b>other object</b> (IoU &ge; 0.3 with another object of the
query's category, a crowd region included / of another category: the model found an object, not the one asked
for); <b>near</b> (IoU &ge; 0.1 with the target: found, badly localised); <b>nowhere</b>; <b>no box</b>. Rows:
each selector's chosen boxes, then greedy's candidate (cand 0) and all sampled candidates. Cells: share of the
row's answers, count below.</p>"""


def _card_html(e: Entry) -> str:
    r = e.row
    sel_name = r.get("selector") or "selector"
    who = "ACS" if str(sel_name).startswith("acs") else sel_name
    label = {"helps": f"{who} helps", "hurts": f"{who} hurts", "same": "same IoU, different box",
             "no_gt": "changed (no ground truth)"}[e.kind]
    if e.kind == "no_gt":
        ious = (f"greedy (cand {r['g_idx']}) vs {_t(sel_name)} (cand {r['cand_idx']}); "
                "no ground truth to score them")
    else:
        ious = (f"greedy (cand {r['g_idx']}) IoU {_num(r['g_iou'] if _finite(r['g_iou']) else 0.0)} &rarr; "
                f"{_t(sel_name)} (cand {r['cand_idx']}) IoU {_num(r['iou'])}, &Delta;IoU {_num(e.gain, '+.3f')}")
    uri = r.get("image_uri") or ""
    bucket = f' &middot; {_t(r["size_bucket"])}' if r.get("size_bucket") else ""
    conf = f"; confidence {_num(r['confidence'], '.2f')}" if _finite(r.get("confidence")) else ""
    imgs = "".join(f'<img src="{src}" alt="{_t(alt)}">' for src, alt in e.images)
    parts = [f'<div class="card {e.kind}"><div><span class="label {e.kind}">{_t(label)}</span> '
             f'<b>{_t(r["query_id"])}</b> &middot; &ldquo;{_t(r.get("category"))}&rdquo;{bucket}</div>',
             f'<div class="imgs">{imgs}</div>', f"<div>{ious}{conf}</div>",
             f'<div style="color:#666" title="{_t(uri)}">image: '
             f'{_t(posixpath.basename(uri.split("#")[0]) or uri)}</div>']
    if e.heads_note:
        parts.append(f'<div style="color:#666">heatmap: {_t(e.heads_note)}</div>')
    parts += [f'<div class="note">{_t(n)}</div>' for n in e.notes]
    parts.append("</div>")
    return "".join(parts)


HOW_TO_READ = """
<p>Each query was answered by sampling several candidate boxes from the model (candidate 0 is the
greedy answer) and one <em>selector</em> picked one of them. The table re-scores the run with every
selector stored in <code>candidates/</code>: Acc@0.5 is the share of queries whose chosen box overlaps
the ground truth with IoU &ge; 0.5, mIoU the mean IoU (queries without a box count as 0), and
<em>gain</em> is the relative change against greedy in the same size bucket (COCO buckets: small
&lt; 32&sup2; px, medium &lt; 96&sup2; px, large otherwise). Under each gain: its 95% interval from a
paired bootstrap over queries (2,000 resamples of the same queries for both selectors) and, for
Acc@0.5, the queries won / lost against greedy; a gain whose interval of the difference crosses
zero is greyed and marked <em>no measurable difference</em>. Green cells are the best non-oracle
selector per bucket; <em>oracle</em> picks the candidate with the highest true IoU and is the ceiling
any selector could reach with these candidates.</p>
<p>The reliability diagram compares ACS-Learned's predicted IoU with the observed IoU per bin of
prediction: points on the diagonal are calibrated, ECE is the count-weighted mean gap. The entropy
curves average each candidate's attention entropy (from its four coordinate tokens onto the image)
per layer: where the high-IoU curve lies clearly below the zero-IoU one, attention at that depth
&ldquo;knows&rdquo; whether the box is right &ndash; those layers carry ACS's signal.</p>
<p>The gallery shows queries where the run's selector chose a different candidate than greedy:
<b>helps</b> when the IoU went up, <b>hurts</b> when it went down. Left: a crop around the
boxes (orange greedy, green selected, blue/white dashed ground truth). Right, when the run was
labelled with <code>--dump-maps</code>: the selected candidate's pooled attention, averaged over the
four coordinate tokens and the deciding heads (the head profile's, or the candidate's lowest-entropy
heads), stretched over the whole image; bright means more attention.</p>
"""


def _header_html(boxes: pl.DataFrame, cands: pl.DataFrame, ev: dict, url: str, have_maps: bool,
                 profile_path: str | None) -> tuple[str, dict]:
    run_ids = sorted(boxes["run_id"].drop_nulls().unique().to_list()) if boxes.height else []
    models = sorted(boxes["model_id"].drop_nulls().unique().to_list()) if boxes.height else []
    selectors = (dict(boxes.group_by("selector").len().drop_nulls("selector").sort("len", descending=True)
                      .iter_rows()) if boxes.height else {})
    status = dict(sorted(boxes.group_by("status").len().iter_rows(), key=lambda kv: -kv[1])) if boxes.height else {}
    ncand = sorted(boxes["n_candidates"].drop_nulls().unique().to_list()) if boxes.height else []
    info = {"run_ids": run_ids, "model_ids": models, "queries": boxes.height, "candidates": cands.height,
            "status": status, "selectors_in_run": list(selectors)}
    rows = [("run", _t(url)), ("run id(s)", _t(", ".join(run_ids) or "–")), ("model", _t(", ".join(models) or "–")),
            ("queries", f"{boxes.height} ({ev.get('queries_with_gt', 0)} with ground truth)"),
            ("candidates", f"{cands.height}" + (f" ({', '.join(map(str, ncand))} per query)" if ncand else "")),
            ("status", ", ".join(f'<span title="{_t(QUERY_STATUS.get(k, ""))}">{_t(k)}: {v}</span>'
                                 for k, v in status.items()) or "–"),
            ("selector", ", ".join(f"<b>{_t(k)}</b>" + (f" ({v} queries)" if len(selectors) > 1 else "")
                                   for k, v in selectors.items()) or "–")]
    ap = ev.get("coco_ap")
    if ap:
        rows.append(("COCO AP of the selected boxes",
                     f"AP {_num(ap.get('AP'))}, AP50 {_num(ap.get('AP50'))}, AP_small {_num(ap.get('AP_small'))} "
                     "(confidence as score)"))
    lq = ev.get("label_quality")
    if lq:
        cells = {(r["threshold"], r["size_bucket"]): r for r in lq["rows"]}
        parts = []
        for t in dict.fromkeys(r["threshold"] for r in lq["rows"]):
            a, sm = cells[(t, "all")], cells[(t, "small")]
            parts.append(f"&ge; {t:g}: kept {a['kept']}/{a['n']}, precision {_num(a['precision'])}, recall "
                         f"{_num(a['recall'])} (small: {sm['kept']}/{sm['n']}, {_num(sm['precision'])}, "
                         f"{_num(sm['recall'])})")
        rows.append((f"labels kept by {_t(lq['by'])}", "<br>".join(parts)))
    nb = ev.get("no_box_share")
    if nb:
        rows.append(("no-box share", f"greedy {_num(nb.get('greedy'))}, sampled {_num(nb.get('sampled'))}"))
    rows.append(("pooled maps", "yes (--dump-maps)" if have_maps else "no"))
    if profile_path:
        rows.append(("head profile", _t(posixpath.basename(str(profile_path)))))
    body = "".join(f'<tr><th>{k}</th><td>{v}</td></tr>' for k, v in rows)
    return f'<table class="meta">{body}</table>', info


def _write_text(output: str, text: str, storage_options: dict | None) -> None:
    fs, path = fsspec.core.url_to_fs(output, **(storage_options or {}))
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else [fs.protocol]
    data = text.encode("utf-8")
    if "file" in protocols or "local" in protocols:
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def _table_fallback(boxes: pl.DataFrame, cands: pl.DataFrame) -> dict:
    from .evaluate import selector_rows
    from .metrics import pearson, reliability, selector_table, spearman

    out: dict = {}
    with_gt = boxes.filter(pl.col("gt_x1").is_not_null())
    out["queries_with_gt"] = with_gt.height
    if with_gt.height:
        out["table"] = selector_table(selector_rows(with_gt, cands))
    ok = cands.filter((pl.col("status") == "ok") & pl.col("score_acs_learned").is_not_null()
                      & pl.col("iou").is_not_null())
    if ok.height > 1:
        p, t = ok["score_acs_learned"].to_numpy(), ok["iou"].to_numpy()
        out["regressor"] = {"pearson": pearson(p, t), "spearman": spearman(p, t), "n": int(len(p)),
                            "reliability": reliability(p, t)}
    return out


def build_report(url: str, output: str, profile_path: str | None = None, max_gallery: int = 24,
                 storage_options: dict | None = None, regressor_path: str | None = None,
                 markdown: str | None = None) -> dict:
    """Write the HTML report of the run at `url` to `output`; returns a JSON-serialisable summary.
    With a calibrated profile it adds ACS-Free by head count; with `regressor_path` and pooled maps
    the regressor's saliency by layer and head; `markdown` also writes these analyses as tables."""
    from .analysis import (head_count_curve, head_curve_markdown, layer_curves_markdown, ranking_from_profile,
                           regressor_saliency, saliency_markdown, selected_size, selected_size_markdown)
    from .calibrate import layer_curves
    from .evaluate import evaluate_run, format_outcomes
    from .scoring import HeadProfile

    profile = HeadProfile.load(profile_path) if profile_path else None
    boxes, cands = load_tables(url, storage_options)
    if boxes.height == 0:
        raise ValueError(f"{url}: no rows in boxes/ (is this the output prefix of a labelled run?)")
    notes: list[str] = []
    try:
        ev = evaluate_run(url, storage_options=storage_options)
    except Exception as e:  # noqa: BLE001 - the page still renders; the failure is shown on it
        notes.append(f"evaluate_run failed ({type(e).__name__}: {e}); table computed without COCO AP")
        ev = _table_fallback(boxes, cands)

    # Attention: entropies of every candidate (for the layer curves); which columns exist.
    fs, attn_files = _parquet_files(url, "attention", storage_options)
    attn_cols: set[str] = set()
    for p in attn_files:
        with fs.open(p, "rb") as f:
            attn_cols |= set(pq.ParquetFile(f).schema_arrow.names)
    need_curves = bool(attn_files) and ev.get("queries_with_gt", 0) > 0  # the curves group by true IoU
    ent = read_columns(url, "attention", ["query_id", "cand_idx", "layers", "heads", "entropy"],
                       storage_options=storage_options) if need_curves else pl.DataFrame()

    curves, curve_layers, head_curve, saliency = None, [], None, None
    if ent.height and "iou" in cands.columns:
        layers, heads = ent["layers"][0].to_list(), ent["heads"][0].to_list()
        size = 4 * len(layers) * len(heads)
        joined = (ent.filter(pl.col("entropy").list.len() == size)
                  .join(cands.select("query_id", pl.col("cand_idx").cast(ent.schema["cand_idx"]), "iou", "status"),
                        on=["query_id", "cand_idx"])
                  .filter((pl.col("status") == "ok") & pl.col("iou").is_not_null()))
        if ent.filter(pl.col("entropy").list.len() != size).height:
            notes.append("some attention rows captured other layers/heads than the first; left out of the curves")
        if joined.height:
            e = np.stack(joined["entropy"].to_numpy()).astype(np.float64).reshape(
                joined.height, 4, len(layers), len(heads))
            curves, curve_layers = layer_curves(joined.drop("entropy"), e), [int(x) for x in layers]
            ranking = ranking_from_profile(profile.meta, layers, heads) if profile else None
            if ranking is not None and np.isfinite(ranking).any():
                queries = boxes.filter(pl.col("size_bucket").is_not_null()).select("query_id", "size_bucket")
                head_curve = head_count_curve(joined.drop("entropy"), e, ranking, queries)

    # Gallery: choose, then read only the selected candidates' attention rows (with maps if any).
    entries, totals = pick_gallery(boxes, cands, max_gallery)
    have_maps = "maps" in attn_cols
    attn_rows: dict = {}
    if entries and attn_files:
        keys = pl.DataFrame({"query_id": [e.query_id for e in entries],
                             "cand_idx": [int(e.row["cand_idx"]) for e in entries]},
                            schema={"query_id": pl.String, "cand_idx": pl.Int32})
        cols = ["query_id", "cand_idx", "layers", "heads", "entropy", "map_grid", "maps"]
        sel = read_columns(url, "attention", cols, keys, storage_options)
        if have_maps and "maps" in sel.columns and sel["maps"].null_count() == sel.height:
            have_maps = False
        attn_rows = {(r["query_id"], int(r["cand_idx"])): r for r in sel.to_dicts()}
    render_entries(entries, attn_rows, profile, storage_options, have_maps)
    if "maps" not in attn_cols:
        maps_note = ("This run has no pooled attention maps (label with --dump-maps to get them), so the "
                     "gallery shows no heatmaps.")
    elif not have_maps:
        maps_note = "The gallery's selected candidates have no pooled attention maps, so it shows no heatmaps."
    else:
        maps_note = ""

    if regressor_path and "maps" in attn_cols:
        try:
            saliency = regressor_saliency(url, regressor_path, storage_options, max_rows=4000)
        except ValueError as e:
            notes.append(f"no regressor saliency: {e}")

    run_selectors = set(boxes["selector"].drop_nulls().unique().to_list())
    header, info = _header_html(boxes, cands, ev, url, have_maps, profile_path)
    table = ev.get("table") or []
    sizes = selected_size(boxes.filter(pl.col("gt_x1").is_not_null()), cands) if table else []
    order = list(dict.fromkeys(r["selector"] for r in table))  # the accuracy table's order
    sizes.sort(key=lambda r: order.index(r["selector"]) if r["selector"] in order else len(order))

    # ---- page
    title = f"ACS report: {', '.join(info['run_ids']) or url}"
    page = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{_t(title)}</title>", f"<style>{CSS}</style></head><body>",
            f"<h1>{_t(title)}</h1>", header]
    page += [f'<div class="note">{_t(n)}</div>' for n in notes]
    page.append("<h2>Selectors by object size</h2>")
    if table:
        page.append(table_html(table, run_selectors))
        page.append("<h3>Chosen box area over the object's (median per query; 1 = the object's size)</h3>"
                    "<table><tr><th>selector</th>" + "".join(f"<th>{b}</th>" for b in ("small", "medium", "large", "all"))
                    + "</tr>" + "".join(
                        f"<tr><td>{_t(r['selector'])}</td>" + "".join(
                            f"<td>{'-' if r[b] is None else format(r[b], '.2f')}</td>"
                            for b in ("small", "medium", "large", "all")) + "</tr>" for r in sizes) + "</table>")
        page.append("<h2>Where the answers landed</h2>")
        landing = ev.get("outcomes")
        if landing:
            k = landing["queries_left_out"]
            left_out = f", {k} without a match left out" if k else ""
            page.append(OUTCOMES_HOW_TO_READ.format(ann=_t(posixpath.basename(landing["annotations"])),
                                                    source=_t(landing["source"]), queries=landing["queries"],
                                                    left_out=left_out))
            page.append(outcomes_html(landing))
        else:
            page.append(f'<div class="note">Not computed: {_t(ev.get("outcomes_note") or "evaluate_run failed")}'
                        "</div>")
    else:
        page.append(f'<div class="note">{_t(ev.get("note") or "no ground truth in this run: no accuracy table")}'
                    "</div>")

    plots = []
    page.append('<h2>Plots</h2><div class="plots">')
    if table:
        page.append('<div class="plot"><h3>Acc@0.5 by size bucket</h3>' + svg_bars(table) + "</div>")
        plots.append("acc50_by_bucket")
    reg = ev.get("regressor")
    if reg:
        page.append('<div class="plot"><h3>Predicted IoU reliability (ACS-Learned)</h3>'
                    + svg_reliability(reg["reliability"], reg) + "</div>")
        plots.append("reliability")
    if curves:
        page.append('<div class="plot"><h3>Mean attention entropy by layer</h3>'
                    + svg_layer_curves(curves, curve_layers) + "</div>")
        plots.append("entropy_by_layer")
    greedy_acc = {b: r["acc50"] for r in table for b in ("all", "small")
                  if r["selector"] == "greedy" and r["size_bucket"] == b}
    if head_curve:
        page.append('<div class="plot"><h3>ACS-Free by number of heads</h3>' + svg_head_curve(head_curve, greedy_acc)
                    + "</div>")
        plots.append("acs_free_by_head_count")
    if saliency is not None:
        page.append('<div class="plot"><h3>Regressor saliency by layer and head</h3>'
                    + svg_head_heatmap(saliency[0], saliency[1], saliency[2], "regressor saliency by layer and head")
                    + "</div>")
        plots.append("regressor_saliency")
    page.append("</div>")
    if not reg:
        page.append('<div class="note">No ACS-Learned scores in this run (no regressor): no reliability '
                    "diagram.</div>")
    if not curves:
        page.append('<div class="note">No attention entropies with ground-truth IoU in this run: no '
                    "entropy-by-layer curves.</div>")

    counts = {k: sum(e.kind == k for e in entries) for k in ("helps", "hurts", "same", "no_gt")}
    page.append("<h2>Gallery: where the selector changed greedy's answer</h2>")
    page.append(f"<p>The run's selector chose another candidate than greedy on {totals['changed']} of "
                f"{boxes.height} queries: {totals['helps']} with a higher IoU (helps), {totals['hurts']} with a "
                f"lower one (hurts), {totals['same']} with the same IoU, {totals['no_gt']} without ground truth. "
                f"Shown: {len(entries)} ({counts['helps']} helps, {counts['hurts']} hurts), the largest IoU "
                "changes first.</p>")
    page.append('<div class="legend"><span><i class="sw" style="border-color:rgb(255,140,0)"></i>greedy</span>'
                '<span><i class="sw" style="border-color:rgb(0,200,70)"></i>selected</span>'
                '<span><i class="sw" style="border-color:rgb(30,144,255);border-top-style:dashed"></i>'
                "ground truth</span></div>")
    if maps_note:
        page.append(f'<div class="note">{_t(maps_note)}</div>')
    if not entries:
        page.append('<div class="note">No query where the run\'s selector chose another candidate than greedy'
                    + (" (gallery disabled: --max-gallery 0)" if max_gallery <= 0 else "") + ".</div>")
    page.append('<div class="gallery">' + "".join(_card_html(e) for e in entries) + "</div>")
    page.append("<h2>How to read this</h2>" + HOW_TO_READ)
    page.append("</body></html>")
    text = "\n".join(page)
    _write_text(output, text, storage_options)
    if markdown:
        md = [f"# Analyses of {url}", ""]
        if head_curve:
            md += ["## ACS-Free by number of heads (ranked on calib)", "", head_curve_markdown(head_curve), ""]
        if curves:
            md += ["## Mean attention entropy by layer", "", layer_curves_markdown(curves, curve_layers), ""]
        if saliency is not None:
            md += ["## Regressor saliency by layer", "", saliency_markdown(*saliency), ""]
        if sizes:
            md += ["## Chosen box area over the object's (median per query)", "", selected_size_markdown(sizes), ""]
        if ev.get("outcomes"):
            md += ["## Where the answers landed", "", format_outcomes(ev["outcomes"]), ""]
        _write_text(markdown, "\n".join(md), storage_options)

    n_png = text.count('src="data:image/png;base64,')
    reliability_ece = reg["reliability"]["ece"] if reg else None
    return {
        "output": output, **info, "queries_with_gt": int(ev.get("queries_with_gt", 0)),
        "table_selectors": list(dict.fromkeys(r["selector"] for r in table)),
        "gallery": len(entries), "gallery_helps": counts["helps"], "gallery_hurts": counts["hurts"],
        "gallery_same_iou": counts["same"], "gallery_no_gt": counts["no_gt"],
        "gallery_queries": [e.query_id for e in entries],
        "changed_queries": totals,
        "heatmaps": sum(len(e.images) > 1 for e in entries), "png_images": n_png,
        "has_maps": have_maps, "plots": plots, "head_curve": head_curve, "selected_size": sizes,
        "outcomes_queries": (ev.get("outcomes") or {}).get("queries"),
        "ece": None if reliability_ece is None or not math.isfinite(reliability_ece) else float(reliability_ece),
        "notes": notes + ([maps_note] if maps_note else []), "bytes": len(text.encode("utf-8")),
    }
