#!/usr/bin/env bash
# Training curves of --optimizer adamw8bit against adamw (fp32 moments) on the CPU path: the default
# random-init model (3.6M parameters) on the shipped corpus, 300 steps at S=32, B=2, the default
# lr schedule (3e-3 peak, cosine), the same seed, so both runs see the same init and the same
# batches and their losses pair up step by step. The two runs go side by side, one thread each.
# Prints both curves (50-step means, single steps, validation loss) and checks:
#   (1) |mean over all 300 steps of (loss_8bit - loss_fp32)| <= 0.04 nats
#   (2) every 50-step window: |mean difference| <= 0.10 nats
#   (3) final validation loss (32 batches): |difference| <= 0.10 nats
#   (4) both runs learn: the last window's mean loss is at least 0.5 nats below the first's
# Why these tolerances: what the moments' quantization may change must stay well inside what a real
# change of the optimizer does. Measured on this setup: 8-bit vs fp32 moved the 300-step mean by
# -0.010, windows by at most 0.035, the final validation loss (8 batches) by 0.047; halving the lr
# (fp32) moved the 300-step mean by -0.083 (windows 0.056 to 0.131, validation 0.07 to 0.10),
# doubling it by +0.239 (windows 0.19 to 0.33), and another seed moved windows by 0.11 to 0.22. So
# (1) fails for a 2x error in the effective step size, with 4x margin over what 8-bit did, and (2),
# (3) catch a transient blow-up or a drift at 2-3x margin.
# Ends with "N passed, M failed"; exits non-zero on failure. Needs ./train_llama (make).
set -u
cd "$(dirname "$0")/.."
BIN=${TRAIN_LLAMA:-./train_llama}
export OMP_WAIT_POLICY=passive
[ -x "$BIN" ] || { echo "error: $BIN not found: run make first"; echo "0 passed, 1 failed"; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
RUN=(--cpu --seq-len 32 --batch 2 --steps 300 --seed 7 --eval-every 0 --eval-batches 32 --sample-tokens 0 --ckpt-every 0)

for opt in adamw adamw8bit; do
    OMP_NUM_THREADS=1 "$BIN" "${RUN[@]}" --optimizer "$opt" --ckpt-dir "$TMP/ck_$opt" --log "$TMP/$opt.jsonl" \
        > "$TMP/$opt.txt" 2>&1 &
done
rc=0
for job in $(jobs -p); do wait "$job" || rc=$?; done
if [ $rc -ne 0 ]; then
    echo "a training run failed (exit $rc):"
    tail -3 "$TMP/adamw.txt" "$TMP/adamw8bit.txt"
    echo "0 passed, 1 failed"
    exit 1
fi

python3 - "$TMP/adamw.jsonl" "$TMP/adamw8bit.jsonl" <<'PY'
import json, sys

def load(path):
    steps, val = {}, None
    for line in open(path):
        o = json.loads(line)
        if "loss" in o:
            steps[o["step"]] = o["loss"]
        if "val_loss" in o:
            val = o["val_loss"]
    return steps, val

a, va = load(sys.argv[1])
b, vb = load(sys.argv[2])
n, W = 300, 50
passed = failed = 0

def check(ok, what):
    global passed, failed
    passed += ok
    failed += not ok
    print(f"{'PASS' if ok else 'FAIL'}  {what}")

if sorted(a) != list(range(1, n + 1)) or sorted(b) != list(range(1, n + 1)) or va is None or vb is None:
    print("FAIL  the logs do not hold 300 steps and a final evaluation each")
    print("0 passed, 1 failed")
    sys.exit(1)

print(f"{'steps':>10} {'adamw':>9} {'adamw8bit':>10} {'diff':>8}   (mean training loss)")
worst = 0.0
windows = []
for w0 in range(1, n + 1, W):
    r = range(w0, w0 + W)
    ma, mb = sum(a[s] for s in r) / W, sum(b[s] for s in r) / W
    windows.append((ma, mb))
    worst = max(worst, abs(mb - ma))
    print(f"{w0:>4}-{w0 + W - 1:<5} {ma:9.4f} {mb:10.4f} {mb - ma:+8.4f}")
print(f"{'step':>10} {'adamw':>9} {'adamw8bit':>10} {'diff':>8}   (single steps)")
for s in (1, 10, 50, 100, 150, 200, 250, 300):
    print(f"{s:>10} {a[s]:9.4f} {b[s]:10.4f} {b[s] - a[s]:+8.4f}")
print(f"{'val loss':>10} {va:9.4f} {vb:10.4f} {vb - va:+8.4f}   (32 batches after step 300)")
mean_diff = sum(b[s] - a[s] for s in range(1, n + 1)) / n
check(abs(mean_diff) <= 0.04, f"mean loss difference over 300 steps {mean_diff:+.4f} (tolerance 0.04 nats)")
check(worst <= 0.10, f"largest 50-step window difference {worst:.4f} (tolerance 0.10 nats)")
check(abs(vb - va) <= 0.10, f"final validation loss difference {vb - va:+.4f} (tolerance 0.10 nats)")
drop_a, drop_b = windows[0][0] - windows[-1][0], windows[0][1] - windows[-1][1]
check(drop_a >= 0.5 and drop_b >= 0.5, f"both learn: loss drops {drop_a:.3f} (adamw), {drop_b:.3f} (adamw8bit) nats (>= 0.5)")
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
