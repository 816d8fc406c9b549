#!/usr/bin/env bash
# The memory choices of recompute and the attention on the command line without a GPU (--plan-only).
# Recompute auto (the default): off for Llama-3-8B at S=4096 on 78 GiB (the standard transformer
# fits), on at S=8192; on when offload asks for it; a value other than 0, 1, auto is refused.
# The sliced attention backward: Llama-2-7B at S=131072 fits 78.16 GiB only with it (auto takes it,
# 0 refuses the run), auto leaves it off where the plain backward fits, and the settings it cannot
# run with are refused with the reason.
# Kept attention activations (--keep-attn): auto keeps most of Llama-3-8B's layers at S=16384 on
# 78 GiB and none at S=98304, where memory is needed for the sequence; an explicit K is planned as
# asked; a K that does not fit, above the layer count, without recompute, or not a number is refused.
set -u
cd "$(dirname "$0")/.." || exit 1
BIN=./train_llama
. tests/cli_helpers.sh
PLAN=(--plan-only --preset llama2-7b --gpu-mem 78.16)
PLAN3=(--plan-only --preset llama3-8b --gpu-mem 78)

expect_ok "llama2-7b S=131072, auto: fits with the sliced backward" "sliced attention backward: one head group" \
    "$BIN" "${PLAN[@]}" --seq-len 131072
expect_fail "llama2-7b S=131072, --attn-bwd-sliced 0: does not fit" "does not fit" \
    "$BIN" "${PLAN[@]}" --seq-len 131072 --attn-bwd-sliced 0
expect_ok_without "llama2-7b S=65536, auto: the plain backward" "sliced attention backward" \
    "$BIN" "${PLAN[@]}" --seq-len 65536
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


expect_ok "S=16384, auto: most layers keep their attention" "kept attention: the last 31 of 32 layers" \
    "$BIN" "${PLAN3[@]}" --seq-len 16384
expect_ok_without "S=98304, auto: no layer keeps its attention" "kept attention" "$BIN" "${PLAN3[@]}" --seq-len 98304
expect_ok "S=16384, --keep-attn 4: the last 4" "kept attention: the last 4 of 32 layers" \
    "$BIN" "${PLAN3[@]}" --seq-len 16384 --keep-attn 4
expect_ok_without "S=16384, --keep-attn 0: every layer recomputed" "kept attention" \
    "$BIN" "${PLAN3[@]}" --seq-len 16384 --keep-attn 0
expect_fail "S=98304, --keep-attn 32: does not fit, auto would" "it would fit with no layer keeping its attention" \
    "$BIN" "${PLAN3[@]}" --seq-len 98304 --keep-attn 32
expect_fail "--keep-attn 33 of 32 layers" "must be in \[0, 32\]" \
    "$BIN" "${PLAN3[@]}" --seq-len 4096 --keep-attn 33
expect_fail "--keep-attn 4 without recompute" "needs --recompute 1" \
    "$BIN" "${PLAN3[@]}" --seq-len 4096 --keep-attn 4 --recompute 0
expect_fail "--keep-attn x" "not an integer" "$BIN" "${PLAN3[@]}" --seq-len 4096 --keep-attn x
expect_ok "S=4096, recompute auto: off" "| recompute off |" "$BIN" "${PLAN3[@]}" --seq-len 4096
expect_ok "S=8192, recompute auto: on" "| recompute on |" "$BIN" "${PLAN3[@]}" --seq-len 8192
expect_ok "S=4096, recompute auto with offload: on" "| recompute on |" "$BIN" "${PLAN3[@]}" --seq-len 4096 --offload 1
expect_fail "--recompute 2" "out of range" "$BIN" "${PLAN3[@]}" --seq-len 4096 --recompute 2

echo "test_attn_memory_cli: $fails failure(s)"
[ "$fails" -eq 0 ]
