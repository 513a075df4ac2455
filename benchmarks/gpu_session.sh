#!/usr/bin/env bash
# One device-tool call: record the machine, then run benchmarks.bench for the given flagfiles and
# benchmarks.head_map for each head_map:SHAPE, in the order given, saving logs and JSON (and the bench's
# Markdown section) under $OUT (the device tool brings $OUT back), and benchmarks.gpu_probe for each
# probe:PART:SHAPE (e.g. probe:profile:qwen2.5-coder-7b). All output goes to $OUT/session.log.
#   bash benchmarks/gpu_session.sh benchmarks/presets/bench_h100_qwen7b.flags [more.flags ...] [head_map:SHAPE ...]
#        [probe:PART:SHAPE ...]
# Any entry may end in @FLAG[@FLAG...]: flags for that step alone, after the others (an A/B in one call, e.g.
# probe:scan:qwen2.5-coder-7b probe:scan:qwen2.5-coder-7b@--attention=fused); a bench entry with its own flags
# writes <preset>_<entry number>.json / .md, so the two runs of an A/B keep their files apart. A token
# env:NAME=VALUE sets an environment variable for that step alone (e.g. an XLA flag A/B:
# probe:knockout:qwen2.5-coder-7b@--groups=4@env:XLA_FLAGS=--xla_gpu_enable_triton_gemm=false).
# Environment (all optional):
#   SESSION_DEADLINE_S  stop every step this many seconds after the script started (the step running then is
#                       cut with `timeout`; the bench has saved each finished workload's JSON by then), so the
#                       call returns, with its files, inside the device tool's limit
#   BENCH_FLAGS         extra flags for every benchmarks.bench step (after the flagfile, so they override it)
#   HEAD_MAP_FLAGS      extra flags for every benchmarks.head_map step (e.g. --cells_per_call=392 --repeats=2)
#   PROBE_FLAGS         extra flags for every benchmarks.gpu_probe step (e.g. --repeats=5)
#   PACK                1 (default): at the end, pack $OUT's result files into results.tgz and its profiler traces
#                       into traces.tgz (the device tool brings back at most 8 files, 16 MiB each); 0: leave them
set -uo pipefail
OUT=${OUT:-outputs/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$SECONDS

# `timeout` for the time left before the deadline (0 = no limit); returns 1 when the deadline has passed.
left() {
  if [ -z "${SESSION_DEADLINE_S:-}" ]; then echo 0; return 0; fi
  local rest=$(( SESSION_DEADLINE_S - (SECONDS - start) ))
  if [ "$rest" -le 5 ]; then echo "deadline passed: skipping $1" >&2; return 1; fi
  echo "$rest"
}

session() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, transformers, torch; print('jax', jax.__version__, jax.devices()); print('flax', flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
  local i=0 f extra tag token
  local -a step_env parts
  for entry in "$@"; do
    i=$(( i + 1 ))
    f=${entry%%@*}
    extra=""
    tag=""
    step_env=()
    if [ "$f" != "$entry" ]; then
      IFS='@' read -r -a parts <<< "${entry#*@}"
      for token in "${parts[@]}"; do
        case "$token" in
          env:*) step_env+=("${token#env:}") ;;
          *) extra="$extra $token" ;;
        esac
      done
      extra=${extra# }
      tag="_$i"
    fi
    echo "=== $entry ($(( SECONDS - start )) s)"
    case "$f" in
      head_map:*)  # the head-map benchmark at a shape, bf16 (issue 16's 7B entry: head_map:qwen2.5-coder-7b)
        shape=${f#head_map:}
        t=$(left "$f") || continue
        # shellcheck disable=SC2086  # HEAD_MAP_FLAGS and $extra are lists of flags
        env "${step_env[@]}" timeout "$t" python3 -m benchmarks.head_map --shape="$shape" --device=gpu --dtype=bfloat16 \
          --output="$OUT/head_map_$shape$tag.json" ${HEAD_MAP_FLAGS:-} $extra ;;
      probe:*)  # probe:PART:SHAPE, a benchmarks.gpu_probe part (profile writes its summary and trace into $OUT)
        rest=${f#probe:}
        t=$(left "$f") || continue
        # shellcheck disable=SC2086  # PROBE_FLAGS and $extra are lists of flags
        env "${step_env[@]}" timeout "$t" python3 -m benchmarks.gpu_probe "${rest%%:*}" --shape="${rest#*:}" --out_dir="$OUT" \
          ${PROBE_FLAGS:-} $extra ;;
      *)
        name=$(basename "$f" .flags)
        t=$(left "$f") || continue
        # shellcheck disable=SC2086  # BENCH_FLAGS and $extra are lists of flags
        env "${step_env[@]}" timeout "$t" python3 -m benchmarks.bench --flagfile="$f" --output="$OUT/$name$tag.json" \
          --markdown="$OUT/$name$tag.md" ${BENCH_FLAGS:-} $extra ;;
    esac
  done
  echo "session: $(( SECONDS - start )) s"
}

# Pack the results (JSON, Markdown, HLO text) and the traces into two archives, session.log left beside them.
pack() {
  local small=() traces=() f
  for f in "$OUT"/*; do
    [ -f "$f" ] || continue
    case "$(basename "$f")" in
      session.log|results.tgz|traces.tgz) ;;
      *.xplane.pb) traces+=("$(basename "$f")") ;;
      *) small+=("$(basename "$f")") ;;
    esac
  done
  if [ ${#small[@]} -gt 0 ]; then tar czf "$OUT/results.tgz" -C "$OUT" "${small[@]}" && (cd "$OUT" && rm -f "${small[@]}"); fi
  if [ ${#traces[@]} -gt 0 ]; then tar czf "$OUT/traces.tgz" -C "$OUT" "${traces[@]}" && (cd "$OUT" && rm -f "${traces[@]}"); fi
  ls -l "$OUT"
}

# One log for everything (the device tool brings back at most 8 files): $OUT/session.log.
session "$@" 2>&1 | tee "$OUT/session.log"
if [ "${PACK:-1}" = "1" ]; then pack 2>&1 | tee -a "$OUT/session.log"; fi
