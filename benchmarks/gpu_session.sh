#!/usr/bin/env bash
# Issue 10's GPU measurements in one device call (a lent H100 has ~15 device minutes per session):
#   1. check_gpu_attention.py: is each cuDNN attention case exact on this GPU?
#   2. bench_gpu.py: LoRA step vs full fine-tuning vs PEFT, Llama-3.2-1B shapes (4x2048), then 8B (2x2048).
# Every result is written to $OUT (default benchmarks/results) as soon as it exists, so a call cut short
# still returns what it measured. Runs from the repo root with the machine's python3 (no install needed:
# the GPU image has jax, flax, optax, orbax, transformers, peft, torch).
#
#   device tool:  run(command="bash benchmarks/gpu_session.sh", timeout_s=570)
#   locally:      OUT=/tmp/gpu PY=.venv/bin/python bash benchmarks/gpu_session.sh --tiny   # smoke run on CPU
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = "--tiny" ]; then
  export JAX_PLATFORMS=cpu
  check=(--impl xla --tiny --repeats 1); models=(tiny); bench=(--tiny --steps 2 --warmup 1)
else
  check=(); models=(1b 8b); bench=(--steps 8 --warmup 2)
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import jax, torch, transformers, peft; print('jax', jax.__version__, jax.devices()[0].device_kind, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
} > "$OUT/gpu_device.txt" 2>&1
cat "$OUT/gpu_device.txt"
timeout 170 "$PY" benchmarks/check_gpu_attention.py "${check[@]}" > "$OUT/gpu_attention_check.md" 2> "$OUT/gpu_attention_check.err"
echo "check_gpu_attention: exit $?"; cat "$OUT/gpu_attention_check.md"
for m in "${models[@]}"; do
  flag=(--models "$m"); [ "$m" = tiny ] && flag=()
  timeout 240 "$PY" benchmarks/bench_gpu.py "${flag[@]}" "${bench[@]}" --out "$OUT/gpu_$m.md" > /dev/null 2> "$OUT/gpu_$m.err"
  echo "bench_gpu $m: exit $?"; cat "$OUT/gpu_$m.md" 2>/dev/null
done
