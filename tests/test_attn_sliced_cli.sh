#!/usr/bin/env bash
# The sliced attention backward on the command line without a GPU (--plan-only): Llama-2-7B at
# S=131072 fits 78.16 GiB only with it (auto takes it, 0 refuses the run), auto leaves it off where
# the plain backward fits, and the settings it cannot run with are refused with the reason.
set -u
cd "$(dirname "$0")/.." || exit 1
BIN=./train_llama
. tests/cli_helpers.sh
PLAN=(--plan-only --preset llama2-7b --gpu-mem 78.16)

expect_ok "llama2-7b S=131072, auto: fits with the sliced backward" "sliced attention backward: one head group" \
    "$BIN" "${PLAN[@]}" --seq-len 131072
expect_fail "llama2-7b S=131072, --attn-bwd-sliced 0: does not fit" "does not fit" \
    "$BIN" "${PLAN[@]}" --seq-len 131072 --attn-bwd-sliced 0
out=$("$BIN" "${PLAN[@]}" --seq-len 65536 2>&1)
if [ $? -eq 0 ] && ! grep -q "sliced attention backward" <<<"$out"; then pass "llama2-7b S=65536, auto: the plain backward"
else fail "llama2-7b S=65536, auto: the plain backward"; echo "$out" | tail -5; fi
expect_ok "llama2-7b S=4096, --attn-bwd-sliced 1: sliced" "sliced attention backward: one head group" \
    "$BIN" "${PLAN[@]}" --seq-len 4096 --attn-bwd-sliced 1
expect_fail "--attn-bwd-sliced 1 with LoRA" "not for LoRA" \
    "$BIN" "${PLAN[@]}" --seq-len 4096 --attn-bwd-sliced 1 --lora-rank 8 --lora-alpha 16
expect_fail "--attn-bwd-sliced 1 without recompute" "needs recompute on" \
    "$BIN" "${PLAN[@]}" --seq-len 4096 --attn-bwd-sliced 1 --recompute 0
expect_fail "--attn-bwd-sliced 1 with one head group" "not 1" \
    "$BIN" "${PLAN[@]}" --seq-len 4096 --attn-bwd-sliced 1 --attn-head-groups 1
expect_fail "--attn-bwd-sliced 1 on Gemma-2 (soft-capped attention)" "soft-capped" \
    "$BIN" --plan-only --preset gemma2-9b --gpu-mem 78.16 --seq-len 4096 --attn-bwd-sliced 1
expect_fail "--attn-bwd-sliced 2" "out of range" "$BIN" "${PLAN[@]}" --seq-len 4096 --attn-bwd-sliced 2

echo "test_attn_sliced_cli: $fails failure(s)"
[ "$fails" -eq 0 ]
