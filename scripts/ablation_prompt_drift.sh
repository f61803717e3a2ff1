#!/usr/bin/env bash
# The prompt-drift ablation of docs/quality.md on the tiny world: one `ether-diffusion bench dreambooth` folder per arm, then one table and one
# trade-off plot over all of them (`ether-diffusion bench ablation-table`). docs/quality.md reports what this measured.
#
#   bash scripts/ablation_prompt_drift.sh [OUT]        # OUT: default outputs/prompt-drift; JOBS=2 runs two arms side by side
#
# Choosing arms use training seed 0 (six of them again on seed 1, the *_s1 arms, pooled with seed 0 in a third
# table); the measuring arms (m_*) use seeds 2 and 3, which no choice looked at. Every arm
# is resumable: rerunning the script skips what is finished. Each process runs with one thread (OMP_NUM_THREADS=1),
# as the published numbers were: the CPU's float summation order depends on the thread count, so a run with other
# threads follows another trajectory (the same subject fidelity to ~0.01, prompt fidelity to ~0.03 over four subjects).
# Time on the 2-core reference machine with JOBS=2: 9-16 minutes per choosing arm, about 4.5 hours for all of them.
set -euo pipefail
OUT=${1:-outputs/prompt-drift}
JOBS=${JOBS:-2}
CLI=${CLI:-ether-diffusion}
DATA="$OUT/tiny-dreambooth"
[ -d "$DATA" ] || "$CLI" bench export-world --output "$DATA"

arms=(
  "lora_x1|--methods lora --eval_steps 200 400 --seeds 0"
  "ep_x1|--methods ether_plus --eval_steps 200 400 --seeds 0"
  "ep_x0.3|--methods ether_plus --lr_scales 0.3 --eval_steps 200 400 --seeds 0"
  "ep_nokv|--methods ether_plus --target_modules unet-attention-image --eval_steps 200 400 --seeds 0"
  "ep_nokv_x3|--methods ether_plus --target_modules unet-attention-image --lr_scales 3 --eval_steps 200 400 --seeds 0"
  "ep_nokv_1200|--methods ether_plus --target_modules unet-attention-image --max_train_steps 1200 --eval_steps 300 600 900 --seeds 0"
  "ep_nokv_nb4|--methods ether_plus --target_modules unet-attention-image --n_blocks 4 --seeds 0"
  "ep_nokv_ci10|--methods ether_plus --target_modules unet-attention-image --num_class_images 10 --seeds 0"
  "ep_nokv_prior2|--methods ether_plus --target_modules unet-attention-image --prior_loss_weight 2 --eval_steps 200 400 --seeds 0"
  "ep_self|--methods ether_plus --target_modules unet-self-attention --eval_steps 200 400 --seeds 0"
  "ep_kv|--methods ether_plus --target_modules unet-cross-attention-kv --eval_steps 200 400 --seeds 0"
  "ep_1side|--methods ether_plus --ether_sides input --eval_steps 200 400 --seeds 0"
  "ep1_nokv|--methods ether_plus --ether_sides input --target_modules unet-attention-image --eval_steps 200 400 --seeds 0"
  "ep_out|--methods ether_plus --ether_sides output --eval_steps 200 400 --seeds 0"
  "e_x0.3|--methods ether --lr_scales 0.3 --eval_steps 200 400 --seeds 0"
  "e_nokv|--methods ether --target_modules unet-attention-image --eval_steps 200 400 --seeds 0"
  "e_nokv_x2|--methods ether --target_modules unet-attention-image --lr_scales 2 --eval_steps 200 400 --seeds 0"
  "e_nokv_cos|--methods ether --target_modules unet-attention-image --lr_scheduler cosine --eval_steps 200 400 --seeds 0"
  "e_out|--methods ether --ether_sides output --eval_steps 200 400 --seeds 0"
  "e_init|--methods ether --max_train_steps 1 --seeds 0"
  "lora_x1_s1|--methods lora --eval_steps 200 400 --seeds 1"
  "ep_x1_s1|--methods ether_plus --eval_steps 200 400 --seeds 1"
  "ep_x0.3_s1|--methods ether_plus --lr_scales 0.3 --eval_steps 200 400 --seeds 1"
  "ep_nokv_s1|--methods ether_plus --target_modules unet-attention-image --eval_steps 200 400 --seeds 1"
  "ep_kv_s1|--methods ether_plus --target_modules unet-cross-attention-kv --eval_steps 200 400 --seeds 1"
  "e_nokv_s1|--methods ether --target_modules unet-attention-image --eval_steps 200 400 --seeds 1"
  "m_lora|--methods lora --seeds 2 3"
  "m_e_paper|--methods ether --seeds 2 3"
  "m_ep_paper|--methods ether_plus --seeds 2 3"
  "m_e_nokv|--methods ether --target_modules unet-attention-image --seeds 2 3"
  "m_ep_nokv|--methods ether_plus --target_modules unet-attention-image --seeds 2 3"
)

run_arm() {
  local name=${1%%|*} flags=${1#*|}
  # shellcheck disable=SC2086  # the flags are words
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$CLI" bench dreambooth --dataset "$DATA" --output_dir "$OUT/$name" --quiet \
    $flags > "$OUT/$name.log" 2>&1 && echo "$name done" || echo "$name FAILED (see $OUT/$name.log)"
}
export -f run_arm
export OUT DATA CLI
printf '%s\n' "${arms[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_arm "$@"' _ {}

choose=() measure=() two_seeds=()
for arm in "${arms[@]}"; do
  name=${arm%%|*}
  if [[ $name == m_* ]]; then measure+=(--arm "$name=$OUT/$name")
  elif [[ $name == *_s1 ]]; then two_seeds+=(--arm "${name%_s1}=$OUT/${name%_s1},$OUT/$name")  # seeds 0 and 1 pooled
  else choose+=(--arm "$name=$OUT/$name"); fi
done
"$CLI" bench ablation-table "${choose[@]}" --reference "$OUT/lora_x1" --output "$OUT/choose"
"$CLI" bench ablation-table "${measure[@]}" --reference "$OUT/m_lora" --output "$OUT/measure"
"$CLI" bench ablation-table "${two_seeds[@]}" --reference "$OUT/lora_x1,$OUT/lora_x1_s1" \
  --output "$OUT/choose_two_seeds"
