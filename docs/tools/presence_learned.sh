#!/usr/bin/env bash
# Issue 31's "nothing here" with the learned presence score against the SRM-peak score, on one
# run (a copy of it carries the SRM-peak gate, so RUN keeps the learned one). Writes OUT/
# {val,test,test_shifted}_{learned,top}/ and OUT/results.md (docs/tools/presence_summary.py).
#   docs/tools/presence_learned.sh RUN OUT
set -euo pipefail
run=${1:?usage: docs/tools/presence_learned.sh RUN OUT}
out=${2:?usage: docs/tools/presence_learned.sh RUN OUT}
top=$(mktemp -d)/run
cp -r "$run" "$top" && rm -f "$top/presence.json"
shifted_pos=kvasir:test@hue+kvasir:test@jpeg20+kvasir:test@border+kvasir:test@crop256
shifted_neg=kvasir:test@negative@hue+kvasir:test@negative@jpeg20+kvasir:test@negative@border
alignsam presence "$run" --fit-positives kvasir:train kvasir:train@crop256 \
    --fit-negatives kvasir:train@negative --positives kvasir:val --negatives kvasir:val@negative \
    --choose --out "$out/val_learned" --no-progress
alignsam presence "$top" --positives kvasir:val --negatives kvasir:val@negative --choose \
    --out "$out/val_top" --no-progress
for r in learned top; do
  folder=$run; [ $r = top ] && folder=$top
  alignsam presence "$folder" --positives kvasir:test --negatives kvasir:test@negative \
      --out "$out/test_$r" --no-progress
  alignsam presence "$folder" --positives "$shifted_pos" --negatives "$shifted_neg" \
      --out "$out/test_shifted_$r" --no-progress
done
python docs/tools/presence_summary.py "$out"
