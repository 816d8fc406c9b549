#!/usr/bin/env bash
# train_llama end to end on the CPU path (--cpu): checkpoints, bit-exact resume (adamw and adamw8bit), bad inputs,
# SIGINT, the memory planner's --plan-only, and LoRA on a quantized base with its export. Uses the default random-init model at a tiny
# shape (S=32, B=2) on the shipped data. Ends with "N passed, M failed"; exits non-zero on failure.
# Run from anywhere: `bash tests/test_resume.sh` (needs ./train_llama, built by `make`).
set -u
cd "$(dirname "$0")/.."
BIN=${TRAIN_LLAMA:-./train_llama}
export OMP_WAIT_POLICY=passive
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # the same thread team in every run: same float sums
[ -x "$BIN" ] || { echo "error: $BIN not found: run make first"; echo "0 passed, 1 failed"; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
TINY=(--cpu --seq-len 32 --batch 2 --eval-every 0 --eval-batches 2 --sample-tokens 8 --seed 7)

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "PASS  $1"; }
bad() { failed=$((failed + 1)); echo "FAIL  $1"; }

# step lines without the timing fields: "step 5/8 | loss ... | lr ... | norm ..."
step_lines() { grep -E '^step [0-9]+/' "$1" | awk -F' \\| ' '{print $1 " | " $2 " | " $3 " | " $4}'; }

# expect_fail NAME PATTERN COMMAND...: exits non-zero and stderr/stdout mention PATTERN
expect_fail() {
    local name=$1 pattern=$2
    shift 2
    "$@" > "$TMP/out.txt" 2>&1
    local rc=$?
    if [ $rc -ne 0 ] && grep -q -- "$pattern" "$TMP/out.txt"; then
        ok "$name (exit $rc: $(grep -m1 -- "$pattern" "$TMP/out.txt"))"
    else
        bad "$name (exit $rc, expected non-zero with '$pattern'); output:"
        tail -5 "$TMP/out.txt"
    fi
}

# (1) 8 steps with a checkpoint every 4: model_8.bin + state_8.bin, older than the last 2 deleted
A="$TMP/a"
"$BIN" "${TINY[@]}" --steps 8 --ckpt-every 4 --ckpt-dir "$A" --log "$TMP/a.jsonl" > "$TMP/a.txt" 2>&1
rc=$?
if [ $rc -eq 0 ] && [ -f "$A/model_8.bin" ] && [ -f "$A/state_8.bin" ] && [ -f "$A/model_4.bin" ] \
    && [ "$(step_lines "$TMP/a.txt" | wc -l)" -eq 8 ] && [ "$(grep -c '"loss"' "$TMP/a.jsonl")" -eq 8 ] \
    && grep -q '^sample: ' "$TMP/a.txt" && grep -q '^eval step 8 | val loss' "$TMP/a.txt"; then
    ok "8-step run: 8 step lines, 8 JSONL lines, eval, sample, model_4/8 + state_4/8"
else
    bad "8-step run (exit $rc)"
    tail -5 "$TMP/a.txt"
fi

K="$TMP/k"
"$BIN" "${TINY[@]}" --steps 6 --ckpt-every 2 --keep-last 2 --sample-tokens 0 --eval-batches 0 --ckpt-dir "$K" > "$TMP/k.txt" 2>&1
rc=$?
if [ $rc -eq 0 ] && [ "$(ls "$K" | tr '\n' ' ')" = "model_4.bin model_6.bin state_4.bin state_6.bin " ]; then
    ok "--keep-last 2: checkpoints of steps 2, 4, 6 written, only 4 and 6 kept"
else
    bad "--keep-last 2 (exit $rc): $(ls "$K" 2>/dev/null | tr '\n' ' ')"
fi

# expect_resumed WHAT RC FULL_DIR FULL_OUT RESUMED_DIR RESUMED_OUT: the run resumed at step 4 (exit
# status RC, steps 5..8 in RESUMED_OUT) ends with the same model_8.bin, state_8.bin and step lines
# as the uninterrupted 8-step run
expect_resumed() {
    local what=$1 rc=$2 full=$3 full_out=$4 resumed=$5 resumed_out=$6
    if [ "$rc" -eq 0 ] && cmp -s "$full/model_8.bin" "$resumed/model_8.bin" \
        && cmp -s "$full/state_8.bin" "$resumed/state_8.bin" \
        && [ "$(step_lines "$full_out" | sed -n 5,8p)" = "$(step_lines "$resumed_out")" ] \
        && [ "$(step_lines "$resumed_out" | wc -l)" -eq 4 ]; then
        ok "$what == the 8-step run: model_8.bin, state_8.bin and step lines 5..8 identical"
    else
        bad "$what: not bit-exact (exit $rc)"
        diff <(step_lines "$full_out" | sed -n 5,8p) <(step_lines "$resumed_out")
    fi
}

# (2) 4 steps, then --resume latest to 8, in one directory: bit for bit the 8-step run. The lr
# schedule of a 4-step run differs from an 8-step one unless it is constant, so this pair runs
# --schedule constant (with warmup) against a matching uninterrupted run; (2b) splits a cosine
# run with --stop-after.
C="$TMP/c"
R="$TMP/r"
CONST=(--schedule constant --warmup 3)
"$BIN" "${TINY[@]}" "${CONST[@]}" --steps 8 --ckpt-every 4 --ckpt-dir "$C" > "$TMP/c.txt" 2>&1 \
    && "$BIN" "${TINY[@]}" "${CONST[@]}" --steps 4 --ckpt-dir "$R" > "$TMP/r1.txt" 2>&1 \
    && "$BIN" "${TINY[@]}" "${CONST[@]}" --steps 8 --ckpt-every 4 --ckpt-dir "$R" --resume latest > "$TMP/r2.txt" 2>&1
expect_resumed "4 steps + resume latest + 4 steps (constant schedule)" $? "$C" "$TMP/c.txt" "$R" "$TMP/r2.txt"

S="$TMP/s"
"$BIN" "${TINY[@]}" --steps 8 --stop-after 4 --ckpt-dir "$S" > "$TMP/s1.txt" 2>&1 \
    && "$BIN" "${TINY[@]}" --steps 8 --ckpt-dir "$S" --resume "$S/state_4.bin" > "$TMP/s2.txt" 2>&1
rc=$?
grep -q 'stopped after step 4' "$TMP/s1.txt" || rc=1
expect_resumed "cosine run split by --stop-after 4 and --resume state_4.bin" $rc "$A" "$TMP/a.txt" "$S" "$TMP/s2.txt"

# (2c) --optimizer adamw8bit (8-bit moments: codes and block scales in the state file): a cosine run
# split by --stop-after 4 and resumed equals the uninterrupted 8-step run bit for bit; it trains
# differently from adamw (the flag changes the math) and its state is about half as large (fp32
# params 4 n + two moments of (1 + 4/256) n bytes, against 12 n: 0.503)
E="$TMP/e"
F="$TMP/f"
A8=(--optimizer adamw8bit)
"$BIN" "${TINY[@]}" "${A8[@]}" --steps 8 --ckpt-every 4 --ckpt-dir "$E" > "$TMP/e.txt" 2>&1 \
    && "$BIN" "${TINY[@]}" "${A8[@]}" --steps 8 --stop-after 4 --ckpt-dir "$F" > "$TMP/f1.txt" 2>&1 \
    && "$BIN" "${TINY[@]}" "${A8[@]}" --steps 8 --ckpt-dir "$F" --resume latest > "$TMP/f2.txt" 2>&1
expect_resumed "adamw8bit: --stop-after 4 + --resume latest" $? "$E" "$TMP/e.txt" "$F" "$TMP/f2.txt"
size_w=$(stat -c %s "$A/state_8.bin")
size_8=$(stat -c %s "$E/state_8.bin")
if [ "$(step_lines "$TMP/a.txt" | sed -n 2,8p)" != "$(step_lines "$TMP/e.txt" | sed -n 2,8p)" ] \
    && [ $((size_8 * 100)) -lt $((size_w * 51)) ]; then
    ok "adamw8bit trains differently from adamw; state file $size_8 bytes vs adamw's $size_w"
else
    bad "adamw8bit: same step lines as adamw, or state not smaller ($size_8 vs $size_w bytes)"
fi
expect_fail "adamw state resumed with adamw8bit" "written with --optimizer adamw;" "$BIN" "${TINY[@]}" "${A8[@]}" --steps 9 --resume "$A/state_8.bin"
expect_fail "adamw8bit state resumed with adamw" "written with --optimizer adamw8bit" "$BIN" "${TINY[@]}" --steps 9 --resume "$E/state_8.bin"
expect_fail "--moments with adamw8bit" "drop --moments" "$BIN" "${TINY[@]}" "${A8[@]}" --moments fp32 --steps 1
# state version 1 (before [16] optimizer) is read as adamw; an unknown version is refused
mkdir -p "$TMP/v1"
cp "$A/model_8.bin" "$A/state_8.bin" "$TMP/v1/"
printf '\x01' | dd of="$TMP/v1/state_8.bin" bs=1 seek=8 conv=notrunc status=none
if "$BIN" "${TINY[@]}" --steps 9 --sample-tokens 0 --ckpt-dir "$TMP/v1" --resume latest > "$TMP/v1.txt" 2>&1 \
    && grep -q '^step 9/9' "$TMP/v1.txt"; then
    ok "a version-1 state file (adamw) still resumes"
else
    bad "version-1 state file did not resume"
    tail -3 "$TMP/v1.txt"
fi
printf '\x07' | dd of="$TMP/v1/state_8.bin" bs=1 seek=8 conv=notrunc status=none
expect_fail "state version 7" "unsupported state version 7" "$BIN" "${TINY[@]}" --steps 9 --resume "$TMP/v1/state_8.bin"

# (3) bad inputs: each exits non-zero with a clear message
mkdir -p "$TMP/bad" "$TMP/other"
cp "$A/model_8.bin" "$TMP/bad/model_8.bin"
head -c 1000 "$A/state_8.bin" > "$TMP/bad/state_8.bin"
expect_fail "truncated state file" "truncated" "$BIN" "${TINY[@]}" --steps 9 --ckpt-dir "$TMP/bad" --resume latest
head -c $(( $(stat -c %s "$A/state_8.bin") - 4 )) "$A/state_8.bin" > "$TMP/bad/state_8.bin"
expect_fail "state file missing its last 4 bytes" "truncated" "$BIN" "${TINY[@]}" --steps 9 --resume "$TMP/bad/state_8.bin"
cp "$A/state_8.bin" "$TMP/bad/state_8.bin"
printf '\x55' | dd of="$TMP/bad/state_8.bin" bs=1 seek=100000 conv=notrunc status=none
expect_fail "corrupted state payload" "corrupted" "$BIN" "${TINY[@]}" --steps 9 --resume "$TMP/bad/state_8.bin"
cp "$A/state_8.bin" "$TMP/bad/state_8.bin"
printf 'XXXX' | dd of="$TMP/bad/state_8.bin" bs=1 seek=0 conv=notrunc status=none
expect_fail "state file with bad magic" "bad magic" "$BIN" "${TINY[@]}" --steps 9 --resume "$TMP/bad/state_8.bin"
head -c 4096 /dev/zero > "$TMP/zeros.bin"
expect_fail "--model with bad magic" "bad magic" "$BIN" "${TINY[@]}" --model "$TMP/zeros.bin"
# valid tiny Llamas (all-zero bf16 weights): vocab 100 (smaller than the tokenizer's 2048) and 2048
tiny_model() {  # tiny_model PATH VOCAB [BF16_BITS of every weight, default 0]
python3 - "$1" "$2" "${3:-0}" <<'PY'
import struct, sys
V, d, L, H, KV, hd, F = int(sys.argv[2]), 8, 1, 2, 1, 4, 16
h = [0] * 256
h[0], h[1] = 0x4D53544D, 1
h[2:11] = [0, V, d, L, H, KV, hd, F, 64]      # family llama, vocab, d, layers, heads, kv, head_dim, d_ff, max_pos
h[17] = 1                                      # sliding_period
fl = {32: 1e-5, 33: 10000.0, 34: 1.0, 39: hd ** -0.5, 40: 1.0}  # eps, theta, rope factor, query scale, embed scale
for slot, x in fl.items():
    h[slot] = struct.unpack('<i', struct.pack('<f', x))[0]
layer = d + H * hd * d + 2 * KV * hd * d + d * H * hd + d + 3 * F * d
total = V * d + L * layer + d + V * d
with open(sys.argv[1], 'wb') as f:
    f.write(struct.pack('<256i', *h))
    f.write(struct.pack('<H', int(sys.argv[3], 0)) * total)
PY
}
tiny_model "$TMP/v100.bin" 100
tiny_model "$TMP/nan.bin" 2048 0x7FC0
tiny_model "$TMP/other/model_8.bin" 2048
cp "$A/state_8.bin" "$TMP/other/state_8.bin"
expect_fail "tokenizer vocab > model vocab" "more than the model" "$BIN" "${TINY[@]}" --model "$TMP/v100.bin"
expect_fail "state of another model" "another model" "$BIN" "${TINY[@]}" --steps 9 --resume "$TMP/other/state_8.bin"
expect_fail "NaN loss stops the run" "step 1: non-finite loss" "$BIN" "${TINY[@]}" --steps 3 --model "$TMP/nan.bin" --ckpt-dir "$TMP/nan"
if [ -d "$TMP/nan" ]; then bad "a NaN run wrote a checkpoint"; else ok "the NaN run wrote no checkpoint"; fi
"$BIN" "${TINY[@]}" --steps 3 --model "$TMP/nan.bin" --ckpt-dir "$TMP/nanskip" --skip-nonfinite > "$TMP/skip.txt" 2>&1
rc=$?
if [ $rc -eq 0 ] && [ "$(grep -c 'update skipped' "$TMP/skip.txt")" -eq 3 ]; then
    ok "--skip-nonfinite: 3 NaN steps skipped, exit 0"
else
    bad "--skip-nonfinite (exit $rc)"
    tail -3 "$TMP/skip.txt"
fi
expect_fail "model too large for the CPU path" "too large for the CPU reference path" "$BIN" --cpu --seq-len 65536 --steps 1
expect_fail "unknown flag" "unknown option '--frobnicate'" "$BIN" --frobnicate 3
expect_fail "--preset on the CPU path" "the CPU reference path does not train it" "$BIN" --cpu --preset llama3-8b --synthetic-data --steps 3
expect_fail "unknown --preset" "unknown --preset 'llama9'" "$BIN" --cpu --preset llama9 --synthetic-data
# --bench with one step (the long max-seq trials): that step is timed, warm-up included
"$BIN" --cpu --synthetic-data --seq-len 16 --batch 1 --steps 1 --bench > "$TMP/one.txt" 2>&1
rc=$?
one_ms=$(grep -E '^step 1/1 ' "$TMP/one.txt" | grep -oE '\| [0-9]+ ms \|' | grep -oE '[0-9]+')
one_ok=$(grep '^BENCH ' "$TMP/one.txt" | sed 's/^BENCH //' | python3 -c '
import json, sys
b = json.loads(sys.stdin.read())
print(1 if b.get("steps_timed") == 1 and b.get("warmup") == 0 and round(b["median_ms"]) == int(sys.argv[1]) else 0)' \
    "${one_ms:-0}" 2>/dev/null)
if [ $rc -eq 0 ] && [ "$one_ok" = 1 ]; then
    ok "--bench --steps 1: the one step timed (${one_ms} ms), warmup 0"
else
    bad "--bench --steps 1 (exit $rc, step ms '$one_ms', BENCH ok '$one_ok')"
    tail -3 "$TMP/one.txt"
fi
expect_fail "--synthetic-data cannot sample" "cannot sample" "$BIN" --cpu --synthetic-data --sample-tokens 8

# --synthetic-data on the CPU path: no tokenizer, no checkpoint, no eval/sample; --bench prints one
# BENCH line whose JSON parses and whose numbers agree with the step lines
Y="$TMP/y"
"$BIN" --cpu --synthetic-data --tokenizer "$TMP/no_such_tokenizer.bin" --seq-len 32 --batch 2 --steps 5 --bench \
    --ckpt-dir "$Y" > "$TMP/y.txt" 2>&1
rc=$?
bench_ok=$(grep '^BENCH ' "$TMP/y.txt" | sed 's/^BENCH //' | python3 -c '
import json, sys
lines = sys.stdin.read().splitlines()
b = json.loads(lines[0]) if len(lines) == 1 else {}
ok = (b.get("model") == "default" and b.get("backend") == "cpu" and b.get("B") == 2 and b.get("S") == 32
      and b.get("steps_timed") == 3 and b.get("median_ms", 0) > 0 and b.get("oom") is False
      and abs(b["tok_s"] - 64 / (b["median_ms"] / 1e3)) < 1e-3 * b["tok_s"] + 0.1)
print(1 if ok else 0)' 2>/dev/null)
if [ $rc -eq 0 ] && [ "$bench_ok" = 1 ] && [ "$(step_lines "$TMP/y.txt" | wc -l)" -eq 5 ] && [ ! -e "$Y" ] \
    && ! grep -q '^eval step\|^sample: ' "$TMP/y.txt" && grep -q 'tokens in \[0, 8192)' "$TMP/y.txt"; then
    ok "--synthetic-data --bench (CPU): 5 steps, no tokenizer/checkpoint/eval/sample, $(grep -o '"median_ms": [0-9.]*' "$TMP/y.txt")"
else
    bad "--synthetic-data --bench (exit $rc, BENCH ok '$bench_ok')"
    tail -3 "$TMP/y.txt"
fi
expect_fail "--seq-len 0" "--seq-len: 0 is out of range" "$BIN" --cpu --seq-len 0
expect_fail "--lr abc" "--lr: 'abc' is not a number" "$BIN" --cpu --lr abc
expect_fail "--resume latest in an empty dir" "no checkpoint" "$BIN" "${TINY[@]}" --ckpt-dir "$TMP/empty" --resume latest

# (4) SIGINT during a run: a checkpoint of the last finished step, exit 0
G="$TMP/g"
"$BIN" "${TINY[@]}" --steps 100000 --ckpt-dir "$G" > "$TMP/g.txt" 2>&1 &
pid=$!
for _ in $(seq 1 300); do grep -q '^step 2/' "$TMP/g.txt" 2>/dev/null && break; sleep 0.1; done
kill -INT $pid
wait $pid
rc=$?
last=$(grep -E '^step [0-9]+/' "$TMP/g.txt" | tail -1 | sed -E 's/^step ([0-9]+)\/.*/\1/')
if [ $rc -eq 0 ] && grep -q "SIGINT received: stopped after step $last" "$TMP/g.txt" \
    && [ -f "$G/model_$last.bin" ] && [ -f "$G/state_$last.bin" ] && [ -z "$(ls "$G" | grep tmp)" ]; then
    ok "SIGINT: exit 0, checkpoint of step $last written"
else
    bad "SIGINT (exit $rc, last step '$last')"
    tail -3 "$TMP/g.txt"
fi

# (5) the planner without a GPU
"$BIN" --plan-only --preset llama3-8b --seq-len 65536 --gpu-mem 80 > "$TMP/p1.txt" 2>&1
rc=$?
if [ $rc -eq 0 ] && grep -q '^memory plan: B=1 S=65536' "$TMP/p1.txt" && grep -q '^fits: ' "$TMP/p1.txt"; then
    ok "--plan-only llama3-8b S=65536 on 80 GiB fits: $(grep '^fits: ' "$TMP/p1.txt")"
else
    bad "--plan-only llama3-8b S=65536 (exit $rc)"
    tail -5 "$TMP/p1.txt"
fi
"$BIN" --plan-only --preset llama3-8b --seq-len 1048576 --gpu-mem 80 --offload 0 > "$TMP/p2.txt" 2>&1
rc=$?
if [ $rc -eq 1 ] && grep -q 'does not fit' "$TMP/p2.txt"; then
    ok "--plan-only llama3-8b S=1048576 offload 0 refused: $(grep -m1 -o 'does not fit: [^;]*' "$TMP/p2.txt")"
else
    bad "--plan-only llama3-8b S=1048576 --offload 0 (exit $rc, expected 1 with a reason)"
    tail -5 "$TMP/p2.txt"
fi
"$BIN" --plan-only --preset llama3-8b --seq-len 131072 --gpu-mem 80 --offload 0 > "$TMP/p3.txt" 2>&1
rc3=$?
"$BIN" --plan-only --preset llama3-8b --seq-len 131072 --gpu-mem 80 --offload 0 --optimizer adamw8bit > "$TMP/p4.txt" 2>&1
rc4=$?
if [ $rc3 -eq 1 ] && grep -q 'it would fit with 8-bit optimizer moments' "$TMP/p3.txt" && [ $rc4 -eq 0 ] \
    && grep -q 'moments 8-bit block-wise' "$TMP/p4.txt" && grep -q '^  adam_m_absmax' "$TMP/p4.txt"; then
    ok "--plan-only llama3-8b S=131072 offload 0: bf16 moments refused (hint: 8-bit), adamw8bit fits: $(grep '^fits: ' "$TMP/p4.txt")"
else
    bad "--plan-only with adamw8bit (exit $rc3 / $rc4)"
    tail -3 "$TMP/p3.txt" "$TMP/p4.txt"
fi
expect_fail "--plan-only unknown preset" "unknown --preset" "$BIN" --plan-only --preset nope --gpu-mem 80
"$BIN" --plan-only --preset llama3-8b --seq-len 65536 --gpu-mem 80 --lora-rank 16 --base-quant nf4 > "$TMP/p3.txt" 2>&1
rc=$?
if [ $rc -eq 0 ] && grep -q '^  LoRA rank 16 on q,k,v,o,gate,up,down: frozen base (nf4)' "$TMP/p3.txt" \
    && grep -q '^  qbase x32 ' "$TMP/p3.txt" && ! grep -q '^  layer_grads \|^  embed_head_grads ' "$TMP/p3.txt"; then
    ok "--plan-only llama3-8b S=65536 LoRA r16 + NF4 base: no base gradients, 32 quantized layers: $(grep '^fits: ' "$TMP/p3.txt")"
else
    bad "--plan-only with LoRA and an NF4 base (exit $rc)"
    tail -5 "$TMP/p3.txt"
fi
# --host-mem sets the pinned budget the offload plan may use: S=409600 offloaded fits in 109 GiB
# (the 125 GiB device machine's default), not in 40
"$BIN" --plan-only --preset llama3-8b --seq-len 409600 --gpu-mem 80 --offload 1 --lora-rank 16 --base-quant nf4 \
    --host-mem 109 > "$TMP/p4.txt" 2>&1
rc=$?
"$BIN" --plan-only --preset llama3-8b --seq-len 409600 --gpu-mem 80 --offload 1 --lora-rank 16 --base-quant nf4 \
    --host-mem 40 > "$TMP/p5.txt" 2>&1
rc5=$?
if [ $rc -eq 0 ] && grep -q 'host budget 109.0 GiB (--host-mem)' "$TMP/p4.txt" && [ $rc5 -eq 1 ] \
    && grep -q 'budget 80.00 GiB device, 40.00 GiB host' "$TMP/p5.txt"; then
    ok "--plan-only --host-mem: LoRA NF4 S=409600 offloaded fits 109 GiB of host ($(grep '^fits: ' "$TMP/p4.txt")), not 40"
else
    bad "--plan-only --host-mem (exit $rc / $rc5)"
    tail -3 "$TMP/p4.txt" "$TMP/p5.txt"
fi
expect_fail "--host-mem needs a number" "host-mem" "$BIN" --plan-only --preset llama3-8b --gpu-mem 80 --host-mem lots

# (6) a trained checkpoint exports to a Hugging Face directory and back, byte for byte
if python3 scripts/export_hf.py --to-hf "$A/model_8.bin" "$TMP/hf" --tokenizer-from data/default > "$TMP/hf.txt" 2>&1 \
    && python3 scripts/export_hf.py "$TMP/hf" "$TMP/back.bin" >> "$TMP/hf.txt" 2>&1 \
    && cmp -s "$A/model_8.bin" "$TMP/back.bin"; then
    ok "trained checkpoint -> HF -> model.bin is byte-identical"
else
    bad "trained checkpoint export round trip; output:"
    tail -5 "$TMP/hf.txt"
fi

# (7) LoRA on the CPU path, on the 8-step run's model as the base, with an NF4-quantized base: a run
# split by --stop-after and --resume latest equals the uninterrupted one bit for bit (adapters and
# optimizer state); checkpoints hold adapters (lora_<step>.bin), no model.bin; the base is untouched
LB="$A/model_8.bin"
cp "$LB" "$TMP/base_copy.bin"
TL=("${TINY[@]}" --sample-tokens 0 --model "$LB" --lora-rank 4 --lora-alpha 8 --lora-targets q,v,o,down --base-quant nf4)
"$BIN" "${TL[@]}" --steps 6 --ckpt-every 3 --ckpt-dir "$TMP/la" > "$TMP/la.txt" 2>&1 \
    && "$BIN" "${TL[@]}" --steps 6 --stop-after 3 --ckpt-dir "$TMP/lb" > "$TMP/lb1.txt" 2>&1 \
    && "$BIN" "${TL[@]}" --steps 6 --resume latest --ckpt-dir "$TMP/lb" > "$TMP/lb2.txt" 2>&1
rc=$?
if [ $rc -eq 0 ] && cmp -s "$TMP/la/lora_6.bin" "$TMP/lb/lora_6.bin" && cmp -s "$TMP/la/state_6.bin" "$TMP/lb/state_6.bin" \
    && [ "$(step_lines "$TMP/la.txt" | sed -n 4,6p)" = "$(step_lines "$TMP/lb2.txt")" ] \
    && [ "$(ls "$TMP/la" | tr '\n' ' ')" = "lora_3.bin lora_6.bin state_3.bin state_6.bin " ] \
    && cmp -s "$LB" "$TMP/base_copy.bin" && grep -q 'LoRA: rank 4, alpha 8 (scale 2), targets q,v,o,down, frozen base nf4' "$TMP/la.txt"; then
    ok "LoRA + NF4 base: 3 steps + resume latest == 6 steps, bit for bit; checkpoints lora_/state_ only; base untouched"
else
    bad "LoRA resume (exit $rc)"
    ls "$TMP/la" "$TMP/lb"
    diff <(step_lines "$TMP/la.txt" | sed -n 4,6p) <(step_lines "$TMP/lb2.txt")
fi
if python3 scripts/export_hf.py --to-hf "$LB" "$TMP/hf_merged" --lora "$TMP/la/lora_6.bin" --merge-lora > "$TMP/merge.txt" 2>&1 \
    && python3 scripts/export_hf.py --to-hf "$LB" "$TMP/hf_base" --lora "$TMP/la/lora_6.bin" --peft-out "$TMP/peft" \
        > "$TMP/peft.txt" 2>&1 && [ -f "$TMP/peft/adapter_model.safetensors" ] && [ -f "$TMP/peft/adapter_config.json" ] \
    && ! cmp -s "$TMP/hf_merged/model.safetensors" "$TMP/hf_base/model.safetensors"; then
    ok "trained adapters export: --merge-lora into HF weights, --peft-out a PEFT adapter directory"
else
    bad "LoRA export; output:"
    tail -3 "$TMP/merge.txt" "$TMP/peft.txt"
fi
expect_fail "--base-quant without LoRA" "needs LoRA" "$BIN" "${TINY[@]}" --base-quant nf4
expect_fail "--lora-rank without a base" "give the base with --model" "$BIN" "${TINY[@]}" --lora-rank 4
expect_fail "--lora-alpha without --lora-rank" "they need --lora-rank R" "$BIN" "${TINY[@]}" --model "$LB" --lora-alpha 8
expect_fail "LoRA with --optimizer adamw8bit" "LoRA adapters keep AdamW moments" "$BIN" "${TL[@]}" --optimizer adamw8bit --steps 2
expect_fail "--plan-only LoRA with --optimizer adamw8bit" "LoRA adapters keep AdamW moments" \
    "$BIN" --plan-only --preset llama3-8b --gpu-mem 78 --lora-rank 16 --optimizer adamw8bit
expect_fail "--lora-targets with a typo" "'qq' is not one of" "$BIN" "${TINY[@]}" --model "$LB" --lora-rank 4 --lora-targets q,qq
expect_fail "resume with another LoRA rank" "this run asks for rank 8" "$BIN" "${TL[@]}" --lora-rank 8 --steps 6 --resume latest --ckpt-dir "$TMP/lb"
expect_fail "resume a LoRA state with another base quantization" "base nf4; this run has rank 4 alpha 8 targets q,v,o,down base int8" \
    "$BIN" "${TL[@]}" --base-quant int8 --steps 6 --resume latest --ckpt-dir "$TMP/lb"
expect_fail "adapters of another base" "belong to another base model" "$BIN" "${TL[@]}" --model "$TMP/v100.bin" \
    --synthetic-data --steps 6 --resume latest --ckpt-dir "$TMP/lb"

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
