#!/usr/bin/env bash
# The DreamBooth quality benchmark on one GPU, run by hand: many processes at once (the tiny model cannot fill a GPU
# alone), one per line of $PARTS_FILE ("subject seed methods... | lr scales..."), each writing its own JSON; the JSONs are
# packed into $OUT/parts.tar and merged afterwards:
#   python scripts/bench_dreambooth_quality.py --merge parts/*/dreambooth_quality.json --output_dir docs/benchmarks
# Class images are made beforehand (outputs/class_images, e.g. by a CPU run) so that parts do not race to write them.
set -uo pipefail
OUT=${OUT:-outputs/gpu-quality}
mkdir -p "$OUT"
[ -d .whl ] && python3 -m pip install --quiet --no-deps .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
n=0
while IFS='|' read -r left scales; do
  [ -z "$left" ] && continue
  read -r subject seed methods <<< "$left"
  n=$((n + 1))
  part="parts/${n}_${subject}_${seed}"
  mkdir -p "$part"
  timeout "${QUALITY_TIMEOUT:-3000}" python3 scripts/bench_dreambooth_quality.py --device cuda --subjects "$subject" \
    --seeds "$seed" --methods $methods --lr_scales $scales --output_dir "$part" > "$part/log.txt" 2>&1 &
done < "${PARTS_FILE:-/dev/stdin}"
wait
echo "all parts done in $(( $(date +%s) - start )) s; runs finished: $(cat parts/*/log.txt | grep -c ' s)$')"
tar cf "$OUT/parts.tar" parts
