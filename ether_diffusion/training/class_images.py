"""Prior-preservation class images: generated once with the base model, reused on later runs."""

from __future__ import annotations

from pathlib import Path

from ..files import atomic_write
from ..sampling import sample_images
from .data import IMAGE_EXTENSIONS
from .progress import Progress

__all__ = ["ensure_class_images"]


def ensure_class_images(
    make_pipeline,
    class_prompt: str,
    class_dir: str | Path,
    num_class_images: int,
    batch_size: int = 4,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    show_progress: bool = True,
    progress=None,
) -> int:
    """Top ``class_dir`` up to ``num_class_images`` images of ``class_prompt``; returns how many were generated.

    ``make_pipeline()`` is only called when images are missing. Image ``i`` comes from seed ``seed + i``, so the set
    is the same however often it is interrupted; each file is written atomically. ``progress(done, total)`` is called
    before each batch and at the end (the studio shows it; it may raise to stop); inside
    ``sampling.interruptible`` a stop also ends a batch between denoising steps.
    """
    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    missing = num_class_images - len(existing)
    if missing <= 0:
        return 0
    taken = {p.name for p in existing}
    free = (i for i in range(10**6) if f"class-{i:05d}.png" not in taken)
    indices = [next(free) for _ in range(missing)]
    if progress is not None:
        progress(0, missing)
    pipe = make_pipeline()
    bar = Progress(missing, "class images", every=batch_size, disable=not show_progress)
    for start in range(0, missing, batch_size):
        if progress is not None and start:
            progress(start, missing)
        chunk = indices[start : start + batch_size]
        samples = sample_images(
            pipe,
            [class_prompt],
            [seed + i for i in chunk],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            batch_size=len(chunk),
        )
        for index, sample in zip(chunk, samples):
            with atomic_write(class_dir / f"class-{index:05d}.png") as tmp:
                sample.image.save(tmp, format="PNG")
        bar.update(start + len(chunk))
    bar.close()
    if progress is not None:
        progress(missing, missing)
    return missing
