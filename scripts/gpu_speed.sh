#!/usr/bin/env bash
# The GPU table of docs/performance.md in one run: ether-diffusion bench speed --device cuda (SD-1.5 UNet 64² batch 1 and 4, SDXL UNet
# 128² with gradient checkpointing, the host-sync check, 25-step sampling, the compiled blocks, the training step
# captured as a CUDA graph with its 100-step eager/captured check, and 8 DreamBooth runs per step against one: the
# adapters per hour of `train --jobs`), raw log and reports into $OUT.
#
# The GPU machine has torch and peft but no diffusers, and no network. Before the run, on a machine with PyPI:
#     bash scripts/gpu_speed.sh --fetch-wheels        # diffusers + importlib_metadata wheels into .whl/ (ignored)
# then run this script there with .whl carried, e.g. the device tool:
#     run(command="bash scripts/gpu_speed.sh", carry=[".whl"], timeout_s=600)
# Budget: the benchmark stops itself at BENCH_TIMEOUT seconds (default 480); every finished section is kept.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
  python_bin=${PYTHON:-python3}
  version=$("$python_bin" -c "import diffusers; print(diffusers.__version__)" 2>/dev/null || echo "")
  "$python_bin" -m pip download --no-deps --dest .whl "diffusers${version:+==$version}" importlib_metadata zipp
  exit $?
fi

OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
log="$OUT/gpu_speed.log"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
{
  date -u
  # what was measured: a hash of the code (a copied working tree's git metadata can lag behind its files)
  measured="ether_diffusion/*.py ether_diffusion/bench/speed*.py ether_diffusion/bench/timing.py"
  # shellcheck disable=SC2086  # the globs are the point
  echo "code sha256 $(cat $measured | sha256sum | cut -c1-16) ($measured)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
  if ! python3 -c "import diffusers" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "diffusers is missing and .whl/ holds no wheels: see the header"; exit 2; }
    python3 -m pip install --quiet --no-deps --no-index .whl/*.whl 2>&1 | tail -2
  fi
  python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
} > "$log" 2>&1 || { cat "$log"; exit 2; }
cat "$log"

start=$(date +%s)
timeout --signal=INT "${BENCH_TIMEOUT:-480}" python3 -u -m ether_diffusion.cli bench speed --device cuda --output_dir "$OUT" "$@" \
  2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
echo "bench speed exit $status after $(( $(date +%s) - start )) s" | tee -a "$log"
nvidia-smi --query-gpu=name,temperature.gpu,clocks.sm,memory.used --format=csv,noheader >> "$log" 2>&1
exit "$status"
