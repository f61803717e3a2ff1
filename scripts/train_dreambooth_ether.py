"""DreamBooth with ETHER adapters.

    accelerate launch scripts/train_dreambooth_ether.py \
        --instance_data_dir assets/subjects/orange_checkered_star --instance_prompt "a sks star" \
        --with_prior_preservation --class_prompt "a star" --max_train_steps 400 --output_dir out/star

Flags follow diffusers' train_dreambooth_lora.py (see --help); the task and the loop live in ether_diffusion.training.
"""

from ether_diffusion.training.dreambooth import parse_args, train


def main(config):
    return train(config)


if __name__ == "__main__":
    main(parse_args())
