#!/usr/bin/env bash
# A short CUDA check, run by hand on a GPU machine: bf16 DreamBooth training + sampling on the tiny model, then
# the speed benchmark in bf16 on the SD-1.5 UNet. Wheels missing on that machine can be put in .whl/ first.
set -uo pipefail
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
[ -d .whl ] && python3 -m pip install --quiet --no-deps .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, transformers, peft; print(torch.__version__, diffusers.__version__, transformers.__version__, peft.__version__)"
timeout 120 python3 scripts/train_dreambooth_ether.py --mixed_precision bf16 --max_train_steps 60 \
  --instance_data_dir assets/subjects/orange_checkered_star --instance_prompt "a sks star" \
  --with_prior_preservation --class_prompt "a star" --num_class_images 8 --validation_prompt "a sks star" \
  --validation_steps 30 --output_dir outputs/gpu-dreambooth --report_to none --quiet > "$OUT/dreambooth.log" 2>&1
echo "dreambooth bf16 exit $?"; tail -3 "$OUT/dreambooth.log"
python3 -m ether_diffusion.cli inspect outputs/gpu-dreambooth | head -3
cp outputs/gpu-dreambooth/samples.png "$OUT/dreambooth_samples.png" 2>/dev/null
timeout ${BENCH_TIMEOUT:-150} python3 -m ether_diffusion.cli bench speed --device cuda --sections training inference --sizes 32 64 --repeats 5 \
  --steps 25 --mixed_steps 25 --output_dir "$OUT" > "$OUT/bench.log" 2>&1
echo "bench exit $?"; tail -5 "$OUT/bench.log"
