#!/usr/bin/env bash
# The multi-GPU checks, run on a device machine with NP GPUs (default 2) from the repository root:
#
#   bash dev/multi_gpu_check.sh [STAGE...]        (no stage: all of them, in this order)
#
#   build    make -j16 all
#   overlap  ONE GPU: --overlap-optimizer (each layer's AdamW on a side stream) against the plain run,
#            two settings; bitwise equal checkpoints when the plain run repeats bit for bit, else
#            within the tolerance of two plain runs (cuDNN's attention backward may use atomics)
#   comm     mpirun -np NP build/test_comm: every collective, the Ulysses all-to-alls; then its failure
#            modes (--disagree, --die-rank, --hang-rank) must end in the error, not a hang
#   dp       data parallel == one GPU with the same global batch: the step-1 gradient (--dump-grads,
#            gradient accumulation), the losses of 4 steps and the weights after them, with gradient
#            accumulation and with optimizer-in-backward (the side stream); one GPU with B=2*NP
#   sp       sequence parallel (Ulysses) == one GPU on the same sequences, the same three comparisons,
#            plain and with MsT chunks + recompute + offload; S=128*NP tokens per row
#   errors   a clean error, not a hang: LoRA over several GPUs (refused), ranks with different --seq-len (configuration agreement),
#            a rank killed mid-run (the others name it), a rank stopped (the others time out)
#
# Each stage writes $OUT/<stage>.log and the script ends with one PASS/FAIL line per stage; exit
# status 0 only when every stage passed. With fewer than NP GPUs (or no mpirun) the stages that need
# them say SKIPPED and fail, so that a partial machine never reads as a pass.
# Environment: OUT (default /tmp/multi_gpu_check_out), NP (default 2), MPIRUN (default mpirun),
# ARCH (passed on to make).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off on the lent machines
export OMP_WAIT_POLICY=passive
OUT=${OUT:-/tmp/multi_gpu_check_out}
NP=${NP:-2}
MPIRUN=${MPIRUN:-mpirun}
# Open MPI: the variables every rank needs, no core binding (one process per GPU), and root allowed
# (the device machines run as root)
MPI_FLAGS=(-x NCCL_NVLS_ENABLE -x OMP_WAIT_POLICY --bind-to none)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mkdir -p "$OUT"
W=$(mktemp -d "$OUT/work.XXXXXX")
PY=python3
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
# A small run that every comparison shares: the default model (8 heads, 4 kv heads), random tokens.
COMMON=(--synthetic-data --steps 4 --warmup 0 --lr 1e-3 --seed 7 --eval-every 0 --ckpt-every 4 --keep-last 1 --dist-timeout 120)

results=()
overall=0

need_gpus() {  # need_gpus N: 0 when N GPUs and (N > 1) mpirun are there, else says SKIPPED
    if [ "$GPUS" -lt "$1" ]; then echo "SKIPPED: needs $1 GPU(s), found $GPUS"; return 1; fi
    if [ "$1" -gt 1 ] && ! command -v "$MPIRUN" >/dev/null; then echo "SKIPPED: needs $MPIRUN"; return 1; fi
    return 0
}

mpi() {  # mpi ARGS...: NP ranks of ./train_llama
    "$MPIRUN" "${MPI_FLAGS[@]}" -np "$NP" ./train_llama "$@"
}

# run_pair NAME "ONE-GPU ARGS" "NP-GPU ARGS": the two runs into $W/NAME.{one,many}/ (checkpoint,
# log, gradient dump when asked), then the three comparisons.
run_pair() {
    local name=$1 one=$2 many=$3 dump=$4
    local a=$W/$name.one b=$W/$name.many
    mkdir -p "$a" "$b"
    local da=() db=()
    if [ "$dump" = 1 ]; then da=(--dump-grads "$a/grads.bin"); db=(--dump-grads "$b/grads.bin"); fi
    echo "--- $name: one GPU: ./train_llama ${COMMON[*]} $one"
    # shellcheck disable=SC2086
    ./train_llama "${COMMON[@]}" $one --ckpt-dir "$a" --log "$a/log.jsonl" "${da[@]}" || return 1
    echo "--- $name: $NP GPUs: $MPIRUN -np $NP ./train_llama ${COMMON[*]} $many"
    # shellcheck disable=SC2086
    mpi "${COMMON[@]}" $many --ckpt-dir "$b" --log "$b/log.jsonl" "${db[@]}" || return 1
    local ok=0
    if [ "$dump" = 1 ]; then $PY dev/compare_runs.py grads "$a/grads.bin" "$b/grads.bin" || ok=1; fi
    $PY dev/compare_runs.py losses "$a/log.jsonl" "$b/log.jsonl" --steps 4 || ok=1
    $PY dev/compare_runs.py weights "$W/base/model_1.bin" "$a/model_4.bin" "$b/model_4.bin" || ok=1
    return $ok
}

# The starting weights (an lr-0 step leaves them as initialised): what the weight comparison
# measures training's change against. Same shape settings as the runs (the model does not depend on them).
base_model() {
    [ -f "$W/base/model_1.bin" ] && return 0
    ./train_llama "${COMMON[@]}" --steps 1 --lr 0 --ckpt-every 1 --seq-len 128 --batch 2 --ckpt-dir "$W/base" >/dev/null
}

stage_build() { make -j16 all ${ARCH:+ARCH=$ARCH}; }

stage_overlap() {
    need_gpus 1 || return 1
    local ok=0 k=0
    for settings in "--seq-len 256 --batch 4" "--seq-len 512 --batch 2 --mst 4 --moments fp32 --master-weights"; do
        k=$((k + 1))
        for run in plain1 plain2 overlap; do
            local extra=""
            [ "$run" = overlap ] && extra=--overlap-optimizer
            # shellcheck disable=SC2086
            ./train_llama "${COMMON[@]}" $settings $extra --ckpt-dir "$W/ov$k.$run" --log "$W/ov$k.$run.jsonl" >"$W/ov$k.$run.out" || {
                cat "$W/ov$k.$run.out"; return 1; }
        done
        grep -m1 "overlapped optimizer" "$W/ov$k.overlap.out" || { echo "the plan does not show the overlapped optimizer"; ok=1; }
        if cmp -s "$W/ov$k.plain1/model_4.bin" "$W/ov$k.plain2/model_4.bin"; then
            if cmp "$W/ov$k.plain1/model_4.bin" "$W/ov$k.overlap/model_4.bin" && cmp "$W/ov$k.plain1/state_4.bin" "$W/ov$k.overlap/state_4.bin"; then
                echo "settings $k ($settings): plain runs repeat bit for bit; --overlap-optimizer gives the same weights and state: ok"
            else
                echo "settings $k ($settings): --overlap-optimizer differs from the plain run: FAIL"; ok=1
            fi
        else
            echo "settings $k ($settings): two plain runs differ (nondeterministic attention backward): comparing within their spread"
            base_model >/dev/null || return 1
            local spread
            spread=$($PY dev/compare_runs.py weights "$W/base/model_1.bin" "$W/ov$k.plain1/model_4.bin" "$W/ov$k.plain2/model_4.bin" --tol 1 |
                     sed -n 's/.*= \([0-9.e+-]*\) .*/\1/p')
            local tol
            tol=$($PY -c "print(max(3 * float('$spread'), 1e-3))")
            $PY dev/compare_runs.py weights "$W/base/model_1.bin" "$W/ov$k.plain1/model_4.bin" "$W/ov$k.overlap/model_4.bin" --tol "$tol" || ok=1
        fi
        $PY dev/compare_runs.py losses "$W/ov$k.plain1.jsonl" "$W/ov$k.overlap.jsonl" --steps 4 --tol 1e-3 || ok=1
    done
    return $ok
}

stage_comm() {
    need_gpus "$NP" || return 1
    local ok=0 rc last=$((NP - 1))
    "$MPIRUN" "${MPI_FLAGS[@]}" -np "$NP" ./build/test_comm || ok=1
    # failure modes: test_comm's ranks must stop with the error, not hang (timeout 300 guards the check itself)
    local mode args pattern
    for mode in "--disagree|do not run the same configuration" "--die-rank $last|rank $last (pid .*) exited or was killed" \
        "--hang-rank $last --dist-timeout 20|timed out after 20 s"; do
        args=${mode%%|*}
        pattern=${mode#*|}
        # shellcheck disable=SC2086
        timeout 300 "$MPIRUN" "${MPI_FLAGS[@]}" -np "$NP" ./build/test_comm $args >"$W/comm_failure.log" 2>&1
        rc=$?
        expect_error "test_comm $args" "$pattern" "$W/comm_failure.log" "$rc" || ok=1
    done
    return $ok
}

# run_cases "NAME|ARGS|EXTRA ARGS OF THE NP-GPU RUN|DUMP (1: compare step 1's gradient)"...: run_pair each.
run_cases() {
    need_gpus "$NP" || return 1
    base_model || return 1
    local ok=0 c name args extra dump
    for c in "$@"; do
        IFS='|' read -r name args extra dump <<<"$c"
        run_pair "$name" "$args" "$args $extra" "$dump" || ok=1
    done
    return $ok
}

stage_dp() {
    local B=$((2 * NP))
    run_cases "dp_accum|--seq-len 128 --batch $B --grad-accum 2||1" "dp_inback|--seq-len 128 --batch $B||0"
}

stage_sp() {
    local S=$((128 * NP))
    run_cases "sp_accum|--seq-len $S --batch 2 --grad-accum 2|--seq-parallel|1" "sp_inback|--seq-len $S --batch 2|--seq-parallel|0" \
        "sp_mst|--seq-len $S --batch 2 --mst 4 --recompute 1 --offload 1|--seq-parallel|0"
}

# expect_error NAME PATTERN LOGFILE RC: RC non-zero and PATTERN in LOGFILE.
expect_error() {
    local name=$1 pattern=$2 log=$3 rc=$4
    if [ "$rc" -ne 0 ] && grep -q "$pattern" "$log"; then
        echo "$name: exit $rc with: $(grep -m1 "$pattern" "$log"): ok"
        return 0
    fi
    echo "$name: exit $rc, expected a non-zero exit and '$pattern' in the output: FAIL"
    tail -20 "$log"
    return 1
}

# Starts NP ranks by hand (torchrun-style variables) in the background, each with its own log;
# their pids go to the array RANK_PIDS.
start_ranks_by_hand() {
    local tag=$1
    shift
    RANK_PIDS=()
    for ((r = 0; r < NP; r++)); do
        RANK=$r WORLD_SIZE=$NP LOCAL_RANK=$r LOCAL_WORLD_SIZE=$NP TORCHELASTIC_RUN_ID=mgc-$tag-$$ \
            ./train_llama "$@" >"$W/$tag.rank$r.log" 2>&1 &
        RANK_PIDS+=($!)
    done
}

wait_for_step() {  # wait_for_step LOG: until rank 0 has logged step 2 (at most 300 s)
    for ((i = 0; i < 300; i++)); do
        grep -q "^step 2/" "$1" && return 0
        sleep 1
    done
    return 1
}

stage_errors() {
    need_gpus "$NP" || return 1
    local ok=0 rc
    # 1. ranks with another configuration: every rank stops before training, naming what differs
    timeout 300 "$MPIRUN" "${MPI_FLAGS[@]}" -np 1 ./train_llama "${COMMON[@]}" --seq-len 128 --batch "$NP" --ckpt-dir "$W/err1" : \
        -np $((NP - 1)) ./train_llama "${COMMON[@]}" --seq-len 64 --batch "$NP" --ckpt-dir "$W/err1" >"$W/mismatch.log" 2>&1
    rc=$?
    expect_error "ranks disagree on --seq-len" "do not run the same configuration.*batch shape" "$W/mismatch.log" "$rc" || ok=1
    # LoRA trains on one GPU: every rank refuses at once, before any GPU work
    timeout 120 "$MPIRUN" "${MPI_FLAGS[@]}" -np "$NP" ./train_llama "${COMMON[@]}" --seq-len 128 --batch "$NP" --lora-rank 8 \
        --preset llama3-8b --ckpt-dir "$W/err0" >"$W/lora.log" 2>&1
    rc=$?
    expect_error "LoRA over $NP GPUs" "lora-rank trains on one GPU only: this run has $NP ranks" "$W/lora.log" "$rc" || ok=1
    # 2. the last rank is killed mid-run: rank 0 names it and stops (watchdog, well before the timeout)
    local long=(--synthetic-data --steps 100000 --seq-len 128 --batch "$NP" --eval-every 0 --ckpt-every 0 --ckpt-dir "$W/err2" --dist-timeout 600)
    start_ranks_by_hand killed "${long[@]}"
    if wait_for_step "$W/killed.rank0.log"; then
        kill -9 "${RANK_PIDS[$((NP - 1))]}"
        local t0=$SECONDS
        wait "${RANK_PIDS[0]}"
        rc=$?
        expect_error "rank $((NP - 1)) killed" "rank $((NP - 1)) (pid .*) exited or was killed" "$W/killed.rank0.log" "$rc" || ok=1
        echo "rank 0 stopped $((SECONDS - t0)) s after the kill"
    else
        echo "rank kill: the run never reached step 2: FAIL"
        tail -20 "$W/killed.rank0.log"
        ok=1
    fi
    for p in "${RANK_PIDS[@]}"; do kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    # 3. the last rank stops (SIGSTOP: alive but silent): rank 0 times out after --dist-timeout 30
    local stuck=(--synthetic-data --steps 100000 --seq-len 128 --batch "$NP" --eval-every 0 --ckpt-every 0 --ckpt-dir "$W/err3" --dist-timeout 30)
    start_ranks_by_hand stopped "${stuck[@]}"
    if wait_for_step "$W/stopped.rank0.log"; then
        kill -STOP "${RANK_PIDS[$((NP - 1))]}"
        wait "${RANK_PIDS[0]}"
        rc=$?
        expect_error "rank $((NP - 1)) stopped" "timed out after 30 s" "$W/stopped.rank0.log" "$rc" || ok=1
    else
        echo "rank stop: the run never reached step 2: FAIL"
        tail -20 "$W/stopped.rank0.log"
        ok=1
    fi
    for p in "${RANK_PIDS[@]}"; do kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    return $ok
}

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build overlap comm dp sp errors)
for st in "${STAGES[@]}"; do
    case $st in build | overlap | comm | dp | sp | errors) ;; *) echo "unknown stage '$st' (build overlap comm dp sp errors)"; exit 2 ;; esac
    log=$OUT/$st.log
    start=$SECONDS
    { nvidia-smi -L 2>&1; date; echo "NP=$NP"; } >"$log"
    "stage_$st" >>"$log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then results+=("$st PASS $((SECONDS - start)) s"); else results+=("$st FAIL $((SECONDS - start)) s (see $log)"); overall=1; fi
    tail -5 "$log"
done
echo "== multi_gpu_check summary (NP=$NP, $GPUS GPU(s))"
for r in "${results[@]}"; do echo "$r"; done
exit $overall
