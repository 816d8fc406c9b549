#!/usr/bin/env bash
# Runs every test program of `make test` (after `make all`), one line of verdict each, and ends with
# "N passed, M failed". CPU checks always run; GPU tests run only when a GPU is visible.
set -u
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=passive  # idle OpenMP threads must not spin on a loaded 2-core machine

passed=0
failed=0
failed_names=()

run() {  # run NAME COMMAND...
    local name=$1
    shift
    echo "=== $name: $*"
    local start=$SECONDS
    if "$@"; then
        passed=$((passed + 1))
        echo "=== $name: PASS ($((SECONDS - start)) s)"
    else
        failed=$((failed + 1))
        failed_names+=("$name")
        echo "=== $name: FAIL ($((SECONDS - start)) s)"
    fi
}

run cpu_model ./build/test_cpu_model tests/ref
run quant ./build/test_quant tests/ref
run model_loader ./build/test_model_loader
run tokenizer ./build/test_tokenizer
run dataloader ./build/test_dataloader
run planner ./build/test_planner
run attention_softcap_emu ./build/test_attention_softcap_emu
run adamw8bit ./build/test_adamw8bit
run dist ./build/test_dist
run zero ./build/test_zero
run ulysses ./build/test_ulysses
run gpu_counts ./build/test_gpu_counts
run multi_gpu_cli bash tests/test_multi_gpu_cli.sh
run attn_memory_cli bash tests/test_attn_memory_cli.sh
run export_py python3 -m pytest -q tests/test_export.py
run prepare_py python3 -m pytest -q tests/test_prepare.py
run resume bash tests/test_resume.sh
run adamw8bit_train bash tests/test_adamw8bit_train.sh
run bench_scripts python3 -m pytest -q tests/test_bench_scripts.py
run plot_memory_py python3 -m pytest -q tests/test_plot_memory.py

if nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
    run gpu_kernels ./build/test_kernels --no-timing
    run gpu_matmul ./build/test_matmul
    run gpu_attention ./build/test_attention
    run gpu_attention_softcap ./build/test_attention_softcap
    run gpu_lora_kernels ./build/test_lora_kernels
    run gpu_model ./build/test_llama
    run gpu_comm ./build/test_comm
else
    echo "=== GPU tests SKIPPED: no GPU found (nvidia-smi lists none); run 'make test' on a GPU machine or dev/device_check.sh on the device"
fi

if [ "$failed" -gt 0 ]; then
    echo "failed: ${failed_names[*]}"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
