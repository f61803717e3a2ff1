#!/usr/bin/env python
"""Controllable synthesis with ETHER: train a condition encoder + ETHER adapters on a frozen Stable Diffusion.

    python scripts/make_control_dataset.py --task segmentation --count 2000 --output_dir data/seg
    accelerate launch scripts/train_control_ether.py --train_data_dir data/seg --max_train_steps 2000 \\
        --validation_image data/seg/conditions/00000000.png --validation_prompt "a red circle" --validation_steps 500

Flags as diffusers' train_controlnet.py; see --help. The task lives in ether_diffusion.control.train.
"""

from ether_diffusion import registry
from ether_diffusion.training.config import TaskKind


def parse_args(argv=None):
    return registry.parse_args(TaskKind.CONTROL, argv)


def main(config):
    result = registry.train(config)
    if result.adapter_path:  # the main process
        print(f"saved {result.adapter_path} after {result.global_step} steps")
    return result


if __name__ == "__main__":
    main(parse_args())
