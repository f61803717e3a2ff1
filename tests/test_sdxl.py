"""SDXL DreamBooth on tiny random-weight SDXL components built from configs (diffusers' own test sizes), saved with
save_pretrained: family detection, the conditioning against StableDiffusionXLPipeline's own, training, exact resume,
prior preservation, the saved file in a fresh StableDiffusionXLPipeline (sample, fuse, mixed batch), two processes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_char_tokenizer, build_tiny_components, build_tiny_sdxl_components, free_port, launch_env
from PIL import Image
from torch.testing import assert_close

from ether_diffusion import registry
from ether_diffusion.architectures import SDXL_UNET
from ether_diffusion.families import UnsupportedModelError, model_family
from ether_diffusion.inject import adapter_layers
from ether_diffusion.io import read_adapter_file
from ether_diffusion.registry import DreamBoothXLConfig, task_for, train
from ether_diffusion.training.config import TaskKind
from ether_diffusion.training.dreambooth import DreamBoothConfig, DreamBoothTask
from ether_diffusion.training.run import Run
from ether_diffusion.training.sd import StableDiffusionBackend
from ether_diffusion.training.sdxl import StableDiffusionXLBackend

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_dreambooth_ether.py"
PROMPT = "a sks star"


def parse_args(argv):
    return registry.parse_args(TaskKind.DREAMBOOTH, argv)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("sdxl")
    (root / "tokenizer").mkdir()
    StableDiffusionXLPipeline(**build_tiny_sdxl_components(root / "tokenizer")).save_pretrained(root / "sdxl")
    StableDiffusionPipeline(**build_tiny_components(root / "tokenizer")).save_pretrained(root / "sd")
    instance = root / "instance"
    instance.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # 20 high, 24 wide: resized to 16 x 19, so crops move sideways
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype("uint8")).save(instance / f"{i}.png")
    return root


def flags(world, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", str(world / "sdxl"),
        "--instance_data_dir", str(world / "instance"),
        "--instance_prompt", PROMPT,
        "--output_dir", str(output_dir),
        "--quiet", "--report_to", "none",
        "--validation_inference_steps", "2", "--num_validation_images", "2",
        *extra,
    ]  # fmt: skip


def make_task(world, tmp_path, **fields) -> tuple[DreamBoothTask, Run]:
    from accelerate import Accelerator

    config = DreamBoothXLConfig(
        pretrained_model_name_or_path=str(world / "sdxl"),
        instance_data_dir=str(world / "instance"),
        instance_prompt=PROMPT,
        output_dir=str(tmp_path),
        report_to="none",
        **fields,
    ).validate()
    task = DreamBoothTask(config, StableDiffusionXLBackend(config))
    task.check_inputs()
    run = Run(Accelerator(cpu=True), torch.float32, torch.Generator().manual_seed(0))
    task.setup(run)
    return task, run


# --- which model is which -------------------------------------------------------------------------------------------
def test_the_model_folder_says_which_task_trains_it(world, tmp_path, capsys):
    assert model_family(world / "sdxl").name == "sdxl" and model_family(world / "sd").name == "sd"
    assert model_family(None).name == "sd"  # the shipped tiny model
    # a single checkpoint file says nothing; its --config folder (same architecture) does
    assert model_family(tmp_path / "model.safetensors", config=world / "sdxl").name == "sdxl"
    assert model_family(tmp_path / "model.safetensors").name == "sd"
    config = parse_args(flags(world, tmp_path))
    assert type(config) is DreamBoothXLConfig
    assert type(parse_args(flags(world, tmp_path)[2:])) is DreamBoothConfig  # no model: the shipped SD one
    # the SDXL flag on an SD model is a usage error that says why, not "unrecognized arguments"
    with pytest.raises(SystemExit):
        parse_args([*flags(world, tmp_path), "--pretrained_vae_model_name_or_path", "x"][2:])
    assert "--pretrained_vae_model_name_or_path does not apply to Stable Diffusion 1.x/2.x" in capsys.readouterr().err
    # code that builds an SD config for an SDXL model (the studio) gets the SDXL task
    sd_config = DreamBoothConfig(pretrained_model_name_or_path=str(world / "sdxl"), instance_data_dir="x",
                                 instance_prompt=PROMPT)  # fmt: skip
    task = task_for(sd_config)
    assert type(task) is DreamBoothTask and type(task.backend) is StableDiffusionXLBackend
    assert type(task.config) is DreamBoothXLConfig and task.config.pretrained_vae_model_name_or_path is None
    xl_for_sd = DreamBoothXLConfig(pretrained_model_name_or_path=str(world / "sd"), instance_data_dir="x",
                                   instance_prompt=PROMPT, pretrained_vae_model_name_or_path="vae")  # fmt: skip
    with pytest.raises(ValueError, match="does not apply to Stable Diffusion 1.x/2.x"):
        task_for(xl_for_sd)


def test_other_families_fail_with_one_message(world, tmp_path, capsys):
    px = tmp_path / "pixart"
    px.mkdir()
    (px / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    with pytest.raises(UnsupportedModelError, match=r"PixArt-Σ .*supported: Stable Diffusion 1.x/2.x"):
        model_family(px)
    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model_name_or_path", str(px), "--instance_data_dir", "x", "--instance_prompt", "y"])
    assert "PixArt-Σ (PixArtSigmaPipeline in its model_index.json)" in capsys.readouterr().err
    # a backend given a model of another family says so before loading anything
    config = DreamBoothConfig(pretrained_model_name_or_path=str(world / "sdxl"), instance_data_dir="x",
                              instance_prompt=PROMPT).validate()  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="is a Stable Diffusion XL model .* supports Stable Diffusion 1"):
        DreamBoothTask(config, StableDiffusionBackend(config)).setup(None)
    from ether_diffusion.control.train import ControlConfig, ControlTask

    control = ControlConfig(pretrained_model_name_or_path=str(world / "sdxl"), train_data_dir="x").validate()
    with pytest.raises(UnsupportedModelError, match=r"control training \(ControlTask\) supports Stable Diffusion 1"):
        ControlTask(control, StableDiffusionBackend(control)).setup(None)
    # and the registry, asked for control on an SDXL model, names the families control trains
    with pytest.raises(UnsupportedModelError, match=r"Stable Diffusion XL model .*; control training supports Stable "
                       r"Diffusion 1.x/2.x models"):  # fmt: skip
        task_for(control)


# --- the conditioning is the pipeline's ------------------------------------------------------------------------------
def test_conditioning_matches_stable_diffusion_xl_pipeline(world, tmp_path):
    """Text embeddings, pooled embeddings and size/crop ids of a training batch are what StableDiffusionXLPipeline
    computes for the same prompt and geometry."""
    from diffusers import StableDiffusionXLPipeline

    task, run = make_task(world, tmp_path, center_crop=True, resolution=16)
    dataset = task.dataset(run, lambda *args: None)
    batch = dataset.collate([dataset[0], dataset[1]])
    assert set(batch) == {"pixel_values", "input_ids", "input_ids_2", "add_time_ids", "latent_key", "prompt_index"}
    with torch.no_grad():
        condition = task.backend.condition(batch, run)
    pipe = StableDiffusionXLPipeline.from_pretrained(world / "sdxl")
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    assert condition["encoder_hidden_states"].shape == (2, 16, 64)
    assert_close(condition["encoder_hidden_states"], embeds.expand(2, -1, -1), rtol=1e-5, atol=1e-6)  # batch 2 vs 1
    assert_close(condition["added_cond_kwargs"]["text_embeds"], pooled.expand(2, -1), rtol=1e-5, atol=1e-6)
    # 20 x 24 resized to 16 x 19, centre crop at (top 0, left 1): (original, crop corner, target)
    expected = pipe._get_add_time_ids((20, 24), (0, 1), (16, 16), torch.float32, text_encoder_projection_dim=32)
    assert_close(condition["added_cond_kwargs"]["time_ids"], expected.expand(2, -1))
    # the UNet accepts it (this is where the SD task crashed inside diffusers on an SDXL model)
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert task.backend.components.unet(latents, torch.tensor([10, 500]), **condition).sample.shape == latents.shape


def test_crop_corner_is_measured_in_the_flipped_image(world, tmp_path):
    """diffusers flips the resized image, then crops: the recorded corner is where the crop sits in the flipped
    image."""
    from ether_diffusion.training.data import DreamBoothDataset, to_pixels

    image = Image.open(world / "instance" / "0.png").convert("RGB")
    tokenizer = build_char_tokenizer(tmp_path)
    dataset = DreamBoothDataset([image], PROMPT, [tokenizer, tokenizer], 16, random_flip=True, seed=3)
    resized = image.resize((19, 16), Image.BICUBIC)
    seen = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        example = dataset[0]["instance"]
        original_h, original_w, top, left, target_h, target_w = example["add_time_ids"].tolist()
        assert (original_h, original_w, target_h, target_w) == (20, 24, 16, 16) and top == 0
        plain = torch.equal(example["pixel_values"], to_pixels(resized.crop((left, 0, left + 16, 16))))
        mirrored = resized.transpose(Image.FLIP_LEFT_RIGHT).crop((left, 0, left + 16, 16))
        flipped = torch.equal(example["pixel_values"], to_pixels(mirrored))
        assert plain != flipped  # exactly one: the crop at `left` of the image as it was (not) flipped
        assert torch.equal(example["input_ids"], example["input_ids_2"])  # one shared tokenizer here
        seen.add(flipped)
    assert seen == {True, False}


def test_train_text_encoder_adapts_both_encoders_but_not_the_unread_layer(world, tmp_path):
    task, run = make_task(world, tmp_path, train_text_encoder=True)
    configs = task.adapter_configs()
    assert set(configs) == {"unet", "text_encoder", "text_encoder_2"}
    assert configs["text_encoder"].exclude_modules == ["encoder.layers.2"]
    assert configs["text_encoder_2"].exclude_modules == []
    dataset = task.dataset(run, lambda *args: None)
    loss, _ = task.loss(dataset.collate([dataset[0]]), run)
    loss.backward()
    for component, model in task.adapters.models.items():
        layers = dict(adapter_layers(model))
        assert layers, component
        for path, layer in layers.items():  # every adapted layer gets a gradient: none is dead weight
            grads = [p.grad for p in layer.parameters() if p.requires_grad]
            assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads), (component, path)
    assert len(dict(adapter_layers(task.backend.components.text_encoder))) == 2 * 4  # layers 0 and 1 of 3
    assert len(dict(adapter_layers(task.backend.components.text_encoder_2))) == 3 * 4


# --- training --------------------------------------------------------------------------------------------------------
RUN_FLAGS = ("--with_prior_preservation", "--class_prompt", "a star", "--num_class_images", "2", "--train_text_encoder",
             "--random_flip", "--snr_gamma", "5", "--lr_scheduler", "cosine", "--max_train_steps", "4",
             "--checkpointing_steps", "2")  # fmt: skip


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """One SDXL run with prior preservation, both text encoders, min-SNR, flips, validation and the final reload."""
    out = tmp_path_factory.mktemp("sdxl-run")
    args = flags(world, out / "straight", *RUN_FLAGS, "--class_data_dir", str(out / "class"),
                 "--validation_prompt", PROMPT, "--validation_steps", "2")  # fmt: skip
    return train(parse_args(args)), out


@pytest.mark.slow
def test_sdxl_run_with_prior_preservation_validation_and_reload(trained):
    result, out = trained
    assert result.global_step == 4 and len(result.losses) == 4 and all(np.isfinite(result.losses))
    assert sorted(p.name for p in (out / "class").iterdir()) == ["class-00000.png", "class-00001.png"]
    source = read_adapter_file(result.adapter_path)
    assert set(source.configs) == {"unet", "text_encoder", "text_encoder_2"}
    assert source.extra["trained_with"].endswith("dreambooth-sdxl") and source.extra["steps"] == "4"
    straight = out / "straight"
    assert len(list((straight / "validation").glob("step-*.png"))) == 2 * 3  # steps 0, 2, 4
    assert (straight / "samples.png").is_file()  # the saved file in a fresh StableDiffusionXLPipeline
    card = (straight / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "stable-diffusion-xl" in card
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow
def test_sdxl_resume_gives_the_same_adapter(world, trained, tmp_path):
    result, out = trained
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(out / "straight" / "checkpoint-2", resumed_dir / "checkpoint-2")
    args = flags(world, resumed_dir, *RUN_FLAGS, "--class_data_dir", str(out / "class"), "--validation_prompt", PROMPT,
                 "--validation_steps", "2", "--resume_from_checkpoint", "latest", "--no_final_reload")  # fmt: skip
    resumed = train(parse_args(args))
    assert resumed.global_step == 4 and resumed.losses == result.losses[2:]
    a, b = read_adapter_file(result.adapter_path).tensors, read_adapter_file(resumed.adapter_path).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sdxl_training_lowers_the_loss_on_its_images(world, tmp_path):
    """The denoising loss on the instance images, at the same fixed noises and timesteps, is lower with the trained
    adapter than with the base model (ETHER+ starts at the identity, so disabled adapters are the base model)."""
    result = train(parse_args(flags(world, tmp_path, "--max_train_steps", "15", "--no_final_reload",
                                    "--center_crop", "--learning_rate", "2e-2")))  # fmt: skip
    task, run = make_task(world, tmp_path / "eval", center_crop=True)
    task.load_checkpoint(result.adapter_path)
    dataset = task.dataset(run, lambda *args: None)
    batch = dataset.collate([dataset[i] for i in range(len(dataset))] * 8)

    def loss():
        run.noise_generator.manual_seed(1234)
        with torch.no_grad():
            return float(task.loss(batch, run)[0])

    trained_loss = loss()
    with task.adapters.disabled():
        base_loss = loss()
    assert trained_loss < 0.95 * base_loss, (trained_loss, base_loss)


@pytest.mark.slow
def test_saved_sdxl_file_fuses_and_mixes_in_a_batch(world, trained):
    """The trained file in a fresh StableDiffusionXLPipeline: sampling with it differs from the base model, fusing
    gives the unfused images, and a mixed batch [adapter, base] gives each prompt's own images."""
    from diffusers import StableDiffusionXLPipeline

    from ether_diffusion.pipeline import (
        disable_ether,
        enable_ether,
        ether_mixed_batch,
        fuse_ether,
        load_ether_weights,
        unfuse_ether,
    )

    result, _ = trained
    pipe = StableDiffusionXLPipeline.from_pretrained(world / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def sample(prompts):
        return pipe(prompts, latents=latents.expand(len(prompts), -1, -1, -1), num_inference_steps=3,
                    output_type="np").images  # fmt: skip

    base = sample([PROMPT, "a star"])
    assert load_ether_weights(pipe, result.adapter_path, adapter_name="star") == "star"
    adapted = sample([PROMPT, "a star"])
    assert np.abs(adapted - base).max() > 1e-3
    fuse_ether(pipe)
    np.testing.assert_allclose(sample([PROMPT, "a star"]), adapted, atol=1e-4)
    unfuse_ether(pipe)
    np.testing.assert_allclose(sample([PROMPT, "a star"]), adapted, atol=1e-5)
    with ether_mixed_batch(pipe, ["star", None]):
        mixed = sample([PROMPT, "a star"])
    np.testing.assert_allclose(mixed[0], adapted[0], atol=1e-4)
    np.testing.assert_allclose(mixed[1], base[1], atol=1e-4)
    disable_ether(pipe)
    np.testing.assert_allclose(sample([PROMPT, "a star"]), base, atol=1e-5)
    enable_ether(pipe)


@pytest.mark.slow
def test_sdxl_two_processes_train_both_text_encoders(world, tmp_path):
    """Data parallel over gloo with --train_text_encoder: every adapted vector gets a gradient on every rank (a vector
    in the first encoder's unread last layer fails DDP's reduction: "parameters that were not used in producing
    loss")."""
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(SCRIPT),
        *flags(world, tmp_path, "--max_train_steps", "2", "--train_text_encoder", "--no_final_reload"),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=400, env=launch_env())
    assert run.returncode == 0, run.stderr[-3000:]
    source = read_adapter_file(tmp_path / "ether_adapter.safetensors")
    assert source.extra["num_processes"] == "2" and source.extra["steps"] == "2"
    assert set(source.configs) == {"unet", "text_encoder", "text_encoder_2"}
    assert source.extra["trained_with"].endswith("dreambooth-sdxl")


@pytest.mark.slow
def test_cli_train_sample_and_fuse_take_an_sdxl_model(world, trained, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    from ether_diffusion.cli import main
    from ether_diffusion.pipeline import load_ether_weights

    model = str(world / "sdxl")
    assert main(["train", *flags(world, tmp_path / "train", "--max_train_steps", "1", "--no_final_reload")]) == 0
    assert read_adapter_file(tmp_path / "train").extra["trained_with"].endswith("dreambooth-sdxl")
    adapter = str(trained[0].adapter_path)
    assert main(["sample", "--model", model, "--adapter", adapter, "--prompt", PROMPT, "--steps", "2",
                 "--compare", "--output_dir", str(tmp_path / "samples")]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["00_seed0_adapted.png", "00_seed0_base.png"]
    assert main(["fuse", "--model", model, "--adapter", adapter, "--output_dir", str(tmp_path / "fused")]) == 0
    assert "StableDiffusionXLPipeline.from_pretrained" in capsys.readouterr().out
    fused = StableDiffusionXLPipeline.from_pretrained(tmp_path / "fused")  # plain diffusers, adapter baked in
    loaded = StableDiffusionXLPipeline.from_pretrained(model)
    load_ether_weights(loaded, adapter)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = [pipe(PROMPT, latents=latents, num_inference_steps=2, output_type="np").images for pipe in (fused, loaded)]
    np.testing.assert_allclose(images[0], images[1], atol=1e-4)


# --- sizes on the real SDXL architecture ------------------------------------------------------------------------------
# its text_encoder (CLIP ViT-L/14) and text_encoder_2 (OpenCLIP ViT-bigG/14 with projection)
SDXL_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 hidden_act="quick_gelu", projection_dim=768, vocab_size=49408, max_position_embeddings=77)  # fmt: skip
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                   hidden_act="gelu", projection_dim=1280, vocab_size=49408, max_position_embeddings=77)  # fmt: skip

SDXL_COUNTS = {  # (method, sides) -> trained parameters on the UNet's 560 attention projections
    ("ether", None): 785_920,
    ("ether_plus", None): 2_903_040,  # two-sided, the default
    ("ether_plus", ("input",)): 1_571_840,
    ("lora", None): 5_806_080,  # PEFT LoRA r=4 on the same layers
}
SDXL_TEXT_COUNTS = {"ether": (33_792, 163_840), "ether_plus": (135_168, 655_360)}  # (text_encoder, text_encoder_2)


def test_parameter_counts_on_the_real_sdxl_architecture():
    """ETHER / ETHER+ / LoRA r=4 sizes on SDXL-base built on the meta device (no weights), pinned here and in the
    docs."""
    import peft
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ether_diffusion import EtherConfig, inject
    from ether_diffusion.inject import count_parameters, eject

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2))
    # the published sizes: the configs above are SDXL-base's
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in text_encoder.parameters()) == 123_060_480
    assert sum(p.numel() for p in text_encoder_2.parameters()) == 694_659_840
    docs = (ROOT / "docs" / "dreambooth.md").read_text()
    for (method, sides), expected in SDXL_COUNTS.items():
        if method == "lora":
            lora = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
            peft.inject_adapter_in_model(lora, unet)  # last: it stays in
            count = sum(p.numel() for name, p in unet.named_parameters() if ".lora_" in name)
        else:
            assert len(inject(unet, EtherConfig(method=method, sides=sides))) == 560
            count = count_parameters(unet)
            eject(unet)
            assert count_parameters(unet) == 0
        assert count == expected, (method, sides)
        assert f"{expected:,}" in docs, f"{expected:,} missing from docs/dreambooth.md"
    # --train_text_encoder: all attention of text_encoder_2, text_encoder's but its unread last layer
    unread = ["encoder.layers.11"]  # what the SDXL backend excludes (tested on the tiny model above)
    for method, (first, second) in SDXL_TEXT_COUNTS.items():
        assert len(inject(text_encoder, EtherConfig(method=method, target_modules="text-encoder-attention",
                                                    exclude_modules=unread))) == 11 * 4  # fmt: skip
        assert len(inject(text_encoder_2, EtherConfig(method=method, target_modules="text-encoder-attention"))) == 128
        assert (count_parameters(text_encoder), count_parameters(text_encoder_2)) == (first, second)
        eject(text_encoder)
        eject(text_encoder_2)
        assert f"{first:,}" in docs and f"{second:,}" in docs


def test_the_studio_trains_and_samples_an_sdxl_model(world, tmp_path):
    """The studio started on an SDXL folder: a job trains the SDXL task and publishes its adapter; the sampler loads
    it into the model's own pipeline and draws it beside the base model."""
    from ether_diffusion.studio import AdapterStore, JobManager, Sampler, TrainSpec, Workspace
    from ether_diffusion.studio.sampling import SampleRequest

    model = str(world / "sdxl")
    workspace = Workspace(tmp_path / "studio")
    store = AdapterStore(workspace)
    manager = JobManager(workspace, model, store)
    uploads = [str(p) for p in sorted((world / "instance").iterdir())]
    manager.start(TrainSpec(adapter_name="xl-star", instance_prompt=PROMPT, uploads=uploads, class_prompt="a star",
                            max_train_steps=2, num_class_images=1, preview_every=2, preview_images=1,
                            preview_steps=2))  # fmt: skip
    state = manager.wait(300)
    assert state["phase"] == "done", state.get("traceback") or state.get("error")
    assert state["step"] == 2 and all(np.isfinite(state["losses"]))
    adapter = read_adapter_file(store.require("xl-star"))
    assert set(adapter.configs) == {"unet"}

    sampler = Sampler(model, workspace, store)
    result = sampler.sample(SampleRequest(prompt=PROMPT, adapters=[("xl-star", 1.0)], seeds=[3], steps=2,
                                          compare=True), save=False)  # fmt: skip
    assert type(sampler._pipe).__name__ == "StableDiffusionXLPipeline"
    adapted, base = (np.asarray(image, dtype=np.float64) for image in result.images)
    assert result.captions == ["seed 3 · xl-star×1", "seed 3 · base model"]
    assert np.abs(adapted - base).max() > 0  # the adapter acts on the SDXL pipeline
