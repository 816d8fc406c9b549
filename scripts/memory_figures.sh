#!/usr/bin/env bash
# The README's memory pictures, from the planner alone (no GPU): Llama-3-8B on an 80 GiB GPU and a
# 125 GiB host (the H100 device machine: --host-mem 109, its default pinned budget), batch 1, for
# vanilla / recompute / MsT / MsT + offload:
#   memory_breakdown_S16K.png   planned bytes by category, every method at S = 16K
#   memory_breakdown_max_S.png  the same, each method at the longest S the planner lets it run
#   memory_timeline_S16K.png    bytes holding live data over one step, standard vs recompute vs MsT
# usage: bash scripts/memory_figures.sh [OUT_DIR (default docs/memory)]  (after `make train_llama`)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/memory}
mkdir -p "$out"
vocab=128256
common=(--plan-only --preset llama3-8b --gpu-mem 80 --host-mem 109)
methods=(vanilla recompute mst offload)
# At S = 16K every method fits without chunking, so `--mst auto` would pick M=1 and one vocabulary
# tile and offload nothing: MsT and offload are set explicitly there (M=8, tiles of V/8, every layer
# input on the host); at each method's longest S the planner chooses.
declare -A fixed=(
    [vanilla]="--mst 1 --vocab-chunk $vocab --recompute 0 --offload 0"
    [recompute]="--mst 1 --vocab-chunk $vocab --recompute 1 --offload 0"
    [mst]="--mst 8 --vocab-chunk $((vocab / 8)) --recompute 1 --offload 0"
    [offload]="--mst 8 --vocab-chunk $((vocab / 8)) --recompute 1 --offload 1 --host-layers 32")
declare -A chosen=(
    [vanilla]="${fixed[vanilla]}"
    [recompute]="${fixed[recompute]}"
    [mst]="--mst auto --recompute 1 --offload 0"
    [offload]="--mst auto --recompute 1 --offload 1")

plan() {  # plan FLAGS S JSON: writes the plan's JSON; the exit status says whether it fits
    # shellcheck disable=SC2086
    ./train_llama "${common[@]}" --seq-len "$2" $1 --plan-json "$3" > /dev/null
}

# Longest S (a multiple of 1024) that a method (its FLAGS) fits: bisection on the planner's verdict.
max_seq() {
    local lo=1024 hi=$((1 << 21)) mid
    plan "$1" $lo "$out/.probe.json" || { echo "error: '$1' does not fit at S=$lo" >&2; exit 1; }
    while [ $((hi - lo)) -gt 1024 ]; do
        mid=$(((lo + hi) / 2 / 1024 * 1024))
        if plan "$1" $mid "$out/.probe.json"; then lo=$mid; else hi=$mid; fi
    done
    rm -f "$out/.probe.json"
    echo $lo
}

for m in "${methods[@]}"; do
    plan "${fixed[$m]}" 16384 "$out/plan_${m}_S16K.json" || echo "$m does not fit at S=16K (drawn above the budget)"
    s=$(max_seq "${chosen[$m]}")
    plan "${chosen[$m]}" "$s" "$out/plan_${m}_max.json"
    echo "$m: longest S $s"
done
python3 scripts/plot_memory.py breakdown "$out"/plan_{vanilla,recompute,mst,offload}_S16K.json \
    -o "$out/memory_breakdown_S16K.png"
python3 scripts/plot_memory.py breakdown "$out"/plan_{vanilla,recompute,mst,offload}_max.json \
    -o "$out/memory_breakdown_max_S.png" \
    --title "Planned memory at each method's longest S: llama3-8b, 80 GiB GPU, 125 GiB host, batch 1"
python3 scripts/plot_memory.py timeline "$out"/plan_{vanilla,recompute,mst}_S16K.json \
    -o "$out/memory_timeline_S16K.png" --label "standard (no recompute, M=1)" --label "recompute" \
    --label "MsT (M=8, 8 vocabulary tiles) + recompute"
