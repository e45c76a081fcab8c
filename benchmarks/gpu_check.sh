#!/usr/bin/env bash
# The GPU checks, as one run on a machine with CUDA: the CUDA correctness tests (the batched
# device route against numpy float64 on rotated slices up to condition number 1e6; a whole pytest
# run on cuda, in one process and under -n 2, against the CPU run), then the Llama-3-8B-shaped
# benchmark on the trained-like checkpoint (MLP included, 16 GB) with floor and plugin rows on
# the GPU as well as on the CPU.
#
#     bash benchmarks/gpu_check.sh                                   # 32 layers, 3 runs each
#     LAYERS=4 REPEAT=1 ATTENTION_ONLY=1 bash benchmarks/gpu_check.sh  # a quick try
#     KINDS=trained-like,isotropic bash benchmarks/gpu_check.sh      # both checkpoints
#
# It needs python3 with torch (CUDA build), pytest, pytest-xdist, safetensors, numpy, hypothesis,
# rich, loky and regex (the package's dependencies), and installs this package into it without
# the network. Logs and the figures go to
# $OUT (default .bench/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.bench/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if ! python3 -m pip install --quiet --no-deps --no-build-isolation --no-index -e .; then
    # No usable build backend offline: load the plugin from the checkout in every pytest
    # process instead (PYTEST_PLUGINS reaches the test's own subprocess runs too).
    echo "pip install failed; loading pytest-spectral from $PWD"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    python3 -c 'import importlib.metadata as m, sys
sys.exit(not any(e.name == "spectral" for e in m.entry_points(group="pytest11")))' \
        || export PYTEST_PLUGINS=pytest_spectral.plugin  # unless metadata in the checkout registers it
fi
python3 - <<'EOF' | tee "$out/device.txt"
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
for index in range(torch.cuda.device_count()):
    print(f"cuda:{index}: {torch.cuda.get_device_name(index)}")
EOF

# A failing test does not stop the benchmark; the script still exits with the tests' status.
tests=0
python3 -m pytest tests/test_engine.py tests/test_plugin.py -k "cuda or device" \
    -p no:randomly -p no:cacheprovider -rs -v 2>&1 | tee "$out/cuda_tests.log" || tests=$?

bench=(--layers "${LAYERS:-32}" --repeat "${REPEAT:-3}" --kinds "${KINDS:-trained-like}"
       --device "${DEVICE:-cuda}" --dir "${BENCH_DIR:-/tmp/spectral-bench}" --json "$out/bench.json")
if [ -n "${ATTENTION_ONLY:-}" ]; then bench+=(--attention-only); fi
python3 benchmarks/bench_llama_shaped.py "${bench[@]}" 2>&1 | tee "$out/bench.log"
exit "$tests"
