#!/usr/bin/env bash
# The H200 benchmark in one run (issue 16): the Llama-3.2-1B architecture in bf16 with random weights (the real
# config, an offline tokenizer of the real vocab size; see benchmarks/random_llama.py), our engine at 1, 8, 32, 64 and
# 256 concurrent conversations against the seed's one-at-a-time pipeline, then the targets next to the figures. The
# engine picks its attention (bot/engine/local/attention.py): flash attention 4 with CUDA graphs when flash-attn-4
# works here, else what the image has (SDPA, without CUDA graphs, on the H200 image as it is). It finishes within
# 9 minutes (timeouts: flash-attn-4 check 60 s, smoke run 90 s, measured run 360 s).
#
# The H200 machine has torch 2.11 (CUDA 13) and transformers 5.17 but reaches no package registry, lacks
# pydantic-settings, and its transformers is not the version we pin (the continuous-batching API moves between
# minor releases). So, in two steps:
#
#   benchmarks/gpu_run.sh --fetch-wheels   # here, where PyPI is reachable: the wheels the H200 image lacks, for its
#                                          # Python 3.12, into bench-results/gpu-wheels (git-ignored), and their size
#   benchmarks/gpu_run.sh OUT_DIR          # there: installs them under /tmp, runs, writes OUT_DIR
#
# With the device tool: run(command="bash benchmarks/gpu_run.sh $OUT", carry=["bench-results/gpu-wheels"],
# timeout_s=590). OUT_DIR receives bench.json and bench.md (the table for docs/benchmarks.md), targets.md,
# smoke.json, environment.txt (versions, nvidia-smi, whether flash-attn-4 is used, the attention chosen) and log.txt.
#
# flash-attn-4 compiles its kernels at run time with the CuTe DSL, whose compiler is one wheel
# (nvidia-cutlass-dsl-libs-cu13, 92 MB; -cu12 is as large and needs CUDA 12's runtime, which the image lacks) that
# does not fit in the 64 MiB a run carries. Everything else it needs travels; the script puts flash-attn-4 on the path
# only when benchmarks/flash_attn_probe.py finds that it imports and computes attention right. Drop the compiler's
# wheel into bench-results/gpu-wheels/flash-attn-4 where a run may carry more, and it is used.
#
# Checked on a CPU with small settings, same script, in a Python 3.11 venv that holds only what the H200 image holds
# for this run (its transformers 5.17 and triton 3.6 included; docs/benchmarks.md lists it):
# BENCH_WHEELS=/tmp/w311 BENCH_WHEEL_PYTHON=3.11 benchmarks/gpu_run.sh
# --fetch-wheels, then BENCH_WHEELS=/tmp/w311 PYTHON=/tmp/gpusim/bin/python BENCH_CONFIG=tiny BENCH_DEVICE=cpu
# BENCH_DTYPE=float32 BENCH_CONCURRENCY=1,8,256 BENCH_NEW_TOKENS=8 benchmarks/gpu_run.sh /tmp/gpu-check
set -euo pipefail

WHEELS=${BENCH_WHEELS:-bench-results/gpu-wheels}
FA4_WHEELS=$WHEELS/flash-attn-4
# Exact versions from this project's environment, so the GPU run uses what the tests ran against. asyncpg and
# aiosqlite: bot.settings imports the storage package, which imports both.
PACKAGES=(transformers pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types
  typing-extensions asyncpg aiosqlite)
# flash-attn-4 and what it requires that the H200 image lacks (it has torch, triton, einops, cuda-bindings,
# cuda-pathfinder, protobuf and typing-extensions), less the CuTe DSL compiler (nvidia-cutlass-dsl-libs-cu13).
FA4_PACKAGES=(flash-attn-4==4.0.0b36 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
  nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1)
CARRY_LIMIT_MIB=64 # what the device tool carries in one run: the working tree and the wheels together

cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  python=${PYTHON:-.venv/bin/python}
  download() { # DIR SPEC...: wheels for the target Python, without their dependencies (named here instead)
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "${BENCH_WHEEL_PYTHON:-3.12}" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"
  }
  mkdir -p "$WHEELS" "$FA4_WHEELS"
  rm -f "$WHEELS"/*.whl "$FA4_WHEELS"/*.whl # one version of each, or the install stops
  pinned=()
  for package in "${PACKAGES[@]}"; do
    pinned+=("$package==$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$package")")
  done
  download "$WHEELS" "${pinned[@]}"
  download "$FA4_WHEELS" "${FA4_PACKAGES[@]}"
  du -b "$WHEELS"/*.whl "$FA4_WHEELS"/*.whl | awk '{printf "%8.2f MB  %s\n", $1 / 1e6, $2}'
  wheels=$(du -cb "$WHEELS"/*.whl "$FA4_WHEELS"/*.whl | tail -1 | cut -f1)
  tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
  echo "wheels $((wheels / 2 ** 20)) MiB + working tree $((tree / 2 ** 20)) MiB, of the $CARRY_LIMIT_MIB MiB a run carries"
  if ((wheels + tree > CARRY_LIMIT_MIB * 2 ** 20)); then
    echo "warning: more than a run carries" >&2
  fi
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

install_wheels() { # TARGET WHEEL...
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"
}
attention_of() { # REPORT.json: the attention the engine ran
  "$python" -c "import json, sys; print(json.load(open(sys.argv[1]))['environment']['attention'])" "$1"
}

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  install_wheels /tmp/llamacord-site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/llamacord-site:$PWD
else
  echo "no wheels in $WHEELS: using the packages installed here"
  export PYTHONPATH=$PWD
fi

# flash-attn-4 in a folder of its own, on the path only if it works here (the engine would otherwise pick it
# because it is installed, and fail at its first step). The CuTe DSL's `cutlass` package lies in
# nvidia_cutlass_dsl/dsl_packages, which its .pth file adds to the path in a site-packages but not in a --target folder.
if compgen -G "$FA4_WHEELS/*.whl" >/dev/null; then
  install_wheels /tmp/llamacord-fa4 "$FA4_WHEELS"/*.whl
  fa4_path=/tmp/llamacord-fa4:/tmp/llamacord-fa4/nvidia_cutlass_dsl/dsl_packages
  status=0
  flash_attention=$(PYTHONPATH=$PYTHONPATH:$fa4_path timeout 60 "$python" -m benchmarks.flash_attn_probe) ||
    status=$?
  if ((status == 0)); then
    export PYTHONPATH=$PYTHONPATH:$fa4_path
  fi
  flash_attention=${flash_attention:-"flash-attn-4: not usable (its check printed nothing, exit status $status; 124: over 60 s)"}
else
  flash_attention="flash-attn-4: not usable (no wheels in $FA4_WHEELS)"
fi

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  "$python" - <<'EOF'
import importlib.metadata as m
import platform

import torch

print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("packages on the path the benchmark runs with:")
for name in (
    "transformers", "tokenizers", "accelerate", "huggingface-hub", "pydantic", "pydantic-settings",
    "flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-cu13", "nvidia-cutlass-dsl-libs-cu12",
    "cuda-bindings",
):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "not installed")
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**20, "MiB")
EOF
  echo "$flash_attention"
} | tee "$out/environment.txt"

# Smoke run: the whole path on a tiny model in seconds, so a broken environment fails here, not 5 minutes in.
timeout 90 "$python" -m bot bench --random-weights-config tiny --device "$device" --dtype "$dtype" \
  --concurrency 1,4 --new-tokens 8 --out "$out/smoke"
mv "$out/smoke/bench.json" "$out/smoke.json" && rm -rf "$out/smoke"
echo "attention (smoke run): $(attention_of "$out/smoke.json")" | tee -a "$out/environment.txt"

# The measured run. 256 new tokens per conversation; the KV cache holds the largest level's conversations at once.
# The baseline (the pipeline, one at a time) gets 4 conversations: its throughput does not depend on how many
# users wait.
timeout 360 "$python" -m bot bench --random-weights-config "$config" --device "$device" --dtype "$dtype" \
  --concurrency "${BENCH_CONCURRENCY:-1,8,32,64,256}" --new-tokens "${BENCH_NEW_TOKENS:-256}" \
  --baseline-requests "${BENCH_BASELINE_REQUESTS:-4}" --out "$out"
echo "attention (measured run): $(attention_of "$out/bench.json")" | tee -a "$out/environment.txt"
"$python" -m benchmarks.gpu_targets "$out"
