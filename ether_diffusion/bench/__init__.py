"""Benchmarks of the paper's protocols on real data or on the tiny world, through the library's own training loop.

- ``dataset``: the DreamBooth dataset layout (``prompts_and_classes.txt``), read strictly; the tiny world in it.
- ``metrics``: DINO / CLIP-I / CLIP-T through transformers, the world evaluator as the offline stand-in, segmenters.
- ``dreambooth`` / ``control``: the drivers behind ``ether-diffusion bench dreambooth`` / ``bench control``.
- ``runs`` / ``report``: the resumable output folder; mean ± sd tables, markdown and plots. ``claims``: which of the
  processes sharing an output folder runs a run.
- ``ablation`` / ``quality_sweep``: tables and plots over finished runs (``bench ablation-table``, ``bench
  quality-sweep``).

Cost, not quality (``bench speed``, ``bench host``, ``bench cache-latents``, ``bench lora-sizes``):

- ``timing``: interleaved rounds, medians with their range, per-round ratios, peak memory.
- ``speed`` (with ``speed_variants`` and ``speed_report``): a training step, sampling and adapter files of ETHER
  against the frozen-model floor and PEFT's methods; ``host``: the host time an adapter adds per layer;
  ``cache_latents``: what caching latents saves a DreamBooth step; ``lora_sizes``: the exact LoRA files' sizes.
"""

from .dataset import BenchPrompt, BenchSubject, DatasetError, SubjectDataset, export_world_dataset, load_subject_dataset
from .metrics import DinoClipMetrics, Metric, Segmenter, SubjectMetrics, TransformersSegmenter, WorldMetrics
from .runs import BenchInterrupted, BenchMismatchError

__all__ = [
    "BenchInterrupted",
    "BenchMismatchError",
    "BenchPrompt",
    "BenchSubject",
    "DatasetError",
    "DinoClipMetrics",
    "Metric",
    "Segmenter",
    "SubjectDataset",
    "SubjectMetrics",
    "TransformersSegmenter",
    "WorldMetrics",
    "export_world_dataset",
    "load_subject_dataset",
]
