"""What the training flags added for diffusers/kohya parity do, on a tiny pipeline built from configs: captions
(kohya files, datasets) reaching the text encoder, --repeats, --push_to_hub against a local stand-in of
huggingface_hub's upload, --optimizer prodigy, --text_encoder_lr, --cache_latents (same adapter, fewer VAE calls,
exact resume), --pre_compute_text_embeddings, tokenizer length and attention mask, resampling, the validation sampler,
progress lines in logs, an SDXL run with captions and both caches, and bad input on these surfaces (captions and
prompts over their limit or not UTF-8, dataset images that skip no check, number flags too large for torch)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    build_char_tokenizer,
    build_tiny_sdxl_components,
    build_training_world,
    dreambooth_config,
    png_header,
)
from PIL import Image
from torch.testing import assert_close

from ether_diffusion.io import read_adapter_file
from ether_diffusion.registry import task_for
from ether_diffusion.training import Callback, ConfigError
from ether_diffusion.training.data import DreamBoothDataset, load_captioned_folder, to_pixels
from ether_diffusion.training.dreambooth import DreamBoothConfig
from ether_diffusion.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a sks star"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny SD world (square 16-pixel images at the model's 16-pixel resolution: one crop each), with captions
    beside two of its three images: 0.txt a caption, 1.txt empty (falls back), 2.png none."""
    root = build_training_world(tmp_path_factory.mktemp("flags"), (16, 16))
    captioned = root / "captioned"
    captioned.mkdir()
    for path in sorted((root / "instance").glob("*.png")):
        (captioned / path.name).write_bytes(path.read_bytes())
    (captioned / "0.txt").write_text("  a sks star on grass\n")
    (captioned / "1.txt").write_text("")
    return root


def config_for(world, output_dir, **changes) -> DreamBoothConfig:
    return dreambooth_config(world, output_dir, **{"instance_prompt": PROMPT, "no_final_reload": True, **changes})


def tokens(world, prompt: str, length: int = 16):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(world / "model" / "tokenizer")
    return tokenizer(prompt, padding="max_length", max_length=length, truncation=True)


def token_ids(world, prompt: str, length: int = 16) -> tuple:
    return tuple(tokens(world, prompt, length).input_ids)


class Watch(Callback):
    """Counts calls of the VAE encoder and records what the text encoders receive, from the first step on."""

    def __init__(self, task):
        self.task, self.encodes, self.text_calls = task, 0, []

    def on_train_start(self, total_steps, start_step):
        vae = self.task.backend.components.vae
        encode = vae.encode

        def counted(*args, **kwargs):
            self.encodes += 1
            return encode(*args, **kwargs)

        vae.encode = counted
        for encoder in self.task.backend.text_encoders().values():
            encoder.register_forward_pre_hook(self._text, with_kwargs=True)

    def _text(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        self.text_calls.append((ids.tolist(), kwargs.get("attention_mask")))


def run(config, *callbacks):
    task = task_for(config)
    watch = Watch(task)
    result = Trainer(task, [watch, *callbacks]).train()
    return task, watch, result


def tensors(path):
    return read_adapter_file(path).tensors


def assert_same_adapter(a, b):
    a, b = tensors(a), tensors(b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- captions and datasets -------------------------------------------------------------------------------------------
def test_kohya_caption_files_reach_the_text_encoder(world, tmp_path):
    images, prompts = load_captioned_folder(world / "captioned", PROMPT)
    assert prompts == ["a sks star on grass", PROMPT, PROMPT] and len(images) == 3  # stripped; empty/none: fallback
    config = config_for(world, tmp_path, instance_data_dir=str(world / "captioned"), max_train_steps=3)
    task, watch, result = run(config)
    seen = {tuple(row) for ids, _ in watch.text_calls for row in ids}
    assert seen == {token_ids(world, "a sks star on grass"), token_ids(world, PROMPT)}
    assert "1 of 3 images with their own caption" in (tmp_path / "README.md").read_text()


def test_a_saved_dataset_and_an_image_folder_with_metadata(world, tmp_path):
    import datasets

    files = sorted((world / "instance").glob("*.png"))
    captions = ["a sks star at night", "", "a sks star in snow"]
    folder = tmp_path / "folder"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as handle:
        for f, caption in zip(files, captions):
            (folder / f.name).write_bytes(f.read_bytes())
            handle.write(json.dumps({"file_name": f.name, "text": caption}) + "\n")
    # a dataset saved with save_to_disk, its columns named otherwise (built from the folder: datasets' in-memory
    # tables cannot be fingerprinted with every pyarrow release)
    saved = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "c"))
    saved.rename_columns({"image": "picture", "text": "prompt"}).save_to_disk(str(tmp_path / "saved"))
    expected = ["a sks star at night", PROMPT, "a sks star in snow"]
    for name, image_column, caption_column in [("saved", "picture", "prompt"), ("folder", "image", "text")]:
        config = config_for(world, tmp_path / f"out-{name}", instance_data_dir=None, dataset_name=str(tmp_path / name),
                            image_column=image_column, caption_column=caption_column, max_train_steps=3,
                            cache_dir=str(tmp_path / "cache")).validate()  # fmt: skip
        task, watch, _ = run(config)
        assert task.instance_prompts == expected
        for image, file in zip(task.instance_images, files):
            assert np.array_equal(np.asarray(image), np.asarray(Image.open(file).convert("RGB")))
        seen = {tuple(row) for ids, _ in watch.text_calls for row in ids}
        assert seen == {token_ids(world, p) for p in expected}
    # without --caption_column every image gets the instance prompt; a wrong column lists the real ones
    config = config_for(world, tmp_path / "x", instance_data_dir=None, dataset_name=str(tmp_path / "saved"),
                        image_column="picture").validate()  # fmt: skip
    task = task_for(config)
    task.check_inputs()
    assert task.instance_prompts == [PROMPT] * 3
    config.image_column = "image"
    with pytest.raises(ValueError, match=r"--image_column 'image' is not a column .* picture, prompt"):
        task_for(config).check_inputs()


def test_repeats_list_each_image_in_place(world, tmp_path):
    tokenizer = build_char_tokenizer(tmp_path)
    images = [Image.new("RGB", (16, 16), c) for c in ("red", "green", "blue")]
    dataset = DreamBoothDataset(images, ["r", "g", "b"], tokenizer, 16, center_crop=True, repeats=3)
    assert len(dataset) == 9
    keys = [dataset[i]["instance"]["latent_key"][1].item() for i in range(9)]
    assert keys == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [dataset[i]["instance"]["prompt_index"].item() for i in (0, 3, 6)] == [0, 1, 2]


def test_resampling_filter_is_the_one_asked_for(tmp_path):
    tokenizer = build_char_tokenizer(tmp_path)
    image = Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype("uint8"))
    pixels = {}
    for mode, pil in (("lanczos", Image.LANCZOS), ("bicubic", Image.BICUBIC), ("nearest", Image.NEAREST)):
        dataset = DreamBoothDataset([image], PROMPT, tokenizer, 16, center_crop=True, interpolation=mode)
        pixels[mode] = dataset[0]["instance"]["pixel_values"]
        expected = image.resize((19, 16), pil).crop((1, 0, 17, 16))
        assert torch.equal(pixels[mode], to_pixels(expected))
    assert not torch.equal(pixels["lanczos"], pixels["bicubic"])


# --- the hub ---------------------------------------------------------------------------------------------------------
def test_push_to_hub_uploads_the_adapter_card_and_images(world, tmp_path, monkeypatch):
    """huggingface_hub's create_repo and upload_folder replaced by local stand-ins: the repository is created before
    training, and the upload copies what upload_folder's own filter selects into a local 'hub' folder."""
    import shutil
    import types

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = []
    hub = tmp_path / "hub"

    def create_repo(repo_id, *, token=None, exist_ok=False, **kwargs):
        calls.append(("create", repo_id, token, exist_ok))
        return types.SimpleNamespace(repo_id=f"someone/{repo_id}" if "/" not in repo_id else repo_id)

    def upload_folder(*, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, token=None,
                      commit_message=None, **kwargs):  # fmt: skip
        assert calls and calls[-1][0] == "create"
        root = Path(folder_path)
        files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
        chosen = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        for name in chosen:
            (hub / repo_id / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / name, hub / repo_id / name)
        calls.append(("upload", repo_id, token, commit_message))

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    out = tmp_path / "sks-star"
    config = config_for(world, out, push_to_hub=True, hub_token="hf_secret", validation_prompt=PROMPT,
                        validation_steps=2, checkpointing_steps=1, no_final_reload=False)  # fmt: skip
    run(config)
    assert calls[0] == ("create", "sks-star", "hf_secret", True)  # default id: the output folder's name
    assert calls[1] == ("upload", "someone/sks-star", "hf_secret", "ether-diffusion dreambooth: 2 steps")
    uploaded = sorted(str(p.relative_to(hub / "someone" / "sks-star")) for p in hub.rglob("*") if p.is_file())
    assert uploaded == ["README.md", "ether_adapter.safetensors", "samples.png", "validation/step-000000_0.png",
                        "validation/step-000002_0.png"]  # fmt: skip
    assert (out / "checkpoint-1").is_dir()  # stays local
    assert "hf_secret" not in (out / "checkpoint-2" / "run.json").read_text()
    assert "hf_secret" not in (out / "README.md").read_text()


def test_a_hub_that_cannot_be_reached_fails_before_training(world, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "create_repo", offline)
    with pytest.raises(RuntimeError, match="could not be created or reached .* nothing has been trained yet"):
        run(config_for(world, tmp_path, push_to_hub=True, hub_model_id="me/x"))
    assert not (tmp_path / "ether_adapter.safetensors").exists()


# --- optimizers ------------------------------------------------------------------------------------------------------
class Logs(Callback):
    def __init__(self):
        self.logs = []

    def on_step(self, step, logs):
        self.logs.append(logs)


def test_prodigy_trains_every_group(world, tmp_path):
    import prodigyopt

    config = config_for(world, tmp_path / "prodigy", optimizer="Prodigy", learning_rate=1.0, max_train_steps=3,
                        train_text_encoder=True, adam_weight_decay_text_encoder=0.01).validate()  # fmt: skip
    task, _, result = run(config)
    assert all(np.isfinite(result.losses))
    assert [(g["name"], g["lr"], g.get("weight_decay")) for g in task.parameter_groups()] == [
        ("text_encoder", 1.0, 0.01), ("adapter", 1.0, None)]  # fmt: skip
    assert isinstance(Trainer(task)._optimizer(task.parameter_groups()), prodigyopt.Prodigy)
    trained = tensors(result.adapter_path)
    initial = _initial_vectors(task_for(config_for(world, tmp_path / "init", train_text_encoder=True)))
    moved = {k.split(".")[0] for k in trained if not torch.equal(trained[k], initial[k])}
    assert moved == {"unet", "text_encoder"}  # both groups stepped
    with pytest.raises(ConfigError, match="one learning rate for every parameter group"):
        config.replace(text_encoder_lr=0.5).validate()


def test_text_encoder_lr_is_the_text_encoders_own(world, tmp_path):
    logs = Logs()
    config = config_for(world, tmp_path, train_text_encoder=True, text_encoder_lr=5e-4, lr_scheduler="linear",
                        max_train_steps=2)  # fmt: skip
    task, _, _ = run(config, logs)
    assert [(g["name"], g["lr"]) for g in task.parameter_groups()] == [("text_encoder", 5e-4), ("adapter", 6e-3)]
    assert [round(entry["text_encoder_lr"], 10) for entry in logs.logs] == [2.5e-4, 0.0]  # linear decay of its own
    assert [round(entry["lr"], 10) for entry in logs.logs] == [3e-3, 0.0]
    assert set(Trainer(task)._optimizer(task.parameter_groups()).param_groups[0]) >= {"lr", "weight_decay"}


def _initial_vectors(task):
    from accelerate import Accelerator

    from ether_diffusion.training.task import Run

    task.setup(Run(Accelerator(cpu=True), torch.float32, torch.Generator()))
    path = Path(task.config.output_dir) / "init.safetensors"
    Path(task.config.output_dir).mkdir(parents=True, exist_ok=True)
    return tensors(task.save(path))


# --- latent cache ----------------------------------------------------------------------------------------------------
def test_cached_latents_train_the_same_adapter_with_one_encode_per_image(world, tmp_path):
    common = dict(center_crop=True, max_train_steps=6, lr_scheduler="cosine")
    _, plain_watch, plain = run(config_for(world, tmp_path / "plain", **common))
    task, cached_watch, cached = run(config_for(world, tmp_path / "cached", cache_latents=True, **common))
    assert plain_watch.encodes == 6 and cached_watch.encodes == 3  # 3 images, one crop each: encoded once
    assert len(task.backend.latent_cache) == 3
    assert cached.losses == plain.losses
    assert_same_adapter(plain.adapter_path, cached.adapter_path)


def test_cached_latents_follow_flips_and_resume_exactly(world, tmp_path):
    common = dict(random_flip=True, cache_latents=True, max_train_steps=8, checkpointing_steps=4,
                  with_prior_preservation=True, class_prompt="a star", num_class_images=2,
                  class_data_dir=str(tmp_path / "class"))  # fmt: skip
    task, watch, straight = run(config_for(world, tmp_path / "straight", **common))
    keys = set(task.backend.latent_cache)
    assert {k[4] for k in keys} == {0, 1}  # flipped and unflipped inputs are different entries
    assert len(keys) == watch.encodes <= 2 * (3 + 2)  # at most two inputs per instance and class image
    (tmp_path / "resumed").mkdir()
    os.system(f"cp -r {tmp_path / 'straight' / 'checkpoint-4'} {tmp_path / 'resumed'}")
    _, _, resumed = run(config_for(world, tmp_path / "resumed", resume_from_checkpoint="latest", **common))
    assert resumed.losses == straight.losses[4:]
    assert_same_adapter(straight.adapter_path, resumed.adapter_path)


# --- text: pre-computed, length, mask ---------------------------------------------------------------------------------
def test_pre_computed_text_embeddings_skip_the_encoder_and_match(world, tmp_path):
    common = dict(instance_data_dir=str(world / "captioned"), max_train_steps=3, validation_prompt=PROMPT,
                  validation_steps=3)  # fmt: skip
    _, plain_watch, plain = run(config_for(world, tmp_path / "plain", **common))
    task, watch, pre = run(config_for(world, tmp_path / "pre", pre_compute_text_embeddings=True, **common))
    assert len(watch.text_calls) == len(plain_watch.text_calls) - 3  # the preview's only: training read the table
    assert watch.text_calls  # the preview sampled with the text encoders back on the device
    assert task.backend.text_table["encoder_hidden_states"].shape[0] == 2  # two distinct prompts
    assert_close(torch.tensor(pre.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-7)


def test_tokenizer_length_and_attention_mask_reach_the_text_encoder(world, tmp_path):
    _, watch, result = run(config_for(world, tmp_path, tokenizer_max_length=8, text_encoder_use_attention_mask=True))
    ids, mask = watch.text_calls[0]
    assert len(ids[0]) == 8 and mask is not None and mask.shape == (1, 8)
    expected = tokens(world, PROMPT, 8)
    assert ids[0] == expected.input_ids and mask[0].tolist() == expected.attention_mask
    assert 0 in mask[0].tolist() or len(PROMPT) + 2 >= 8  # padding is masked when the prompt is short enough


def test_validation_scheduler_is_the_one_asked_for(world, tmp_path):
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    for name, kind in (("DDPMScheduler", DDPMScheduler), ("DPMSolverMultistepScheduler", DPMSolverMultistepScheduler)):
        task = task_for(config_for(world, tmp_path, validation_scheduler=name))
        task.check_inputs()
        _initial_vectors(task)
        assert type(task.backend.pipeline().scheduler) is kind and type(task.backend.fresh_pipeline().scheduler) is kind


# --- progress in logs ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # a subprocess or a full-size model: the end-to-end tier
def test_progress_is_one_line_every_n_steps_when_piped(world, tmp_path):
    command = [sys.executable, "-m", "ether_diffusion.cli", "train", "--pretrained_model_name_or_path",
               str(world / "model"), "--instance_data_dir", str(world / "instance"), "--instance_prompt", PROMPT,
               "--output_dir", str(tmp_path), "--report_to", "none", "--max_train_steps", "6",
               "--progress_steps", "2", "--no_final_reload", "--checkpointing_steps", "3"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all(" loss " in line and " lr " in line and "left" in line for line in lines), lines
    assert "\r" not in done.stdout + done.stderr  # no bar redraws in a log
    # and at the end, where it all went
    assert f"  adapter          {tmp_path / 'ether_adapter.safetensors'}" in done.stdout
    assert "  checkpoints      checkpoint-3, checkpoint-6 (resume: --resume_from_checkpoint latest)" in done.stdout


# --- SDXL ------------------------------------------------------------------------------------------------------------
def test_sdxl_with_captions_repeats_and_both_caches(world, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    (tmp_path / "tokenizer").mkdir()
    StableDiffusionXLPipeline(**build_tiny_sdxl_components(tmp_path / "tokenizer")).save_pretrained(tmp_path / "sdxl")
    config = config_for(world, tmp_path / "out", pretrained_model_name_or_path=str(tmp_path / "sdxl"),
                        instance_data_dir=str(world / "captioned"), repeats=2, cache_latents=True,
                        pre_compute_text_embeddings=True, center_crop=True, max_train_steps=6)  # fmt: skip
    task, watch, result = run(config)
    assert type(task.backend).__name__ == "StableDiffusionXLBackend"
    assert watch.text_calls == [] and watch.encodes == 3  # text from the table; each image encoded once
    table = task.backend.text_table
    assert table["encoder_hidden_states"].shape[0] == 2 and table["text_embeds"].shape[0] == 2
    # the caption's row of the table is what both encoders make of the caption
    dataset_prompts = ["a sks star on grass", PROMPT]
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl")
    embeds, _, pooled, _ = pipe.encode_prompt(dataset_prompts[0], device="cpu", do_classifier_free_guidance=False)
    assert_close(task.backend.text_table["encoder_hidden_states"][:1], embeds, rtol=1e-5, atol=1e-6)
    assert_close(task.backend.text_table["text_embeds"][:1], pooled, rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(result.losses)) and len(result.losses) == 6


# --- checkpoints of an earlier version -------------------------------------------------------------------------------
def test_a_checkpoint_without_the_new_fields_resumes_as_their_defaults(world, tmp_path):
    from ether_diffusion.training import ResumeMismatchError

    run(config_for(world, tmp_path, max_train_steps=2, checkpointing_steps=1))
    record_file = tmp_path / "checkpoint-1" / "run.json"
    record = json.loads(record_file.read_text())
    for name in ("cache_latents", "optimizer", "repeats", "caption_extension"):  # written before these flags existed
        del record["config"][name]
    record_file.write_text(json.dumps(record))
    resumed = dict(max_train_steps=2, checkpointing_steps=1, resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    with pytest.raises(ResumeMismatchError, match="--repeats: checkpoint 1, now 2"):
        run(config_for(world, tmp_path, repeats=2, **resumed))
    _, _, result = run(config_for(world, tmp_path, **resumed))
    assert result.global_step == 2 and len(result.losses) == 1


# --- bad input: captions, prompts, dataset images, numbers ---------------------------------------------------------
def instance_copy(world, folder: Path) -> Path:
    """The world's three instance images in ``folder``, without captions."""
    folder.mkdir()
    for path in sorted((world / "instance").glob("*.png")):
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_a_huge_caption_file_is_refused_from_its_size_before_it_is_read(world, tmp_path, capsys):
    import tracemalloc

    from ether_diffusion.cli import main

    folder = instance_copy(world, tmp_path / "data")
    with open(folder / "0.txt", "wb") as handle:  # 100 MB that take no disk: a sparse file
        handle.truncate(100 * 2**20)
    tracemalloc.start()
    with pytest.raises(ValueError, match=r"caption file '.*0.txt' is 104,857,600 bytes, over the limit of 16,384"):
        load_captioned_folder(folder, PROMPT)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20  # nothing of the file was read
    out = tmp_path / "out"
    out.mkdir()
    (out / "ether_adapter.safetensors").write_bytes(b"an earlier adapter")
    code = main(["train", "--pretrained_model_name_or_path", str(world / "model"), "--instance_data_dir", str(folder),
                 "--instance_prompt", PROMPT, "--output_dir", str(out), "--report_to", "none", "--quiet"])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("error: the caption file") and "0.txt" in error and error.count("\n") == 1
    assert (out / "ether_adapter.safetensors").read_bytes() == b"an earlier adapter"  # nothing written over


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text("x" * 4097), r"'.*0.txt' is 4,097 characters long, over the limit of 4,096"),
        (lambda p: p.write_bytes("a sks star, señor".encode("latin-1")), r"'.*0.txt' is not UTF-8 text \(byte 0xf1"),
        (lambda p: p.write_bytes(b"a sks star\0\0\0"), r"'.*0.txt' holds NUL bytes"),
        (lambda p: p.mkdir(), r"'.*0.txt' is a folder, not a text file"),
        (lambda p: os.mkfifo(p), r"'.*0.txt' is a FIFO \(named pipe\), not a text file"),
        (lambda p: p.symlink_to("/dev/zero"), r"'.*0.txt' is a device, not a text file"),
    ],
    ids=["too-long", "latin-1", "nul", "folder", "fifo", "dev-zero"],
)
def test_caption_files_that_are_not_short_utf8_text_are_named(world, tmp_path, make, message):
    """Each stops before training with the file's name, and none is read without bound (a FIFO or /dev/zero would
    block or never end)."""
    folder = instance_copy(world, tmp_path / "data")
    make(folder / "0.txt")
    with pytest.raises(ValueError, match=message):
        load_captioned_folder(folder, PROMPT)


def test_prompt_flags_have_the_caption_limit(world, tmp_path):
    long = "a sks star " * 400
    for flag, changes in [
        ("--instance_prompt", dict(instance_prompt=long)),
        ("--class_prompt", dict(class_prompt=long, with_prior_preservation=True)),
        ("--validation_prompt", dict(validation_prompt=long)),
    ]:
        with pytest.raises(ConfigError, match=rf"^{flag} is 4,400 characters long, over the limit of 4,096"):
            config_for(world, tmp_path, **changes).validate()
    with pytest.raises(ConfigError, match=r"^--validation_prompt holds a NUL character"):
        config_for(world, tmp_path, validation_prompt="a sks\0star").validate()
    config_for(world, tmp_path, instance_prompt="a sks star " * 372).validate()  # 4,092 characters: within


TOO_LARGE = [
    ("learning_rate", 1e38, r"--learning_rate 1e38 is too large: give at most 1000000 \(rates"),
    ("snr_gamma", 1e39, r"--snr_gamma 1e39 is too large"),
    ("adam_weight_decay", 1e39, r"--adam_weight_decay 1e39 is too large"),
    ("max_train_steps", 10**20, r"--max_train_steps 100000000000000000000 is too large: give at most 2147483647"),
    ("gradient_accumulation_steps", 10**20, r"--gradient_accumulation_steps 100000000000000000000 is too large"),
    ("train_batch_size", 10**20, r"--train_batch_size 100000000000000000000 is too large"),
    ("repeats", 10**20, r"--repeats 100000000000000000000 is too large"),
    ("seed", 2**32, r"--seed 4294967296 is too large: give at most 4294967295"),
    ("resolution", 2**40, r"--resolution 1099511627776 is too large: give at most 8192"),
]


@pytest.mark.parametrize("flag, value, message", TOO_LARGE, ids=[flag for flag, _, _ in TOO_LARGE])
def test_number_flags_too_large_for_torch_name_themselves(world, tmp_path, flag, value, message):
    """Each of these reached torch or numpy and failed there without the flag's name ("value cannot be converted to
    type float without overflow", "Overflow when unpacking long", ...), or allocated without bound."""
    with pytest.raises(ConfigError, match=message):
        config_for(world, tmp_path, **{flag: value}).validate()


def test_number_flags_too_large_are_usage_errors_on_the_command_line(world, tmp_path, capsys):
    from ether_diffusion.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--pretrained_model_name_or_path", str(world / "model"), "--instance_data_dir",
              str(world / "instance"), "--instance_prompt", PROMPT, "--output_dir", str(tmp_path), "--learning_rate",
              "1e38"])  # fmt: skip
    assert exit_.value.code == 2
    assert "error: --learning_rate 1e38 is too large" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_an_epoch_too_long_to_shuffle_is_refused(tmp_path):
    tokenizer = build_char_tokenizer(tmp_path)
    images = [Image.new("RGB", (16, 16), c) for c in ("red", "green", "blue")]
    with pytest.raises(ValueError, match=r"--repeats 10000000 makes an epoch of 30,000,000 examples .* lower --repe"):
        DreamBoothDataset(images, PROMPT, tokenizer, 16, repeats=10_000_000)


def test_instance_images_are_bounded_in_number_and_pixels(world, tmp_path, monkeypatch):
    """Every instance image is held decoded for the whole run: too many of them, or too many pixels in all, stop the
    run when the limit is reached rather than filling the memory (the limits lowered here to the world's 3 images of
    16² pixels)."""
    from ether_diffusion.training import data

    monkeypatch.setattr(data, "MAX_TOTAL_PIXELS", 2 * 16 * 16)
    with pytest.raises(ValueError, match=r"the instance images hold more than 512 pixels in all \(reached at image 3"):
        load_captioned_folder(world / "instance", PROMPT)
    monkeypatch.setattr(data, "MAX_IMAGES", 2)
    with pytest.raises(ValueError, match=r"holds more than 2 images; every image is held in memory"):
        load_captioned_folder(world / "instance", PROMPT)


def image_folder(folder: Path, files: dict[str, bytes], rows: list[bytes]) -> Path:
    """An image folder for --dataset_name: ``files`` and a metadata.jsonl of ``rows`` (empty without rows)."""
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "metadata.jsonl").write_bytes(b"".join(row + b"\n" for row in rows))
    return folder


def test_dataset_images_get_the_checks_of_folder_images(world, tmp_path):
    """A 20000² header, a truncated PNG and a 10000×7000 image in a --dataset_name image folder and in a saved
    dataset (whose rows carry the bytes): each is refused naming its row and file, as the folder path names files."""
    import datasets

    good = (world / "instance" / "0.png").read_bytes()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    wide = tmp_path / "wide.png"
    Image.new("1", (10000, 7000)).save(wide)
    files = {"good.png": good, "bomb.png": png_header(20000, 20000), "cut.png": buffer.getvalue()[:3000],
             "wide.png": wide.read_bytes()}  # fmt: skip
    rows = [json.dumps({"file_name": name, "text": f"a sks star {name}"}).encode() for name in files]
    folder = image_folder(tmp_path / "folder", files, rows)
    saved = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "c"))
    saved.save_to_disk(str(tmp_path / "saved"))
    for name in ("folder", "saved"):
        config = config_for(world, tmp_path / f"out-{name}", instance_data_dir=None, dataset_name=str(tmp_path / name),
                            caption_column="text", cache_dir=str(tmp_path / "cache"))  # fmt: skip
        with pytest.raises(ValueError) as err:
            task_for(config).check_inputs()
        message = str(err.value)
        assert message.startswith(f"3 image(s) of --dataset_name '{tmp_path / name}' cannot be used: "), message
        assert "row 1 of --image_column 'image' (bomb.png): 400,000,000 pixels is too large" in message
        assert "row 2 of --image_column 'image' (cut.png): cannot be read as an image" in message
        assert "row 3 of --image_column 'image' (wide.png): 10000×7000 pixels is too large" in message


@pytest.mark.parametrize(
    "row, message",
    [
        (json.dumps({"file_name": "0.png", "text": "a sks star " * 400}).encode(),
         r"metadata.jsonl', line 2: the caption 'text' is 4,400 characters long"),
        (json.dumps({"file_name": "0.png", "text": "x" * 2**20}).encode(),
         r"metadata.jsonl', line 2: longer than 1,048,576 bytes"),
        ('{"file_name": "0.png", "text": "a sks star, señor"}'.encode("latin-1"),
         r"metadata.jsonl', line 2 is not UTF-8 text \(byte 0xf1 .* it must be UTF-8 text"),
        (b'["0.png", "a sks star"]', r"metadata.jsonl', line 2: a JSON list, not an object"),
        (None, r"metadata.jsonl' has no rows: write one JSON object per line"),
    ],
    ids=["long-caption", "huge-line", "latin-1", "not-an-object", "empty"],
)  # fmt: skip
def test_dataset_metadata_lines_are_read_with_a_limit_and_named(world, tmp_path, row, message):
    files = {p.name: p.read_bytes() for p in sorted((world / "instance").glob("*.png"))[:2]}
    first = json.dumps({"file_name": "1.png", "text": "a sks star"}).encode()
    folder = image_folder(tmp_path / "folder", files, [first, row] if row else [])
    config = config_for(world, tmp_path / "out", instance_data_dir=None, dataset_name=str(folder),
                        caption_column="text", cache_dir=str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(ValueError, match=message):
        task_for(config).check_inputs()


def test_saved_dataset_captions_have_the_limit(world, tmp_path):
    """A saved dataset's captions are measured in its Arrow table before any becomes a Python string."""
    import datasets

    files = {p.name: p.read_bytes() for p in sorted((world / "instance").glob("*.png"))[:2]}
    rows = [json.dumps({"file_name": name, "text": "a sks star"}).encode() for name in files]
    folder = image_folder(tmp_path / "folder", files, rows)
    data = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "c"))
    data = data.map(lambda row, i: {"text": "x" * 4097 if i == 1 else row["text"]}, with_indices=True)
    data.save_to_disk(str(tmp_path / "saved"))
    config = config_for(world, tmp_path / "out", instance_data_dir=None, dataset_name=str(tmp_path / "saved"),
                        caption_column="text")  # fmt: skip
    with pytest.raises(ValueError, match=r"--dataset_name '.*saved': row 1 of --caption_column 'text' is 4,097 char"):
        task_for(config).check_inputs()


def test_only_the_class_images_a_run_uses_are_decoded(tmp_path):
    """Prior preservation takes the first --num_class_images of the class folder: the others are not opened (a
    broken one past them costs nothing, and a large folder stays within the decoding limits)."""
    from ether_diffusion.training.data import load_image_folder

    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"class-{i:05d}.png")
    (folder / "class-00003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert len(load_image_folder(folder, "class", limit=2)) == 2
    with pytest.raises(ValueError, match="class-00003.png"):
        load_image_folder(folder, "class")
