#!/usr/bin/env bash
# The multi-GPU command line without GPUs: --plan-only for 1, 2, 4 and 8 GPUs (data and sequence
# parallel, the per-GPU share printed), the overlapped optimizer's second layer-gradient buffer in
# the plan, clean refusals (sequence parallel or --gpus without a launcher, launcher variables on a
# machine without GPUs, --overlap-optimizer where it cannot run, LoRA over several GPUs, head groups
# that do not divide the kv heads of one GPU's attention), and the gradient dump of
# --dump-grads read by dev/compare_runs.py (same run: pass; another seed: fail; a truncated file: error).
set -u
cd "$(dirname "$0")/.." || exit 1
BIN=./train_llama
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
. tests/cli_helpers.sh

PLAN=(--plan-only --preset llama3-8b --gpu-mem 78)
for n in 1 2 4 8; do
    expect_ok "--plan-only data parallel, $n GPU(s): B=$((2 * n)) -> 2 rows per GPU" "B=2 S=8192" \
        "$BIN" "${PLAN[@]}" --seq-len 8192 --batch $((2 * n)) --gpus $n
    if [ $n -gt 1 ]; then
        expect_ok "--plan-only sequence parallel, $n GPUs: S=$((32768 * n)) -> 32768 per GPU" \
            "this GPU holds 32768 of the $((32768 * n)) tokens" "$BIN" "${PLAN[@]}" --seq-len $((32768 * n)) --gpus $n --seq-parallel
        expect_ok "--plan-only, $n GPUs: two layer-gradient buffers" "layer_grads x2" "$BIN" "${PLAN[@]}" --seq-len 8192 --batch $n --gpus $n
    fi
done
expect_ok "--plan-only --overlap-optimizer (one GPU): two layer-gradient buffers" "layer_grads x2" \
    "$BIN" "${PLAN[@]}" --seq-len 8192 --overlap-optimizer
if "$BIN" "${PLAN[@]}" --seq-len 8192 | grep -q "layer_grads x2"; then fail "one GPU without --overlap-optimizer keeps one buffer"
else pass "one GPU without --overlap-optimizer keeps one layer-gradient buffer"; fi
expect_fail "--plan-only: 6 rows over 4 GPUs" "split" "$BIN" "${PLAN[@]}" --seq-len 8192 --batch 6 --gpus 4
expect_fail "--plan-only: 32 heads over 3 GPUs" "split evenly" "$BIN" "${PLAN[@]}" --seq-len 30720 --gpus 3 --seq-parallel
expect_fail "--plan-only: 8-bit moments over 2 GPUs" "8-bit moments are not sharded" "$BIN" "${PLAN[@]}" --seq-len 8192 --batch 2 --gpus 2 \
    --optimizer adamw8bit
expect_fail "--plan-only --seq-parallel on one GPU" "needs --gpus N with N >= 2" "$BIN" "${PLAN[@]}" --seq-len 8192 --seq-parallel
expect_fail "--plan-only: LoRA over 2 GPUs" "LoRA trains on one GPU only" "$BIN" "${PLAN[@]}" --seq-len 8192 --batch 2 --gpus 2 \
    --lora-rank 16
expect_fail "--plan-only: LoRA sequence parallel over 2 GPUs" "LoRA trains on one GPU only" "$BIN" "${PLAN[@]}" --seq-len 16384 --gpus 2 \
    --seq-parallel --lora-rank 16
expect_ok "--plan-only: LoRA on one GPU" "LoRA rank 16" "$BIN" "${PLAN[@]}" --seq-len 8192 --lora-rank 16
expect_fail "--overlap-optimizer with --lora-rank" "LoRA's adapter updates are tiny" "$BIN" "${PLAN[@]}" --seq-len 8192 --lora-rank 16 \
    --overlap-optimizer
expect_fail "--dump-grads with --lora-rank" "does not go with --lora-rank" "$BIN" "${PLAN[@]}" --seq-len 8192 --lora-rank 16 \
    --grad-accum 2 --dump-grads "$TMP/x.bin"
# head groups over sequence parallel: Llama-3-8B's 8 kv heads are 4 per GPU over 2 GPUs, 1 over 8
expect_ok "--plan-only: 4 head groups, 2 GPUs sequence parallel" "attention backward in 4 head groups" \
    "$BIN" "${PLAN[@]}" --seq-len 65536 --gpus 2 --seq-parallel --attn-head-groups 4
expect_fail "--plan-only: 8 head groups, 2 GPUs sequence parallel" "kv heads per GPU" \
    "$BIN" "${PLAN[@]}" --seq-len 65536 --gpus 2 --seq-parallel --attn-head-groups 8
expect_fail "--plan-only: 2 head groups, 8 GPUs sequence parallel" "kv heads per GPU" \
    "$BIN" "${PLAN[@]}" --seq-len 65536 --gpus 8 --seq-parallel --attn-head-groups 2
expect_ok "--plan-only: 8 head groups, 2 GPUs data parallel" "attention backward in 8 head groups" \
    "$BIN" "${PLAN[@]}" --seq-len 8192 --batch 2 --gpus 2 --attn-head-groups 8
expect_fail "--plan-only: 3 head groups" "must be 1, 2, 4 or 8" "$BIN" "${PLAN[@]}" --seq-len 8192 --attn-head-groups 3
expect_fail "--plan-only: head groups 'many'" "--attn-head-groups" "$BIN" "${PLAN[@]}" --seq-len 8192 --attn-head-groups many

expect_fail "--seq-parallel without a launcher" "start N processes" "$BIN" --synthetic-data --seq-parallel --steps 1
expect_fail "--gpus 2 without a launcher" "started alone" "$BIN" --synthetic-data --gpus 2 --steps 1
expect_fail "launcher variables, no GPU" "need a GPU each" \
    env WORLD_SIZE=2 RANK=0 LOCAL_RANK=0 LOCAL_WORLD_SIZE=2 "$BIN" --synthetic-data --steps 1
expect_fail "--overlap-optimizer with --grad-accum 2" "needs --grad-accum 1" "$BIN" --synthetic-data --overlap-optimizer --grad-accum 2
expect_fail "--overlap-optimizer on the CPU path" "needs a GPU" "$BIN" --cpu --synthetic-data --overlap-optimizer --steps 1
expect_fail "--dump-grads with optimizer-in-backward" "needs --grad-accum >= 2" "$BIN" --synthetic-data --dump-grads "$TMP/x.bin"

# --dump-grads on the CPU path, read back by compare_runs.py
RUN=(--cpu --synthetic-data --seq-len 32 --batch 2 --grad-accum 2 --steps 2 --eval-every 0 --ckpt-every 2)
"$BIN" "${RUN[@]}" --seed 1 --dump-grads "$TMP/a.bin" --log "$TMP/a.jsonl" --ckpt-dir "$TMP/a" >/dev/null 2>&1 || fail "dump run a"
"$BIN" "${RUN[@]}" --seed 1 --dump-grads "$TMP/b.bin" --log "$TMP/b.jsonl" --ckpt-dir "$TMP/b" >/dev/null 2>&1 || fail "dump run b"
"$BIN" "${RUN[@]}" --seed 2 --dump-grads "$TMP/c.bin" --log "$TMP/c.jsonl" --ckpt-dir "$TMP/c" >/dev/null 2>&1 || fail "dump run c"
"$BIN" "${RUN[@]}" --seed 1 --steps 1 --lr 0 --ckpt-every 1 --ckpt-dir "$TMP/base" >/dev/null 2>&1 || fail "base run"
check_rc() {  # check_rc NAME WANT COMMAND...
    local name=$1 want=$2
    shift 2
    local out
    out=$("$@" 2>&1)
    local rc=$?
    if [ $rc -eq "$want" ]; then pass "$name (exit $rc)"; else fail "$name (exit $rc, want $want)"; echo "$out" | tail -5; fi
}
check_rc "compare_runs grads: same run" 0 python3 dev/compare_runs.py grads "$TMP/a.bin" "$TMP/b.bin"
check_rc "compare_runs grads: another seed's weights and data" 1 python3 dev/compare_runs.py grads "$TMP/a.bin" "$TMP/c.bin"
check_rc "compare_runs losses: same run" 0 python3 dev/compare_runs.py losses "$TMP/a.jsonl" "$TMP/b.jsonl" --steps 2
check_rc "compare_runs losses: too few shared steps" 2 python3 dev/compare_runs.py losses "$TMP/a.jsonl" "$TMP/b.jsonl" --steps 3
check_rc "compare_runs weights: same run" 0 python3 dev/compare_runs.py weights "$TMP/base/model_1.bin" "$TMP/a/model_2.bin" "$TMP/b/model_2.bin"
check_rc "compare_runs weights: another seed" 1 python3 dev/compare_runs.py weights "$TMP/base/model_1.bin" "$TMP/a/model_2.bin" "$TMP/c/model_2.bin"
head -c 100 "$TMP/a.bin" >"$TMP/short.bin"
check_rc "compare_runs grads: truncated dump" 2 python3 dev/compare_runs.py grads "$TMP/a.bin" "$TMP/short.bin"

echo "test_multi_gpu_cli: $fails failure(s)"
[ "$fails" -eq 0 ]
