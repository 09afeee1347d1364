# Issue 30: the 400-image agent with its extra feature sources stored compactly (compact:SOURCE),
# trained alone (2026-12-07, features cached by a first attempt), then paired per image on `test`
# and four shifts with the float16 400-image agent whose episodes are committed (noharm_n400).
set -e
cd "$(git rev-parse --show-toplevel)"
O=runs/compact400b
R=$(ls -d $O/kvasir_polyp_lookahead_n400_compact__lookahead__* 2>/dev/null | head -1)
[ -n "$R" ] || /usr/bin/time -v alignsam train \
    docs/results/curve_kvasir/compact400/kvasir_polyp_lookahead_n400_compact.yaml --runs-dir $O
R=$(ls -d $O/kvasir_polyp_lookahead_n400_compact__lookahead__* | head -1)
[ -f "$R/summary.json" ] || alignsam train --resume "$R"
export PYTHONPATH=.:docs/tools
python docs/tools/answer_sets.py "$R" $O/sets --clicks 5 --sets kvasir:test \
    kvasir:test@crop256 kvasir:test@jpeg20 kvasir:test@hue kvasir:test@border
python docs/tools/pair_runs.py docs/results/unseen/noharm_n400 $O/sets \
    docs/results/curve_kvasir/compact400/compact_vs_float16 --names "float16 features" "compact features"
