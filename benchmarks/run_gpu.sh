#!/usr/bin/env bash
# What a lent GPU machine runs, in one go: the native extension built in place, the
# gpu-marked tests, the JAX benchmark beside Orbax with the arrays on the GPU, and the CUDA
# staging benchmark (torch). Logs and JSON go to OUT_DIR.
#   bash benchmarks/run_gpu.sh OUT_DIR [JAX_SIZE_GIB ...]
# Wheels under .whl/ (grpcio, protobuf) are installed to /tmp/site first if the machine's
# own are too old for the committed stubs.
set -uo pipefail
out=${1:?usage: run_gpu.sh OUT_DIR [JAX_SIZE_GIB ...]}
shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MTCKPT_NATIVE=require PYTHONPATH="$PWD/src:$PWD/tests"
if ! python3 -c "import mtckpt.daemon.rpc" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
python3 setup.py -q build_ext --inplace >"$out/build.log" 2>&1 || { cat "$out/build.log"; exit 1; }
nvidia-smi -L
df -h /dev/shm | tail -1
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
timeout 240 python3 -m pytest -p no:cacheprovider -m gpu tests/gpu -q -rs 2>&1 | tee "$out/tests.log" | tail -15
timeout 120 python3 benchmarks/bench_gpu.py --out "$out/gpu-1.json" >"$out/gpu-1.log" 2>&1
tail -22 "$out/gpu-1.log"
for size in "${@:-1}"; do
    timeout 500 python3 benchmarks/bench_jax.py --platform gpu --size-gib "$size" \
        --out "$out/jax-$size.json" >"$out/jax-$size.log" 2>&1
    sed -n '/^median/,/^note/p' "$out/jax-$size.log"
done
