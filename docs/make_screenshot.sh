#!/usr/bin/env bash
# Regenerates docs/report.png, the README's picture of the demo's HTML report: a small demo run
# (6 images) with the shipped organism, its report opened in headless Chromium, cropped to the
# table, the plots and the first gallery cards, and shrunk. Rerun it after the organism changes.
#
#   docs/make_screenshot.sh [REPORT.html]     (default: the report of a fresh 6-image demo run)
#
# Needs `chromium` (apt-get install chromium) and the project's .venv (make install).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out/report-shot}  # the demo's output folder (resumes; relabels if the organism changed)
CARDS=${CARDS:-2}            # gallery cards kept in the picture, of each kind (helps, hurts)
WIDTH=${WIDTH:-1000}         # width of the PNG written
COLOURS=${COLOURS:-128}      # palette size of the PNG written (128 keeps it under 200 KB)

command -v chromium >/dev/null || { echo "make_screenshot: needs chromium (apt-get install chromium)" >&2; exit 1; }
if [ $# -ge 1 ]; then
    report=$1
else
    "$PY" -m jobs.demo --out "$OUT" --n-images 6
    report=$OUT/report.html
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A copy of the page without the run's metadata table (paths, ids), the gallery cut to the first
# CARDS cards where ACS helps and CARDS where it hurts, and nothing after it: results only.
"$PY" - "$report" "$work/page.html" "$CARDS" <<'EOF'
import sys
src, dst, cards = sys.argv[1], sys.argv[2], int(sys.argv[3])
beyond = ", ".join(" ~ ".join([f".card.{k}"] * (cards + 1)) for k in ("helps", "hurts"))
css = ("<style>table.meta, .gallery~*, .card.same, .card.no_gt"
       f", {beyond}{{display:none}}</style>")
open(dst, "w").write(open(src).read().replace("</head>", css + "</head>", 1))
EOF
# 1212 px = the report's 1180 px column plus its padding; the height is cut to the content below.
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run --disable-extensions \
    --user-data-dir="$work/profile" --window-size=1212,4000 --virtual-time-budget=10000 \
    --screenshot="$work/full.png" "file://$(realpath "$work/page.html")" 2>/dev/null
"$PY" - "$work/full.png" docs/report.png "$WIDTH" "$COLOURS" <<'EOF'
import sys
import numpy as np
from PIL import Image
src, dst, width, colours = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
img = Image.open(src).convert("RGB")
rows = np.flatnonzero((np.asarray(img) < 245).any(axis=(1, 2)))
img = img.crop((0, 0, img.width, min(img.height, int(rows.max()) + 24)))
img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
# A palette (COLOURS) keeps the file small; the heatmaps' gradients survive it with dithering.
img.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(
    dst, optimize=True)
print(f"wrote {dst}: {img.width}x{img.height}")
EOF
ls -l docs/report.png
