#!/usr/bin/env bash
# The tiny-world DreamBooth benchmark on one GPU, run by hand: the tiny model cannot fill a GPU alone, so several
# `ether-diffusion bench dreambooth` processes run side by side, one per line of $PARTS_FILE
# ("subject seed methods... | lr scales..."), all writing into one benchmark folder (every run has its own folder, so
# they do not collide; the settings must be the same). A last pass writes the table of every finished run:
#   PARTS_FILE=parts.txt bash scripts/gpu_quality.sh        # then $OUT/bench/dreambooth.{md,json,png}
# Parts of one subject draw its class images at the same time: the same seeded images, each file written atomically.
set -uo pipefail
OUT=${OUT:-outputs/gpu-quality}
DATA="$OUT/tiny-dreambooth"
BENCH="$OUT/bench"
mkdir -p "$OUT"
[ -d .whl ] && python3 -m pip install --quiet --no-deps .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f "$DATA/prompts_and_classes.txt" ] || python3 -m ether_diffusion.cli bench export-world --output "$DATA"
EXTRA=${EXTRA:-}  # flags every part shares, e.g. "--max_train_steps 600"
start=$(date +%s)
n=0
while IFS='|' read -r left scales; do
  [ -z "$left" ] && continue
  read -r subject seed methods <<< "$left"
  n=$((n + 1))
  timeout "${QUALITY_TIMEOUT:-3000}" python3 -m ether_diffusion.cli bench dreambooth --dataset "$DATA" \
    --output_dir "$BENCH" --subjects "$subject" --seeds "$seed" --methods $methods --lr_scales $scales \
    --quiet $EXTRA > "$OUT/part_${n}_${subject}_${seed}.log" 2>&1 &
done < "${PARTS_FILE:-/dev/stdin}"
wait
echo "all parts done in $(( $(date +%s) - start )) s"
python3 -m ether_diffusion.cli bench dreambooth --dataset "$DATA" --output_dir "$BENCH" --report_only $EXTRA \
  | tail -3
