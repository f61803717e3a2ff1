"""Benchmarks of the paper's protocols on real data or on the tiny world, through the library's own training loop.

- ``dataset``: the DreamBooth dataset layout (``prompts_and_classes.txt``), read strictly; the tiny world in it.
- ``metrics``: DINO / CLIP-I / CLIP-T through transformers, the world evaluator as the offline stand-in, segmenters.
- ``dreambooth`` / ``control``: the drivers behind ``ether-diffusion bench dreambooth`` / ``bench control``.
- ``runs`` / ``report``: the resumable output folder; mean ± sd tables, markdown and plots.
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
