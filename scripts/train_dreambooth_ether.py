"""DreamBooth with ETHER adapters.

    accelerate launch scripts/train_dreambooth_ether.py \
        --instance_data_dir assets/subjects/orange_checkered_star --instance_prompt "a sks star" \
        --with_prior_preservation --class_prompt "a star" --max_train_steps 400 --output_dir out/star

The model decides the flags: an SDXL folder (model_index.json's _class_name StableDiffusionXLPipeline) takes those of
diffusers' train_dreambooth_lora_sdxl.py (`--help` with that model lists them), SD3 and Flux those of their scripts,
any other SD 1.x/2.x model those of train_dreambooth_lora.py (ether_diffusion.registry; the task and the loop live in
ether_diffusion.training).

    accelerate launch scripts/train_dreambooth_ether.py --pretrained_model_name_or_path stable-diffusion-xl-base-1.0 \
        --pretrained_vae_model_name_or_path sdxl-vae-fp16-fix --mixed_precision fp16 \
        --instance_data_dir dog --instance_prompt "a photo of sks dog" --max_train_steps 500 --output_dir out/dog-xl

Many runs in one process, 8 per step, each into its own folder (docs/training.md: the jobs file):

    accelerate launch scripts/train_dreambooth_ether.py --jobs jobs.toml --pack 8
"""

import sys

from ether_diffusion import registry
from ether_diffusion.training.config import TaskKind


def parse_args(argv=None):
    return registry.parse_args(TaskKind.DREAMBOOTH, argv)


def main(config):
    return registry.train(config)


if __name__ == "__main__":
    if any(arg == "--jobs" or arg.startswith("--jobs=") for arg in sys.argv[1:]):  # many runs: a jobs file
        from ether_diffusion.cli import main as cli

        sys.exit(cli(["train", *sys.argv[1:]]))
    main(parse_args())
