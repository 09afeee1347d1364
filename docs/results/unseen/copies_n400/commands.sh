# Issue 31 at 400 images: the compact-feature agent with and without shifted copies, paired on
# test and four shifts. Not yet run to the end (2026-12-07): each step resumes or skips what exists.
set -e
cd "$(git rev-parse --show-toplevel)"
O=runs/copies400
# 1. without copies: docs/results/curve_kvasir/compact400/kvasir_polyp_lookahead_n400_compact.yaml
#    (resume an interrupted run with: alignsam train --resume RUN)
C=$(ls -d runs/compact400/kvasir_polyp_lookahead_n400_compact__lookahead__* 2>/dev/null | head -1)
[ -n "$C" ] || alignsam train docs/results/curve_kvasir/compact400/kvasir_polyp_lookahead_n400_compact.yaml --runs-dir runs/compact400
C=$(ls -d runs/compact400/kvasir_polyp_lookahead_n400_compact__lookahead__* | head -1)
[ -f "$C/summary.json" ] || alignsam train --resume "$C"
# 2. with copies (same task + data.shifted_copies: [crop256, colour, blur])
R=$(ls -d $O/kvasir_polyp_lookahead_n400_compact_copies__lookahead__* 2>/dev/null | head -1)
[ -n "$R" ] || alignsam train docs/results/unseen/copies_n400/kvasir_polyp_lookahead_n400_compact_copies.yaml --runs-dir $O
R=$(ls -d $O/kvasir_polyp_lookahead_n400_compact_copies__lookahead__* | head -1)
[ -f "$R/summary.json" ] || alignsam train --resume "$R"
# 3. both on the same sets, each under its own rule chosen on val, paired per image
SETS="kvasir:test kvasir:test@crop256 kvasir:test@jpeg20 kvasir:test@hue kvasir:test@border"
export PYTHONPATH=.:docs/tools
python docs/tools/answer_sets.py "$R" $O/sets_copies --sets $SETS --clicks 5
python docs/tools/answer_sets.py "$C" $O/sets_compact --sets $SETS --clicks 5
python docs/tools/pair_runs.py $O/sets_compact $O/sets_copies docs/results/unseen/copies_n400 \
    --names "compact, no copies" "compact + copies"
