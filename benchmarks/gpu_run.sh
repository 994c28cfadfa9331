#!/usr/bin/env bash
# The H100 benchmark in one run (issue 6): the Llama-3.2-1B architecture in bf16 with random weights (the real
# config, an offline tokenizer of the real vocab size; see benchmarks/random_llama.py), our engine at 1, 8, 32 and 64
# concurrent conversations against the seed's one-at-a-time pipeline. It finishes within 8 minutes.
#
# The GPU machine has torch and transformers but reaches no package registry, and its transformers is not the
# version we pin (the continuous-batching API moves between minor releases). So, in two steps:
#
#   benchmarks/gpu_run.sh --fetch-wheels   # here, where PyPI is reachable: the wheels the GPU image lacks,
#                                          # for its Python 3.12, into bench-results/gpu-wheels (git-ignored)
#   benchmarks/gpu_run.sh OUT_DIR          # there: installs them under /tmp, runs, writes OUT_DIR
#
# With the device tool: run(command="bash benchmarks/gpu_run.sh $OUT", carry=["bench-results/gpu-wheels"],
# timeout_s=540). OUT_DIR receives bench.json and bench.md (the table for docs/benchmarks.md), smoke.json,
# environment.txt and log.txt.
#
# Checked on a CPU with a small config, same script, in a Python 3.11 venv that holds only what the GPU image
# holds (its transformers 5.17 included): BENCH_WHEELS=/tmp/w311 BENCH_WHEEL_PYTHON=3.11 benchmarks/gpu_run.sh
# --fetch-wheels, then BENCH_WHEELS=/tmp/w311 PYTHON=/tmp/gpusim/bin/python BENCH_CONFIG=tiny BENCH_DEVICE=cpu
# BENCH_DTYPE=float32 BENCH_CONCURRENCY=1,8 BENCH_NEW_TOKENS=16 benchmarks/gpu_run.sh /tmp/gpu-check
set -euo pipefail

WHEELS=${BENCH_WHEELS:-bench-results/gpu-wheels}
# Exact versions from this project's environment, so the GPU run uses what the tests ran against.
PACKAGES=(transformers pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types
  typing-extensions)

cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  python=${PYTHON:-.venv/bin/python}
  mkdir -p "$WHEELS"
  for package in "${PACKAGES[@]}"; do
    version=$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$package")
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "${BENCH_WHEEL_PYTHON:-3.12}" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS" "$package==$version"
  done
  ls -l "$WHEELS"
  exit 0
fi

out=${1:?usage: benchmarks/gpu_run.sh OUT_DIR | --fetch-wheels}
mkdir -p "$out"
python=${PYTHON:-python3}
config=${BENCH_CONFIG:-llama-3.2-1b}
device=${BENCH_DEVICE:-cuda}
dtype=${BENCH_DTYPE:-bfloat16}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

exec > >(tee "$out/log.txt") 2>&1

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/llamacord-site \
    "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/llamacord-site:$PWD
else
  echo "no wheels in $WHEELS: using the packages installed here"
  export PYTHONPATH=$PWD
fi

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  "$python" - <<'EOF'
import importlib.metadata as m
import platform

import torch

print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for name in ("transformers", "tokenizers", "accelerate", "huggingface-hub", "pydantic", "pydantic-settings"):
    print(name, m.version(name))
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**20, "MiB")
EOF
} | tee "$out/environment.txt"

# Smoke run: the whole path on a tiny model in seconds, so a broken environment fails here, not 5 minutes in.
timeout 90 "$python" -m bot bench --random-weights-config tiny --device "$device" --dtype "$dtype" \
  --concurrency 1,4 --new-tokens 8 --out "$out/smoke"
mv "$out/smoke/bench.json" "$out/smoke.json" && rm -rf "$out/smoke"

# The measured run. 256 new tokens per conversation; the baseline (about 30 tok/s on a GPU, one at a time) gets
# 4 conversations: its throughput does not depend on how many users wait.
timeout 360 "$python" -m bot bench --random-weights-config "$config" --device "$device" --dtype "$dtype" \
  --concurrency "${BENCH_CONCURRENCY:-1,8,32,64}" --new-tokens "${BENCH_NEW_TOKENS:-256}" \
  --baseline-requests "${BENCH_BASELINE_REQUESTS:-4}" --out "$out"
