#!/usr/bin/env bash
# Where a training step's GPU time goes, for full-size shapes with random weights (on the device):
#
#   bash dev/profile_steps.sh PRESET "S:RECOMPUTE S:RECOMPUTE ..." [extra train_llama flags]
#   e.g. bash dev/profile_steps.sh llama3-8b "4096:0 16384:0 16384:1"
#
# Each configuration is one `train_llama --preset PRESET --synthetic-data --bench --profile` run of
# 5 steps; its full output goes to $OUT/profile_<preset>_<S>_rc<R>.log, and the script prints the
# --profile table and the step's tok/s, MFU and peak memory of each.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
[ $# -ge 2 ] || { echo "usage: bash dev/profile_steps.sh PRESET \"S:RECOMPUTE ...\" [train_llama flags]" >&2; exit 2; }
preset=$1
configs=$2
shift 2
OUT=${OUT:-/tmp/profile_out}
mkdir -p "$OUT"
status=0
for cfg in $configs; do
    S=${cfg%%:*}
    rc=${cfg##*:}
    log="$OUT/profile_${preset}_${S}_rc${rc}.log"
    echo "=== $preset S=$S recompute=$rc ($(date -u +%H:%M:%S))"
    if ! ./train_llama --preset "$preset" --synthetic-data --seq-len "$S" --batch 1 --steps 5 --recompute "$rc" --bench --profile "$@" >"$log" 2>&1; then
        echo "FAILED (exit status above 0): last lines of $log"
        tail -n 5 "$log"
        status=1
        continue
    fi
    grep -E '^memory plan' "$log"
    sed -n '/^profile:/,/^BENCH/p' "$log" | grep -v '^BENCH'
    python3 - "$log" <<'EOF'
import json, sys
line = [l for l in open(sys.argv[1]) if l.startswith("BENCH ")][-1]
r = json.loads(line[len("BENCH "):])
print(f"  => {r['tok_s']:,.0f} tok/s, median {r['median_ms']:.1f} ms, MFU {100 * r['mfu']:.1f}%, "
      f"peak {r['peak_gib']:.2f} GiB (plan {r['planned_gib']:.2f})")
EOF
done
exit "$status"
