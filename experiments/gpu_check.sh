#!/usr/bin/env bash
# One-shot accelerator check: everything the benchmark and the scale-out flags need, in one call
# on a lent GPU (under 8 minutes on one H100), written to one table, OUT/gpu_check.md.
#   1. GPT-2 medium, batch 16 x 1024, bfloat16: LoRA against the frozen-base step and full
#      fine-tuning, DoRA, inference merged / unmerged, the mixed-batch strategies of an adapter
#      set, the vmapped sweep (experiments/benchmark.py), and PyTorch + peft eager where a CUDA
#      build of torch is installed;
#   2. QLoRA on SmolLM2-135M's real weights: NF4 and the GGUF file's own Q4_1 blocks against
#      the bfloat16 base (experiments/qlora.py);
#   3. `lora-jax finetune` on every local device (--mesh data=N), bfloat16 compute.
#
#     experiments/gpu_check.sh                 # on the GPU: writes experiments/results/gpu_check/
#     experiments/gpu_check.sh --toy /tmp/gc   # the same steps at toy sizes, on CPU (the tests)
set -euo pipefail
cd "$(dirname "$0")/.."

toy=0
if [ "${1:-}" = "--toy" ]; then toy=1; shift; fi
out=${1:-experiments/results/gpu_check}
mkdir -p "$out"

qlora_rows="LoRA, bfloat16 base;QLoRA NF4;QLoRA GGUF Q4_1 (the file's blocks)"
if [ "$toy" = 1 ]; then
    bench=(--size cpu --batch 2 --seq 32 --iters 2)
    qlora=(--steps 2 --batch-size 2 --eval-batch-size 2 --seq-len 32 --limit-test 2)
    tune=(--steps 2 --batch-size 8 --seq-len 32)
else
    bench=(--size medium --dtype bfloat16 --batch 16 --seq 1024 --iters 10)
    qlora=(--steps 20 --batch-size 8 --eval-batch-size 16 --seq-len 512 --limit-test 64)
    tune=(--steps 60 --batch-size 64 --seq-len 128)
fi
# PyTorch + peft eager only on a CUDA build: the CPU build would time GPT-2 medium on the host.
torch_flag=(--no-torch)
if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    torch_flag=()
fi
devices=$(python -c "import jax; print(jax.local_device_count())")

start=$SECONDS
python experiments/benchmark.py "${bench[@]}" "${torch_flag[@]}" --out "$out/benchmark.json"
python experiments/qlora.py "${qlora[@]}" --rows "$qlora_rows" --out-dir "$out" --name qlora
python -m lora_jax finetune "${tune[@]}" --mesh "data=$devices" --dtype bfloat16 \
    --out "$out/finetune" > "$out/finetune.txt"
elapsed=$((SECONDS - start))

{
    echo "# Accelerator check"
    echo
    python -c "import jax; d = jax.devices()[0]; print(f'{jax.local_device_count()} x ' \
f'{d.device_kind} ({d.platform}), jax {jax.__version__}')"
    toy_word=$([ "$toy" = 1 ] && echo yes || echo no)
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%F)," \
         "toy sizes: $toy_word, all steps: ${elapsed} s"
    echo
    echo "## GPT-2: LoRA, DoRA, full fine-tuning, frozen-base bound, adapter sets, sweeps"
    echo
    cat "$out/benchmark.md"
    echo
    echo "## QLoRA on SmolLM2-135M (real weights)"
    echo
    cat "$out/qlora.md"
    echo
    echo "## lora-jax finetune --mesh data=$devices --dtype bfloat16"
    echo
    echo '```'
    tail -n 5 "$out/finetune.txt"
    echo '```'
} > "$out/gpu_check.md"
echo "wrote $out/gpu_check.md (${elapsed} s)"
