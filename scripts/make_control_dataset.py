#!/usr/bin/env python
"""Render a tiny-world dataset folder for controllable synthesis (metadata.jsonl + images/ conditions/ masks/).

    python scripts/make_control_dataset.py --task segmentation --count 2000 --output_dir data/seg
    python scripts/make_control_dataset.py --task edges --count 2000 --output_dir data/edges

Scene numbers ``--start ..`` give the same pixels on every machine; the default range is not used by pretraining.
"""

import argparse

from ether_diffusion.control.data import CONTROL_TASKS, write_world_control_dataset

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=CONTROL_TASKS, default="segmentation")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--start", type=int, default=20_000_000)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    folder = write_world_control_dataset(args.output_dir, args.task, args.count, args.start)
    print(f"wrote {args.count} {args.task} rows to {folder / 'metadata.jsonl'}")
