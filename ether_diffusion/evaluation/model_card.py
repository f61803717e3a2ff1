"""The model card of the tiny Stable Diffusion, written from its training record and its measured scores."""

from __future__ import annotations

import json
from pathlib import Path

from ether_diffusion.world.tiny_sd import UNET_CONFIG, VAE_CONFIG

from .quality import GATE_ATTRIBUTES, GATE_THRESHOLD


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def write_model_card(folder: str | Path, result: dict, grid_prompts: list[str]) -> Path:
    folder = Path(folder)
    training_file = folder / "training.json"
    training = json.loads(training_file.read_text()) if training_file.is_file() else {}
    a = training.get("args", {})
    fid = result["heldout_prompt_fidelity"]
    pre = result["pretrain_prompt_fidelity"]
    attrs = [k for k in ("shape", "colour", "background", "texture", "size", "position", "overall") if k in fid]
    fid_rows = "\n".join(
        f"| {k}{' (gate)' if k in GATE_ATTRIBUTES else ''} | {fid[k]:.3f} | {pre.get(k, float('nan')):.3f} |"
        for k in attrs
    )
    subject_rows = "\n".join(
        f"| {name} | `{s['class_prompt']}` | {s['base_vs_instances']:.3f} | {s['rendered_class_vs_instances']:.3f} "
        f"| {s['instances_vs_instances']:.3f} "
        f"| {s['class_prompt_fidelity']:.2f} | {s['class_diversity']:.3f} |"
        for name, s in result["subjects"].items()
    )
    params = training.get("parameters", {})
    component_rows = "\n".join(
        [
            f"| vae | AutoencoderKL, blocks {list(VAE_CONFIG['block_out_channels'])}, 64x64x3 -> 16x16x4, "
            f"scaling factor {training.get('scaling_factor', float('nan')):.4f} | {params.get('vae', 954567):,} |",
            f"| unet | UNet2DConditionModel, blocks {list(UNET_CONFIG['block_out_channels'])}, CrossAttnDown x2 + "
            f"Down, cross-attention mid block, heads of width 32 | {params.get('unet', 2941508):,} |",
            f"| text_encoder | CLIPTextModel, width 128, 3 layers, 4 heads, 32 tokens | "
            f"{params.get('text_encoder', 626048):,} |",
        ]
    )
    grid_list = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(grid_prompts))
    status = "met" if result["gate_passed"] else "NOT met"
    command = (
        "ether-diffusion world pretrain --output_dir outputs/tiny-sd --export_dir assets/tiny-sd "
        f"--device cuda --num_images {a.get('num_images')} --vae_steps {a.get('vae_steps')} "
        f"--vae_batch_size {a.get('vae_batch_size')} --max_train_steps {a.get('max_train_steps')} "
        f"--train_batch_size {a.get('train_batch_size')} --learning_rate {a.get('learning_rate')} "
        f"--time_budget_minutes {a.get('time_budget_minutes')} --seed {a.get('seed')} --render_workers 5"
    )
    text = f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [tiny, synthetic, ether-diffusion]
---

# tiny-sd: a tiny Stable Diffusion of the procedural world

A complete Stable Diffusion (CLIP tokenizer and `CLIPTextModel`, `AutoencoderKL`, `UNet2DConditionModel` with
self- and cross-attention, DDIM scheduler) trained from scratch by `ether-diffusion world pretrain` on the procedural
world of `ether_diffusion.world`: one or two objects (6 shapes, 8 colours, 4 textures, 2 sizes, 5 positions)
on 5 background colours, 64x64 pixels, captions in plain words such as
"a large red striped star at top left on a blue background". It is the project's embedded default: it loads
offline and samples in well under a second on a CPU.

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("assets/tiny-sd")
image = pipe("a small yellow dotted heart at top left on a gray background", height=64, width=64,
             num_inference_steps=25, guidance_scale={result["guidance_scale"]}).images[0]
```

| component | what | parameters |
|---|---|---|
{component_rows}
| tokenizer | CLIPTokenizer: each world word one token, plus single characters (`sks` is new) | |

Folder size: {_size_mb(folder):.1f} MB, safetensors only.

## Training

Trained with

    {command}

on **{training.get("device", "unknown device")}**, sharing the GPU with a second candidate run and the evaluator's
training. Total wall time {training.get("total_seconds")} s: rendering 100,000 images, VAE
{training.get("vae_steps")} steps ({training.get("vae_seconds")} s, batch {a.get("vae_batch_size")}), then UNet and text
encoder jointly {training.get("unet_steps")} steps ({training.get("unet_seconds")} s, batch {a.get("train_batch_size")},
AdamW, cosine learning rate, EMA {a.get("ema_decay")}, min-SNR weighting gamma {a.get("snr_gamma")}, 10 % of captions
dropped for classifier-free guidance, optional words dropped at random so short prompts work). Both phases
stopped on the time budget (`--time_budget_minutes`), so a rerun gives a similar but not bit-identical model.

Pretraining never shows the held-out (shape, colour, background) combinations of
`ether_diffusion.world.heldout.HELD_OUT_TRIPLES`, nor any object with a DreamBooth subject's (colour, texture)
pair. The CPU defaults (`ether-diffusion world pretrain --export_dir assets/tiny-sd`)
are sized for about 80 minutes on a 2-core machine (see docs/tiny_world.md); that CPU run was not the one
that produced these weights.

## Quality gate: {status}

{result["num_prompts"]} prompts of held-out combinations and {result["num_prompts"]} of the pretraining
distribution (seeds never rendered for training), one image each, DDIM {result["num_inference_steps"]} steps,
guidance {result["guidance_scale"]}, read back by the world evaluator (`assets/evaluator`). Prompt fidelity
is the fraction of the prompts' attributes found in the images; the gate asks >= {GATE_THRESHOLD} on
{", ".join(GATE_ATTRIBUTES)} for held-out combinations.

| attribute | held-out combinations | pretraining distribution |
|---|---|---|
{fid_rows}

## Subjects are new to the model

For each DreamBooth subject in `assets/subjects`, {result["num_class_images"]} images of its class prompt from this
base model; subject fidelity is the mean cosine similarity of evaluator embeddings (our DINO). The base model's class
images sit clearly below the instance images' similarity to each other: the subjects are not something the
model already draws. Columns: *base* = base-model class images vs instance images; *rendered* = rendered
pretraining images of the class shape vs instance images (what a perfect base model would draw for the class
prompt, a reference); *instances* = instance images vs each other (pairs of distinct images); *shape read* =
fraction of class images whose shape the evaluator reads as the class noun; *diversity* = mean pairwise
embedding distance among the class images.

| subject | class prompt | base | rendered | instances | shape read | diversity |
|---|---|---|---|---|---|---|
{subject_rows}

## Samples

![samples](samples.png)

Held-out prompts, left to right, top to bottom:

{grid_list}

Reproduce the numbers: `ether-diffusion world evaluate --write_model_card --guidance_scale {result["guidance_scale"]}`.

## Limitations

A toy: 64x64 pixels, a closed vocabulary, no safety checker (there is nothing to check). Textures of small
objects are the weakest attribute.
"""
    path = folder / "README.md"
    path.write_text(text)
    return path
