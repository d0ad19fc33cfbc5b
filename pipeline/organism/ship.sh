#!/usr/bin/env bash
# Ship a training run's checkpoint as the organism, with everything fitted to it, in one go:
#   1. premise metrics of RUN/ckpt on calib per temperature, appended to RUN's log (the card reads
#      them; the temperature with the most oracle room on small objects is chosen);
#   2. export to pipeline/assets/organism (bf16 weights and the card made from the log);
#   3. the results protocol (benchmarks/results.sh, its full default sizes unless given) at the
#      chosen temperature, whose head profile (with localization heads) and regressor, fitted on
#      train/calib only, ship beside the weights;
#   4. make demo (its report) and the README screenshot.
# Then update the card template's prose and docs/results.md from the printed numbers.
#
#   bash pipeline/organism/ship.sh RUN [N_TRAIN N_CALIB N_TEST OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${1:?usage: ship.sh RUN [N_TRAIN N_CALIB N_TEST OUT]}
NTRAIN=${2:-}; NCALIB=${3:-}; NTEST=${4:-}; OUT=${5:-out/results}  # empty: results.sh's defaults
PY=${PY:-.venv/bin/python}
export PY  # results.sh runs the CLI with it
ASSET=pipeline/assets/organism
[ -f "$RUN/ckpt/state.json" ] || { echo "ship.sh: $RUN has no checkpoint" >&2; exit 2; }
# `acs train-organism` or `python -m jobs.train_organism`, on this run and not on one whose name starts with it
if pgrep -f "train[-_]organism.*--out ${RUN%/}( |/|$)" >/dev/null; then
  echo "ship.sh: training still runs on $RUN; stop it first (it resumes from its checkpoint)" >&2; exit 2
fi
start=$SECONDS

T=$("$PY" - "$RUN" <<'EOF'
import json, sys
from pathlib import Path
from pipeline.organism.probes import checkpoint_premise
from pipeline.organism.recipe import choose_temperature
run = Path(sys.argv[1])
res = checkpoint_premise(str(run / "ckpt"))
rec = {"step": res["step"], "premise": res["premise (shapes/calib)"], "source": "checkpoint_premise",
       "image_dependence": res["image_dependence"]}
with open(run / "train_log.jsonl", "a") as f:
    f.write(json.dumps(rec) + "\n")
for t, p in rec["premise"].items():
    g, o = p["greedy"], p["oracle"]
    print(f"T {t}: greedy s/m/l {g['small']['acc50']:.3f}/{g['medium']['acc50']:.3f}/{g['large']['acc50']:.3f}, "
          f"best-of-10 {o['small']['acc50']:.3f}/{o['medium']['acc50']:.3f}/{o['large']['acc50']:.3f}, "
          f"room small {p['oracle_room_small']:.3f}", file=sys.stderr)
print(choose_temperature(rec["premise"]))
EOF
)
echo "ship.sh: chosen temperature $T ($((SECONDS - start)) s)" >&2
"$PY" -m jobs.train_organism --out "$RUN" --export "$ASSET"
rm -rf "$OUT/runs"  # the model changed: relabel everything
TEMPERATURE=$T bash benchmarks/results.sh "$NTRAIN" "$NCALIB" "$NTEST" "$OUT"
cp "$OUT/head_profile.json" "$ASSET/head_profile.json"
rm -rf "$ASSET/regressor" && cp -r "$OUT/regressor" "$ASSET/regressor"
echo "ship.sh: results protocol done ($((SECONDS - start)) s)" >&2
make demo
bash docs/make_screenshot.sh out/demo/report.html
echo "ship.sh: shipped $RUN at T $T in $((SECONDS - start)) s; now update the card template and docs/results.md" >&2
