#!/usr/bin/env bash
# Issue 31's measurements: the agent of RUN on Kvasir `test` and on its shifts, without and
# with `alignsam adapt` on the (unlabelled) images of each set, and its presence threshold on
# images without a polyp. Writes docs/results/unseen/ (summary: docs/tools/unseen_summary.py,
# benchmarks.md).
#   docs/tools/unseen.sh RUN [SET...]      (default sets: test and five shifts of it)
set -euo pipefail
run=${1:?usage: docs/tools/unseen.sh RUN [SET...]}
shift
sets=("$@")
[ ${#sets[@]} -gt 0 ] || sets=(kvasir:test kvasir:test@hue kvasir:test@jpeg20 kvasir:test@border kvasir:test@crop256 kvasir:test@blur)
out=docs/results/unseen
adapted=runs/unseen
for spec in "${sets[@]}"; do
  name=${spec//[:@]/_}
  [ -f "$out/$name/results.json" ] && { echo "$name: done"; continue; }
  alignsam adapt "$run" "$spec" --out "$adapted/$name" --overwrite --no-progress
  alignsam benchmark kvasir_polyp_lookahead --agents "$run" "$adapted/$name" --dataset "$spec" \
      --methods start_only --manual-clicks 3 --out "$out/$name"
done
alignsam presence "$run" --positives kvasir:val --negatives kvasir:val@negative --choose \
    --out "$out/presence_val" --no-progress
alignsam presence "$run" --positives kvasir:test --negatives kvasir:test@negative \
    --out "$out/presence_test" --no-progress
python docs/tools/unseen_summary.py "$out"
