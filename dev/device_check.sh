#!/usr/bin/env bash
# The GPU checks, run on the device machine from the repository root:
#
#   bash dev/device_check.sh STAGE
#
#   build    make -j16 all                                   (log: $OUT/build.log)
#   kernels  build/test_kernels, build/test_matmul, build/test_attention, build/test_attention_softcap,
#            build/test_lora_kernels: correctness, then timings
#   model    build/test_llama: the whole model against the Hugging Face references, every memory setting
#   hf       python3 scripts/check_hf_roundtrip.py: model.bin -> HF -> transformers matches the references
#   train    ./train_llama (the default run, plus --log $OUT/train.jsonl) on the GPU path, then the
#            final checkpoint exported with scripts/export_hf.py --to-hf and loaded by transformers
#            (its loss on val.bin must beat a uniform guess)
#   finetune the LongAlpaca-style sample (data/longalpaca_sample.jsonl) made into masked shards with
#            the default tokenizer (loss on the answers only), then 60 GPU steps of the default model
#            on them; the mean loss of the last 10 steps must be below that of the first 10
#   all      build, kernels, model, hf, train, finetune in order, stopping at the first failure
#
# Each stage writes $OUT/<stage>.log (nvidia-smi -L and the date first) and the script ends with one
# line per stage that ran: PASS or FAIL and its seconds. Exit status 0 only when every stage passed.
# A GPU test that prints SKIPPED (it found no GPU, or skipped a family) counts as a failure here.
# Every command runs under a shared deadline of TIME_BUDGET seconds (default 570) so that the summary
# is printed before the device's 10-minute limit; `all` may need more than one call's time, in which
# case run the stages one by one.
# Environment: OUT (default /tmp/device_check_out), TIME_BUDGET, PEAK_TFLOPS (the roofline that test_matmul
# and test_attention print percentages of; their default when unset), ARCH (passed on to make).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off on the lent machines
export OMP_WAIT_POLICY=passive
if [ -d /usr/local/cuda/bin ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi

OUT=${OUT:-/tmp/device_check_out}
mkdir -p "$OUT"
TIME_BUDGET=${TIME_BUDGET:-570}
DEADLINE=$((SECONDS + TIME_BUDGET))
SUMMARY=()

usage() {
    echo "usage: bash dev/device_check.sh build|kernels|model|hf|train|finetune|all" >&2
    exit 2
}

# Runs a command under the time left before the deadline; a command cut off fails (status 124).
timed() {
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -le 5 ]; then
        echo "error: no time left in the ${TIME_BUDGET}s budget for: $*" >&2
        return 124
    fi
    timeout --kill-after=10 "$left" "$@"
}

# Fails unless nvidia-smi lists a GPU (the GPU tests would otherwise skip and exit 0).
require_gpu() {
    if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        echo "error: nvidia-smi lists no GPU" >&2
        return 1
    fi
}

# Runs one GPU test program; fails on a non-zero exit or when its output says it skipped.
gpu_test() {
    local log
    log=$(mktemp)
    echo "--- $* ($(date -u +%H:%M:%S))"
    timed "$@" 2>&1 | tee "$log"
    local rc=$?
    if [ "$rc" -eq 0 ] && grep -qE 'SKIPPED' "$log"; then
        echo "error: $1 found no GPU and skipped its GPU checks" >&2
        rc=1
    fi
    rm -f "$log"
    echo "--- $1: exit $rc"
    return "$rc"
}

stage_build() {
    if [ ! -f .deps/cudnn_frontend/include/cudnn_frontend.h ]; then
        echo "error: .deps/cudnn_frontend/include is missing: carry .deps/cudnn_frontend (made by 'make deps')" >&2
        return 1
    fi
    if [ -n "${ARCH:-}" ]; then
        timed make -j16 all ARCH="$ARCH"
    else
        timed make -j16 all
    fi
}

stage_kernels() {
    require_gpu || return 1
    local peak=()
    if [ -n "${PEAK_TFLOPS:-}" ]; then peak=("$PEAK_TFLOPS"); fi
    local rc=0
    # Each program checks correctness first and times only when its checks passed.
    gpu_test build/test_kernels || rc=1
    gpu_test build/test_matmul "${peak[@]}" || rc=1
    gpu_test build/test_attention "${peak[@]}" || rc=1
    gpu_test build/test_attention_softcap || rc=1
    gpu_test build/test_lora_kernels || rc=1
    return "$rc"
}

stage_model() {
    require_gpu || return 1
    gpu_test build/test_llama
}

stage_hf() {
    timed python3 scripts/check_hf_roundtrip.py
}

stage_train() {
    require_gpu || return 1
    local log="$OUT/train_llama.out"
    echo "--- ./train_llama ($(date -u +%H:%M:%S))"
    timed ./train_llama --log "$OUT/train.jsonl" 2>&1 | tee "$log"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "error: ./train_llama exited $rc" >&2
        return 1
    fi
    if ! grep -q '^training: .* | GPU$' "$log"; then
        echo "error: ./train_llama did not train on the GPU path (its 'training: ...' line does not end in GPU)" >&2
        return 1
    fi
    # The run's last "checkpoint: DIR/model_<step>.bin + state_<step>.bin" line names the final weights.
    local ckpt
    ckpt=$(grep '^checkpoint: ' "$log" | tail -n 1 | sed -E 's/^checkpoint: ([^ ]+) .*/\1/')
    if [ -z "$ckpt" ] || [ ! -f "$ckpt" ]; then
        echo "error: ./train_llama printed no checkpoint line naming an existing model file" >&2
        return 1
    fi
    echo "--- final checkpoint: $ckpt"
    local hf_dir="$OUT/hf_export"
    rm -rf "$hf_dir"
    timed python3 scripts/export_hf.py --to-hf "$ckpt" "$hf_dir" --tokenizer-from data/default || return 1
    echo "--- transformers load of $hf_dir"
    timed python3 - "$hf_dir" data/default/val.bin <<'EOF'
# Loads the exported checkpoint with transformers and measures its loss on the first tokens of
# val.bin: finite and below ln(vocab) (a uniform guess), or the export lost the trained weights.
import math
import sys

import numpy as np
import torch
import transformers

transformers.utils.logging.disable_progress_bar()
hf_dir, val_path = sys.argv[1], sys.argv[2]
raw = np.fromfile(val_path, dtype="<u4")  # 256-int32 shard header ([2] = n_tokens), then the ids
n_tokens = int(raw[2])
tokens = raw[256:256 + n_tokens].astype(np.int64)[:512]
model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                          attn_implementation="eager")
model.eval()
vocab = model.config.vocab_size
ids = torch.from_numpy(tokens)[None, :]
with torch.no_grad():
    loss = model(input_ids=ids, labels=ids).loss.item()
uniform = math.log(vocab)
print(f"transformers: {type(model).__name__}, {sum(p.numel() for p in model.parameters())} parameters, "
      f"loss on {ids.shape[1]} val tokens {loss:.4f} (uniform guess {uniform:.4f})")
if not (math.isfinite(loss) and loss < uniform):
    print("error: the exported model does no better than a uniform guess", file=sys.stderr)
    sys.exit(1)
EOF
}

stage_finetune() {
    require_gpu || return 1
    local data="$OUT/longalpaca_shards"
    rm -rf "$data"
    timed python3 scripts/prepare_longalpaca.py --tokenizer data/default/tokenizer.json --out-dir "$data" \
        data/longalpaca_sample.jsonl || return 1
    echo "--- ./train_llama on $data ($(date -u +%H:%M:%S))"
    timed ./train_llama --train "$data/train_*.bin" --val "$data/val.bin" --seq-len 512 --batch 4 --steps 60 \
        --lr 2e-3 --warmup 5 --eval-every 20 --ckpt-dir "$OUT/finetune_ckpt" --log "$OUT/finetune.jsonl" \
        2>&1 | tee "$OUT/finetune.out" || return 1
    grep -q '^training: .* | GPU$' "$OUT/finetune.out" || { echo "error: the fine-tune did not run on the GPU path" >&2; return 1; }
    timed python3 - "$OUT/finetune.jsonl" <<'EOF'
# The answer-only loss must fall: mean of the last 10 logged steps below the mean of the first 10.
import json
import sys

steps = [r for r in map(json.loads, open(sys.argv[1])) if "loss" in r]
first = sum(r["loss"] for r in steps[:10]) / 10
last = sum(r["loss"] for r in steps[-10:]) / 10
print(f"fine-tune: {len(steps)} steps, mean loss of the first 10 {first:.4f}, of the last 10 {last:.4f}")
sys.exit(0 if len(steps) >= 20 and last < first else 1)
EOF
}

# Runs stage NAME: header, the stage's function teed to $OUT/NAME.log, then its summary line.
run_stage() {
    local name=$1
    local start=$SECONDS
    {
        echo "=== stage $name"
        date -u
        nvidia-smi -L 2>&1 || echo "(nvidia-smi failed)"
        case "$name" in
            build) stage_build ;;
            kernels) stage_kernels ;;
            model) stage_model ;;
            hf) stage_hf ;;
            train) stage_train ;;
            finetune) stage_finetune ;;
        esac
    } 2>&1 | tee "$OUT/$name.log"
    local rc=$?
    local verdict=PASS
    if [ "$rc" -ne 0 ]; then verdict=FAIL; fi
    SUMMARY+=("$(printf '%-8s %s %5d s' "$name" "$verdict" $((SECONDS - start)))")
    echo "=== stage $name: $verdict ($((SECONDS - start)) s)"
    return "$rc"
}

[ $# -eq 1 ] || usage
case "$1" in
    build | kernels | model | hf | train | finetune) stages=("$1") ;;
    all) stages=(build kernels model hf train finetune) ;;
    *) usage ;;
esac

status=0
for s in "${stages[@]}"; do
    if ! run_stage "$s"; then
        status=1
        break
    fi
done

echo "=== summary ($(date -u))" | tee "$OUT/summary.txt"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$OUT/summary.txt"
exit "$status"
