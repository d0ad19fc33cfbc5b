#!/usr/bin/env bash
# Reproduce docs/results.md: fit the head profile (with the loc-heads baseline's heads) and the
# regressor on shapes train/calib only, then report on shapes/test and shapes-shift/test
# (transfer), with paired bootstrap intervals, label quality and the analyses. Sizes are
# arguments so a quick check and the full run share one script. The defaults are the full
# protocol of issue 17: train images give ~3.1 queries each (640 gave 1,969 regressor queries, so
# 680 -> ~2,090) and test images ~3.0 (210 -> ~630 test queries, ~290 small, per variant). The
# temperature is the model's own (acs_model.json, chosen on calib) unless TEMPERATURE is set.
# Wall time per stage: OUT/timing.txt.
#   bash benchmarks/results.sh [N_TRAIN_IMAGES] [N_CALIB_IMAGES] [N_TEST_IMAGES] [OUT]
set -euo pipefail
NTRAIN=${1:-680}; NCALIB=${2:-100}; NTEST=${3:-210}; OUT=${4:-out/results}
MODEL=${MODEL:-organism}; N=${N:-10}; T=${TEMPERATURE:-}  # empty: the model's own
ACS="${PY:-python} -m jobs.cli"  # PY=.venv/bin/python without an activated venv
mkdir -p "$OUT"
t0=$SECONDS
stage() { echo "$1: $((SECONDS - t0)) s" | tee -a "$OUT/timing.txt" >&2; }
echo "# results.sh $NTRAIN $NCALIB $NTEST (T ${T:-model default}, N $N, model $MODEL), $(date -u +%FT%TZ)" >> "$OUT/timing.txt"
for spec in "shapes train $NTRAIN" "shapes calib $NCALIB" "shapes test $NTEST" "shapes-shift test $NTEST"; do
  set -- $spec
  [ -f "$OUT/data/$1-$2/annotations.json" ] || $ACS make-synthetic --out "$OUT/data/$1-$2" --variant "$1" --split "$2" --n "$3" --seed 0
done
label() {  # label DATA RUN [extra args]
  local data=$1 run=$2; shift 2
  $ACS label --coco "$OUT/data/$data/annotations.json" --images "$OUT/data/$data" --output "$OUT/runs/$run" \
    --model "$MODEL" --num-candidates "$N" ${T:+--temperature "$T"} --no-progress --shard-size 128 "$@"
}
# 1. train/calib runs with pooled maps (no profile/regressor yet: default profile)
label shapes-train train --dump-maps --selector acs-free --profile "" --regressor ""
label shapes-calib calib --dump-maps --selector acs-free --profile "" --regressor ""
stage "label train + calib"
# 2. fit on train/calib only
$ACS calibrate "$OUT/runs/calib" --output "$OUT/head_profile.json"
$ACS train-regressor "$OUT/runs/train" --calib "$OUT/runs/calib" --output "$OUT/regressor"
$ACS calibrate "$OUT/runs/calib" --method saliency --regressor "$OUT/regressor" --output "$OUT/head_profile_saliency.json"
stage "fit profile + regressor"
# 3. test on both variants with the fitted profile and regressor
for data in shapes-test shapes-shift-test; do
  # pooled maps on test too: the report overlays the deciding heads' attention in its gallery
  label "$data" "$data" --profile "$OUT/head_profile.json" --regressor "$OUT/regressor" --selector acs-learned --dump-maps
  $ACS evaluate "$OUT/runs/$data" --markdown "$OUT/$data.md"
  $ACS report "$OUT/runs/$data" --output "$OUT/$data.html" --profile "$OUT/head_profile.json" --regressor "$OUT/regressor" \
    --markdown "$OUT/$data.analysis.md"
  stage "test $data"
done
