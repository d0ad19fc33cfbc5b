"""`acs report` as a browser shows it: headless Chromium (Debian's `chromium`, which `.ci/run`
installs) opens the report of tests/test_report.py's hand-made run with pooled maps (no model),
runs a probe script on the loaded page, dumps the DOM and takes a screenshot.

The string checks of test_report.py cannot see what a browser does with the page: whether the
embedded PNGs decode, whether the SVG plots lay out inside their boxes, what the CSS paints.
"""

import html
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from pipeline.schema import SELECTOR_COLUMNS

from test_report import make_run  # tests/ is on sys.path (rootdir conftest, no package)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("ACS_REQUIRE_BROWSER"):
    # CI sets this: there a missing browser is a broken setup, not a reason to skip.
    raise RuntimeError("ACS_REQUIRE_BROWSER is set but no `chromium` on PATH (apt-get install chromium)")
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="needs headless Chromium on PATH: apt-get install chromium (.ci/run does)")

WIDTH, HEIGHT = 1280, 3200  # tall enough for the whole page of the 6-query run

# Runs after `load` (every <img> fetched and decoded, or failed) and writes what it measured into
# the page, where --dump-dom shows it. Text boxes are compared in screen space (getBoundingClientRect),
# so rotated axis labels count too.
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const svgs = [...document.querySelectorAll("svg")];
  const clipped = [];
  for (const svg of svgs) {
    const box = svg.getBoundingClientRect();
    for (const t of svg.querySelectorAll("text")) {
      const r = t.getBoundingClientRect();
      if (r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 || r.bottom > box.bottom + 1)
        clipped.push(t.textContent);
    }
  }
  const bg = el => getComputedStyle(el).backgroundColor;
  const probe = {
    images: imgs.length,
    decoded: imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length,
    shown: imgs.filter(i => i.getBoundingClientRect().width > 0).length,
    svgs: svgs.map(s => ({label: s.getAttribute("aria-label"), width: s.getBoundingClientRect().width,
                          marks: s.querySelectorAll("rect, polyline, circle").length})),
    clipped,
    selectors: [...document.querySelectorAll("td.sel")].map(td => td.firstChild.textContent.trim()),
    cards: [...document.querySelectorAll(".card")].map(c => ({cls: c.className, bg: bg(c),
                                                              label_bg: bg(c.querySelector(".label"))})),
  };
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(probe);
  document.body.appendChild(pre);
});
</script>"""


def chromium(tmp, *args) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-extensions", f"--user-data-dir={tmp / 'chromium-profile'}", f"--window-size={WIDTH},{HEIGHT}",
           # Virtual time: the dump/screenshot is taken once the page is idle, not after a wall-clock guess.
           "--virtual-time-budget=10000", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"chromium failed ({r.returncode}): {r.stderr[-2000:]}"
    return r


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from pipeline.report import build_report

    root = tmp_path_factory.mktemp("browser")
    run = make_run(root, dump_maps=True, learned=True)
    out = root / "report.html"
    summary = build_report(str(run), str(out))
    # The page test_report.py checks as text: 4 gallery cards with a heatmap each, all three plots.
    assert (summary["gallery"], summary["heatmaps"], summary["png_images"]) == (4, 4, 8)
    assert summary["plots"] == ["acc50_by_bucket", "reliability", "entropy_by_layer"]
    return out, summary


def test_report_renders_in_chromium(report, tmp_path):
    out, summary = report
    probed = tmp_path / "probed.html"
    probed.write_text(out.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium(tmp_path, "--dump-dom", probed.as_uri()).stdout
    assert dom.count('<img src="data:image/png;base64,') == summary["png_images"] == 8
    assert '<pre id="probe">' in dom, "the probe did not run: the page never finished loading"
    probe = json.loads(html.unescape(dom.split('<pre id="probe">', 1)[1].split("</pre>", 1)[0]))

    # Every embedded PNG decoded and is laid out (a broken data: URI has naturalWidth 0).
    assert probe["images"] == probe["decoded"] == probe["shown"] == 8
    # The three SVG plots are drawn with their marks (bars, points, curves) and nothing clipped.
    labels = [s["label"] for s in probe["svgs"]]
    assert len(labels) == 3 and all(s["width"] > 200 for s in probe["svgs"]), probe["svgs"]
    assert all(s["marks"] >= 8 for s in probe["svgs"]), probe["svgs"]
    assert probe["clipped"] == [], f"SVG text outside its plot: {probe['clipped']}"
    # The selector table: one row per selector, greedy first and oracle last.
    assert probe["selectors"][0] == "greedy" and probe["selectors"][-1] == "oracle"
    assert sorted(probe["selectors"]) == sorted(SELECTOR_COLUMNS)
    # Cards: the kind is painted on the label, not over the whole card (whose grey text it would hide).
    kinds = [c["cls"] for c in probe["cards"]]
    assert kinds == ["card helps", "card helps", "card hurts", "card no_gt"], kinds
    for c in probe["cards"]:
        assert c["bg"] in ("rgba(0, 0, 0, 0)", "rgb(255, 255, 255)"), c
    assert probe["cards"][0]["label_bg"] == "rgb(26, 127, 55)" and probe["cards"][2]["label_bg"] == "rgb(198, 40, 40)"


def test_report_screenshot_is_not_blank(report, tmp_path):
    out, _ = report
    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", out.as_uri())
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (HEIGHT, WIDTH, 3)
    ink = (img < 245).any(axis=2)
    # Text, table, plots and the gallery cover a real part of the page...
    assert ink.mean() > 0.05, f"only {ink.mean():.1%} of the screenshot is not white"
    # ...and the noisy gallery images and heatmap overlays bring their colours: this page shows about
    # 200,000 distinct ones, the same page with its 8 PNGs broken about 2,400 (antialiased text).
    colours = np.unique(img.reshape(-1, 3), axis=0).shape[0]
    assert colours > 20_000, f"{colours} distinct colours: did the images render?"
    # The gallery is below the plots: ink in the lower half of the page as well.
    rows = np.flatnonzero(ink.any(axis=1))
    assert rows.max() > HEIGHT // 3, f"page ends at y={rows.max()}"


def probe_page(tmp, body: str) -> dict:
    """Opens a page of `body` with the probe; returns what the probe measured."""
    page = tmp / "page.html"
    page.write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>{body}{PROBE}</body></html>')
    dom = chromium(tmp, "--dump-dom", page.as_uri()).stdout
    assert '<pre id="probe">' in dom, "the probe did not run: the page never finished loading"
    return json.loads(html.unescape(dom.split('<pre id="probe">', 1)[1].split("</pre>", 1)[0]))


def test_entropy_legend_fits_large_counts(tmp_path):
    # A real run has thousands of candidates per IoU group: the legend's "n=..." must stay inside the
    # SVG (it used to be clipped after the first digit of a 3-digit count).
    from pipeline.report import svg_layer_curves

    curve = [4.5, 4.1, 3.3, 2.7, 2.5, 2.3, 2.3, 2.6]
    curves = {name: {"n": n, "mean_entropy": [v + d for v in curve]}
              for (name, n), d in zip({"high (IoU >= 0.5)": 1234, "low (0 < IoU < 0.5)": 123456,
                                       "zero (IoU = 0)": 98765}.items(), (0.0, 0.1, 0.2))}
    probe = probe_page(tmp_path, svg_layer_curves(curves, list(range(8))))
    assert len(probe["svgs"]) == 1 and probe["svgs"][0]["marks"] == 3 + 3 * 8  # 3 curves, 8 points each
    assert probe["clipped"] == [], f"SVG text outside its plot: {probe['clipped']}"
