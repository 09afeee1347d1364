# Issue 31 at 400 images: the compact-feature 400-image agent trained with shifted copies, on test
# and four shifts, paired per image with the 400-image agent without copies whose episodes are
# committed (docs/results/unseen/noharm_n400: float16 features, trained before the copies).
# Run to the end on 2026-12-07 over five attempts (train_progress.txt); each step resumes or
# skips what exists, the training at its last finished stage or cross-fitting fold.
set -e
cd "$(git rev-parse --show-toplevel)"
O=runs/copies400
R=$(ls -d $O/kvasir_polyp_lookahead_n400_compact_copies__lookahead__* 2>/dev/null | head -1)
[ -n "$R" ] || alignsam train docs/results/unseen/copies_n400/kvasir_polyp_lookahead_n400_compact_copies.yaml --runs-dir $O
R=$(ls -d $O/kvasir_polyp_lookahead_n400_compact_copies__lookahead__* | head -1)
[ -f "$R/summary.json" ] || alignsam train --resume "$R"
SETS="kvasir:test kvasir:test@crop256 kvasir:test@jpeg20 kvasir:test@hue kvasir:test@border"
export PYTHONPATH=.:docs/tools
python docs/tools/answer_sets.py "$R" $O/sets_copies --sets $SETS --clicks 5
python docs/tools/pair_runs.py docs/results/unseen/noharm_n400 $O/sets_copies \
    docs/results/unseen/copies_n400 --names "400 images" "400 images + copies"
# The pair that differs by the copies alone: the same task without copies
# (docs/results/curve_kvasir/compact400/commands.sh makes runs/compact400b/sets).
python docs/tools/pair_runs.py runs/compact400b/sets $O/sets_copies \
    docs/results/unseen/copies_n400/vs_compact400 --names "400 images, compact" "400 images, compact + copies"
