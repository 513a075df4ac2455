#!/usr/bin/env bash
# One device-tool call: record the machine, then run benchmarks.bench for the given flagfiles, saving logs,
# JSON and the Markdown section under $OUT (the device tool brings $OUT back).
#   bash benchmarks/gpu_session.sh benchmarks/presets/bench_h100_qwen7b.flags [more.flags ...] [head_map:SHAPE ...]
set -uo pipefail
OUT=${OUT:-outputs/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, transformers, torch; print('jax', jax.__version__, jax.devices()); print('flax', flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
} 2>&1 | tee "$OUT/env.txt"
for f in "$@"; do
  case "$f" in
    head_map:*)  # the head-map benchmark at a shape, bf16 (issue 16's 7B entry: head_map:qwen2.5-coder-7b)
      shape=${f#head_map:}
      python3 -m benchmarks.head_map --shape="$shape" --device=gpu --dtype=bfloat16 \
        --output="$OUT/head_map_$shape.json" 2>&1 | tee "$OUT/head_map_$shape.log" ;;
    *)
      name=$(basename "$f" .flags)
      python3 -m benchmarks.bench --flagfile="$f" --output="$OUT/$name.json" --markdown="$OUT/$name.md" 2>&1 \
        | tee "$OUT/$name.log" ;;
  esac
done
