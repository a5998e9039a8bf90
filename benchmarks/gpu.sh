#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one device run (the `device` tool's `run`; ~5-8 min on an
# H200): the train step's MFU with the bfloat16 compute dtype (and float32 for comparison),
# sampling images/s, the scan-vs-loop sampler table, and the Upsample forms (direct vs four
# 2x2 phase convolutions, float32: the library's choice was measured on CPU only). Each table
# also goes to $OUT (or /tmp) as a text file; a failing benchmark does not stop the others.
#
# The device image has jax (CUDA), flax, optax and orbax but not ml_collections: carry its
# wheel in the ignored folder .whl (see BENCHMARKS.md, "GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_info.txt"
failed=()
run() {  # run NAME ARGS...: one benchmark, its table saved as $out/NAME.txt
  local name=$1
  shift
  echo "+ python3 $*"
  python3 "$@" 2>&1 | grep -v "^WARNING" | tee "$out/$name.txt" || failed+=("$name")
}
run gpu_train_bf16 benchmarks/train_throughput.py --no-torch --quick --dtype bfloat16 \
  --configs cifar,digits16 --batches 128,32
run gpu_train_f32 benchmarks/train_throughput.py --no-torch --quick --configs cifar --batches 128
run gpu_sampling_bf16 benchmarks/sampling_throughput.py --quick --dtype bfloat16 \
  --configs cifar,digits16 --batches 256,1024
run gpu_sampler_speed benchmarks/sampler_speed.py --quick
run gpu_upsample benchmarks/cpu_breakdown.py --upsample --quick --configs cifar --batches 32,128
if ((${#failed[@]})); then  # the others ran; the exit status still says which did not
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
