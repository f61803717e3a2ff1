"""SD3 and Flux DreamBooth on the flow-matching objective, on tiny random-weight SD3/Flux pipelines built from configs
and saved with save_pretrained: the timestep sampling and loss weighting against diffusers' training utilities and by
hand, the conditioning against each pipeline's encode_prompt, the velocity against the pipeline's own sampler step,
every adapted vector getting a gradient, training runs with prior preservation and validation, exact resume, a lower
loss on the instance images, the saved file in a fresh pipeline, the command line and two processes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_flux_components, build_tiny_sd3_components, free_port, launch_env, randomize_adapters
from PIL import Image
from torch.testing import assert_close

from ether_diffusion import EtherConfig, inject, registry
from ether_diffusion.inject import adapter_layers
from ether_diffusion.io import read_adapter_file
from ether_diffusion.registry import DreamBoothFluxConfig, DreamBoothSD3Config, task_for, train
from ether_diffusion.training import Callback
from ether_diffusion.training.config import ConfigError, TaskKind
from ether_diffusion.training.dreambooth import DreamBoothConfig, DreamBoothTask
from ether_diffusion.training.flow import WEIGHTING_SCHEMES, flow_matching_loss, noisy_latents, sample_timesteps
from ether_diffusion.training.flux import FluxBackend
from ether_diffusion.training.run import Run
from ether_diffusion.training.sd3 import StableDiffusion3Backend

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_dreambooth_ether.py"
PROMPT = "a sks star"
FAMILIES = ("sd3", "flux")
TASKS = {"sd3": (DreamBoothSD3Config, StableDiffusion3Backend), "flux": (DreamBoothFluxConfig, FluxBackend)}


def parse_args(argv):
    return registry.parse_args(TaskKind.DREAMBOOTH, argv)


# --- the objective ----------------------------------------------------------------------------------------------------
def schedule(shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift)


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_timesteps_are_drawn_as_diffusers_draws_them(scheme):
    """diffusers' scripts draw u, take timesteps[⌊u·N⌋] and look each one up in the schedule for its σ; the same
    index gives the same pair."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheduler = schedule()
    timesteps, sigmas = sample_timesteps(scheduler, 256, torch.Generator().manual_seed(3), scheme, 0.3, 1.2, 1.29)
    u = compute_density_for_timestep_sampling(scheme, 256, 0.3, 1.2, 1.29, generator=torch.Generator().manual_seed(3))
    expected = scheduler.timesteps[(u * 1000).long()]
    lookup = torch.stack([scheduler.sigmas[(scheduler.timesteps == t).nonzero().item()] for t in expected])
    assert torch.equal(timesteps, expected) and torch.equal(sigmas, lookup)
    assert_close(sigmas, timesteps / 1000)  # σ = t / N, after the shift
    assert len(set(sigmas.tolist())) > 50  # a spread, not one value


def test_timestep_sampling_edges():
    """u = 1 (a sigmoid of a large logit rounds to 1 in float32) takes the last index instead of failing; the
    logit-normal density puts σ around sigmoid(mean) before the shift; a sampling schedule is refused."""
    scheduler = schedule(shift=1.0)
    timesteps, sigmas = sample_timesteps(scheduler, 8, torch.Generator().manual_seed(0), "logit_normal", 100.0)
    assert torch.equal(sigmas, scheduler.sigmas[-1].expand(8))  # the smallest σ, 1/1000
    _, sigmas = sample_timesteps(scheduler, 4000, torch.Generator().manual_seed(0), "logit_normal", 0.0, 1.0)
    assert abs(float(sigmas.median()) - 0.5) < 0.03  # median of sigmoid(N(0, 1)) is 1/2
    assert float(((sigmas > 0.27) & (sigmas < 0.73)).float().mean()) == pytest.approx(0.68, abs=0.03)  # ±1 logit sd
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="set up for sampling"):
        sample_timesteps(scheduler, 2, torch.Generator(), "none")


def test_flow_matching_loss_by_hand():
    generator = torch.Generator().manual_seed(0)
    latents, noise, prediction = (torch.randn(4, 4, 3, 3, generator=generator) for _ in range(3))
    sigmas = torch.tensor([0.05, 0.3, 0.7, 1.0])
    noisy = noisy_latents(latents, noise, sigmas)
    s = sigmas.view(-1, 1, 1, 1)
    assert_close(noisy, (1 - s) * latents + s * noise)
    assert_close(noisy_latents(latents, noise, torch.zeros(4)), latents)
    assert_close(noisy_latents(latents, noise, torch.ones(4)), noise)

    velocity_error = ((prediction - (noise - latents)) ** 2).mean(dim=(1, 2, 3))  # per sample
    loss, parts = flow_matching_loss(prediction, latents, noise, noisy, sigmas, "none")
    assert_close(loss, velocity_error.mean(), rtol=1e-6, atol=0)
    assert parts.keys() == {"loss"}
    # preconditioned (SD3): the clean-latent estimate x_σ − σ v̂ against x₀, diffusers' `model_pred * (-sigmas) +
    # noisy_model_input` vs `model_input`; its error is σ² times the velocity's
    loss, _ = flow_matching_loss(prediction, latents, noise, noisy, sigmas, "logit_normal", precondition_outputs=True)
    assert_close(loss, ((prediction * (-s) + noisy - latents) ** 2).mean(dim=(1, 2, 3)).mean(), rtol=1e-5, atol=0)
    assert_close(loss, (sigmas**2 * velocity_error).mean(), rtol=1e-5, atol=0)
    # sigma_sqrt weighs by σ⁻²: preconditioning and sigma_sqrt together are the plain velocity loss
    loss, _ = flow_matching_loss(prediction, latents, noise, noisy, sigmas, "sigma_sqrt", precondition_outputs=True)
    assert_close(loss, velocity_error.mean(), rtol=1e-5, atol=0)
    cosmap = 2 / (torch.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    loss, _ = flow_matching_loss(prediction, latents, noise, noisy, sigmas, "cosmap")
    assert_close(loss, (cosmap * velocity_error).mean(), rtol=1e-5, atol=0)
    # prior preservation: [instance; class] halves, the class half weighted
    loss, parts = flow_matching_loss(prediction, latents, noise, noisy, sigmas, "none", False, True, 0.25)
    assert_close(parts["instance_loss"], velocity_error[:2].mean())
    assert_close(parts["prior_loss"], velocity_error[2:].mean())
    assert_close(loss, velocity_error[:2].mean() + 0.25 * velocity_error[2:].mean())


# --- the tiny models --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    root = tmp_path_factory.mktemp("flow")
    (root / "tokenizer").mkdir()
    StableDiffusion3Pipeline(**build_tiny_sd3_components(root / "tokenizer")).save_pretrained(root / "sd3")
    FluxPipeline(**build_tiny_flux_components(root / "tokenizer")).save_pretrained(root / "flux")
    instance = root / "instance"
    instance.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # 20 high, 24 wide: resized to 16 x 19, so crops move sideways
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype("uint8")).save(instance / f"{i}.png")
    return root


def flags(world, family, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", str(world / family),
        "--instance_data_dir", str(world / "instance"),
        "--instance_prompt", PROMPT,
        "--output_dir", str(output_dir),
        "--resolution", "16", "--max_sequence_length", "16",
        "--quiet", "--report_to", "none",
        "--validation_inference_steps", "2", "--num_validation_images", "2",
        *extra,
    ]  # fmt: skip


def make_task(world, family, tmp_path, **fields):
    from accelerate import Accelerator

    config_class, backend_class = TASKS[family]
    config = config_class(pretrained_model_name_or_path=str(world / family), instance_data_dir=str(world / "instance"),
                          instance_prompt=PROMPT, output_dir=str(tmp_path), report_to="none", resolution=16,
                          max_sequence_length=16, **fields).validate()  # fmt: skip
    task = DreamBoothTask(config, backend_class(config))
    task.check_inputs()
    run = Run(Accelerator(cpu=True), torch.float32, torch.Generator().manual_seed(0))
    task.setup(run)
    return task, run


def load(world, family):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipe = (StableDiffusion3Pipeline if family == "sd3" else FluxPipeline).from_pretrained(world / family)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- which model is which, and the flags ------------------------------------------------------------------------------
def test_the_model_folder_picks_the_flow_task_and_its_defaults(world, tmp_path, capsys):
    sd3, flux = parse_args(flags(world, "sd3", tmp_path)), parse_args(flags(world, "flux", tmp_path))
    assert type(sd3) is DreamBoothSD3Config and type(flux) is DreamBoothFluxConfig
    # diffusers' defaults: SD3 logit-normal σ's and preconditioned outputs, Flux uniform σ's and the velocity
    assert (sd3.target_modules, sd3.weighting_scheme, sd3.precondition_outputs) == (
        ("sd3-attention",),
        "logit_normal",
        1,
    )
    assert (flux.target_modules, flux.weighting_scheme, flux.precondition_outputs) == (("flux-attention",), "none", 0)
    assert (flux.guidance_scale, flux.validation_guidance_scale, sd3.validation_guidance_scale) == (3.5, 3.5, 7.0)
    for family, flag, value, message in (
        ("flux", "--pretrained_vae_model_name_or_path", "x", "does not apply to Flux models"),
        ("sd3", "--guidance_scale", "2", "--guidance_scale does not apply to Stable Diffusion 3 models"),
        ("sd3", "--snr_gamma", "5", "--snr_gamma is min-SNR weighting for DDPM models"),
        ("flux", "--offset_noise", None, "--offset_noise is for DDPM models"),
        ("flux", "--weighting_scheme", "uniform", "invalid choice: 'uniform'"),
        ("flux", "--lora_layers", "attn.to_q", "--lora_layers does not apply to ETHER"),
        ("sd3", "--lora_blocks", "0", "--lora_blocks does not apply to ETHER"),
        ("flux", "--lora_alpha", "16", "--lora_alpha does not apply to ETHER: ETHER has no rank for an alpha"),
        ("flux", "--enable_npu_flash_attention", None, "it is for Huawei Ascend NPUs"),
        ("sd3", "--output_kohya_format", None, "--output_kohya_format: SD3 has no kohya LoRA format"),
        ("sd3", "--tokenizer_max_length", "8", "--max_sequence_length sets T5's"),
    ):
        with pytest.raises(SystemExit):
            parse_args(flags(world, family, tmp_path, flag, *([value] if value else [])))
        assert message in capsys.readouterr().err, (family, flag)
    assert parse_args(flags(world, "flux", tmp_path, "--upcast_before_saving")).ether_method  # accepted: always so
    # the same scheduler flags diffusers has, under their names
    config = parse_args(
        flags(
            world,
            "flux",
            tmp_path,
            "--weighting_scheme",
            "logit_normal",
            "--logit_mean",
            "0.5",
            "--logit_std",
            "0.8",
            "--precondition_outputs",
            "1",
            "--guidance_scale",
            "1",
        )
    )
    assert (config.logit_mean, config.logit_std, config.precondition_outputs, config.guidance_scale) == (0.5, 0.8, 1, 1)
    # a DreamBoothConfig built in code for a Flux model (the studio does this) trains Flux with Flux's defaults
    task = task_for(DreamBoothConfig(pretrained_model_name_or_path=str(world / "flux"), instance_data_dir="x",
                                     instance_prompt=PROMPT, learning_rate=1e-3))  # fmt: skip
    assert type(task) is DreamBoothTask and type(task.backend) is FluxBackend
    assert type(task.config) is DreamBoothFluxConfig
    assert (task.config.target_modules, task.config.learning_rate) == (("flux-attention",), 1e-3)
    with pytest.raises(ConfigError, match="--snr_gamma is min-SNR weighting"):
        task_for(DreamBoothConfig(pretrained_model_name_or_path=str(world / "sd3"), instance_data_dir="x",
                                  instance_prompt=PROMPT, snr_gamma=5.0))  # fmt: skip


def test_a_resolution_the_latent_grid_cannot_take_is_refused(world, tmp_path):
    """Flux packs 2 x 2 latents into a token and SD3 cuts 2 x 2 patches: with the tiny VAE's factor 2, multiples of 4
    (16 on the real models, whose VAE has factor 8; the flags' multiples of 8 pass here, so the task's check is called
    with a size the flags would refuse)."""
    for family in FAMILIES:
        task, _ = make_task(world, family, tmp_path)
        task.config.resolution = 14
        with pytest.raises(ConfigError, match="takes images in 4-pixel patches: use a multiple of 4, e.g. 12"):
            task.backend.check_components()


# --- the conditioning and the velocity are the pipelines' -------------------------------------------------------------
def test_sd3_conditioning_matches_stable_diffusion_3_pipeline(world, tmp_path):
    task, run = make_task(world, "sd3", tmp_path, center_crop=True)
    dataset = task.dataset(run, lambda *args: None)
    batch = dataset.collate([dataset[0], dataset[1]])
    assert {"input_ids", "input_ids_2", "input_ids_3"} <= set(batch)
    with torch.no_grad():
        condition = task.backend.condition(batch, run)
    embeds, _, pooled, _ = load(world, "sd3").encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False,
                                                            max_sequence_length=16)  # fmt: skip
    assert condition["encoder_hidden_states"].shape == (2, 16 + 16, 64)  # 16 CLIP tokens (padded 64 wide) + 16 of T5
    assert_close(condition["encoder_hidden_states"], embeds.expand(2, -1, -1), rtol=1e-5, atol=1e-6)
    assert_close(condition["pooled_projections"], pooled.expand(2, -1), rtol=1e-5, atol=1e-6)


def test_flux_conditioning_matches_flux_pipeline(world, tmp_path):
    task, run = make_task(world, "flux", tmp_path, center_crop=True)
    dataset = task.dataset(run, lambda *args: None)
    batch = dataset.collate([dataset[0], dataset[1]])
    with torch.no_grad():
        condition = task.backend.condition(batch, run)
    embeds, pooled, text_ids = load(world, "flux").encode_prompt(PROMPT, max_sequence_length=16)
    assert_close(condition["encoder_hidden_states"], embeds.expand(2, -1, -1), rtol=1e-5, atol=1e-6)
    assert_close(condition["pooled_projections"], pooled.expand(2, -1), rtol=1e-5, atol=1e-6)
    assert torch.equal(condition["txt_ids"], text_ids)


@pytest.mark.parametrize(
    ("family", "scheme", "precondition"),
    [("sd3", "logit_normal", 1), ("sd3", "none", 0), ("flux", "none", 0), ("flux", "mode", 1)],
)
def test_the_task_loss_is_the_flow_matching_loss(world, tmp_path, family, scheme, precondition):
    """The task's loss on a batch, redone here from its parts: the VAE's latents x₀ (shifted, scaled) and the noise ε
    drawn from the same seed, σ looked up in a FlowMatchEulerDiscreteScheduler built from the model's scheduler
    config by the timestep the transformer was given, x_σ = (1 − σ) x₀ + σ ε as the transformer's input, and the
    target ε − x₀ (or, preconditioned, x₀ against x_σ − σ v̂) scored by the transformer's output."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    task, run = make_task(world, family, tmp_path, center_crop=True, weighting_scheme=scheme,
                          precondition_outputs=precondition)  # fmt: skip
    dataset = task.dataset(run, lambda *args: None)
    batch = dataset.collate([dataset[i] for i in range(3)])
    seen = {}
    predict = task.backend.predict

    def spy(noisy, timesteps, condition, run):
        seen.update(noisy=noisy, timesteps=timesteps, prediction=predict(noisy, timesteps, condition, run))
        return seen["prediction"]

    task.backend.predict = spy
    run.noise_generator.manual_seed(77)
    with torch.no_grad():
        loss, _ = task.loss(batch, run)

    vae = task.backend.components.vae
    generator = torch.Generator().manual_seed(77)
    with torch.no_grad():
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample(generator=generator)
    latents = (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(world / family, subfolder="scheduler")
    index = [(scheduler.timesteps == t).nonzero().item() for t in seen["timesteps"]]
    sigmas = scheduler.sigmas[index].view(-1, 1, 1, 1)
    assert len(set(index)) == 3  # three different noise levels
    assert_close(seen["noisy"], (1 - sigmas) * latents + sigmas * noise, rtol=1e-5, atol=1e-6)
    prediction = seen["prediction"]
    if precondition:
        error = prediction * (-sigmas) + seen["noisy"] - latents
    else:
        error = prediction - (noise - latents)
    weight = 1.0  # logit_normal, mode and none weigh through the σ's they draw, not the loss
    assert_close(loss, (weight * error**2).mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_sampler_step_from_noise_moves_by_the_predicted_velocity(world, tmp_path, family):
    """One Euler step of the pipeline's own sampler from pure noise (σ = 1 to 0) lands on noise − v̂: the velocity
    ``predict`` returns at t = 1000 with the training conditioning (Flux: packing, t / 1000, guidance 3.5)."""
    task, run = make_task(world, family, tmp_path, center_crop=True)
    dataset = task.dataset(run, lambda *args: None)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        velocity = task.backend.predict(
            noise, torch.tensor([1000.0]), task.backend.condition(dataset.collate([dataset[0]]), run), run
        )
    pipe = load(world, family)
    if family == "sd3":
        stepped = pipe(PROMPT, latents=noise, num_inference_steps=1, guidance_scale=1.0, height=16, width=16,
                       max_sequence_length=16, output_type="latent").images  # fmt: skip
    else:
        from diffusers import FluxPipeline

        packed = FluxPipeline._pack_latents(noise, 1, 4, 8, 8)
        out = pipe(PROMPT, latents=packed, num_inference_steps=1, guidance_scale=3.5, height=16, width=16,
                   max_sequence_length=16, output_type="latent").images  # fmt: skip
        stepped = FluxPipeline._unpack_latents(out, 16, 16, 2)
    assert_close(stepped, noise - velocity, rtol=1e-4, atol=1e-5)


def test_every_adapted_vector_gets_a_gradient(world, tmp_path):
    """With --train_text_encoder; SD3 leaves out its last block's add_q_proj, which gets none (shown below)."""
    for family in FAMILIES:
        task, run = make_task(world, family, tmp_path / family, train_text_encoder=True)
        configs = task.adapter_configs()
        assert set(configs) == (
            {"transformer", "text_encoder", "text_encoder_2"} if family == "sd3" else {"transformer", "text_encoder"}
        )  # fmt: skip (T5 never trains)
        expected_exclusions = ["transformer_blocks.1.attn.add_q_proj"] if family == "sd3" else []
        assert configs["transformer"].exclude_modules == expected_exclusions
        assert all(configs[c].exclude_modules == [] for c in configs if c != "transformer")
        dataset = task.dataset(run, lambda *args: None)
        loss, _ = task.loss(dataset.collate([dataset[0]]), run)
        loss.backward()
        for component, model in task.adapters.models.items():
            layers = dict(adapter_layers(model))
            assert layers, component
            for path, layer in layers.items():
                grads = [p.grad for p in layer.parameters() if p.requires_grad]
                assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads), (family, path)
        counts = {c: len(dict(adapter_layers(m))) for c, m in task.adapters.models.items()}
        assert counts["transformer"] == (2 * 8 - 2 if family == "sd3" else 8 + 3)
    # why: in a context_pre_only block the text tokens' attention output is dropped, so their queries never matter
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(world / "sd3", subfolder="transformer")
    inject(transformer, EtherConfig(target_modules=["add_q_proj"]), "probe")
    randomize_adapters(transformer)
    out = transformer(
        hidden_states=torch.randn(1, 4, 8, 8),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 32, 64),
        pooled_projections=torch.randn(1, 64),
    ).sample
    out.square().sum().backward()
    grads = {path: [p.grad for p in layer.parameters()] for path, layer in adapter_layers(transformer)}
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads["transformer_blocks.0.attn.add_q_proj"])
    assert all(g is None or not g.any() for g in grads["transformer_blocks.1.attn.add_q_proj"])


# --- training ---------------------------------------------------------------------------------------------------------
RUN_FLAGS = (
    "--with_prior_preservation",
    "--class_prompt",
    "a star",
    "--num_class_images",
    "2",
    "--train_text_encoder",
    "--random_flip",
    "--lr_scheduler",
    "cosine",
    "--max_train_steps",
    "4",
    "--checkpointing_steps",
    "2",
)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """One run per family with prior preservation, the CLIP encoder(s), flips, validation and the final reload."""
    runs = {}
    for family in FAMILIES:
        out = tmp_path_factory.mktemp(f"{family}-run")
        args = flags(world, family, out / "straight", *RUN_FLAGS, "--class_data_dir", str(out / "class"),
                     "--validation_prompt", PROMPT, "--validation_steps", "2")  # fmt: skip
        runs[family] = (train(parse_args(args)), out)
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_run_with_prior_preservation_validation_and_reload(trained, family):
    result, out = trained[family]
    assert result.global_step == 4 and len(result.losses) == 4 and all(np.isfinite(result.losses))
    assert sorted(p.name for p in (out / "class").iterdir()) == ["class-00000.png", "class-00001.png"]
    assert Image.open(out / "class" / "class-00000.png").size == (16, 16)  # drawn at --resolution
    source = read_adapter_file(result.adapter_path)
    components = {"sd3": {"transformer", "text_encoder", "text_encoder_2"}, "flux": {"transformer", "text_encoder"}}
    assert set(source.configs) == components[family] and source.model_family == family
    assert source.extra["trained_with"].endswith(f"dreambooth-{family}") and source.extra["steps"] == "4"
    straight = out / "straight"
    assert len(list((straight / "validation").glob("step-*.png"))) == 2 * 3  # steps 0, 2, 4
    assert (straight / "samples.png").is_file()  # the saved file in a fresh pipeline
    pipeline = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]
    assert f"{pipeline}.from_pretrained" in (straight / "README.md").read_text()
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_gives_the_same_adapter(world, trained, tmp_path, family):
    result, out = trained[family]
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(out / "straight" / "checkpoint-2", resumed_dir / "checkpoint-2")
    args = flags(
        world,
        family,
        resumed_dir,
        *RUN_FLAGS,
        "--class_data_dir",
        str(out / "class"),
        "--validation_prompt",
        PROMPT,
        "--validation_steps",
        "2",
        "--resume_from_checkpoint",
        "latest",
        "--no_final_reload",
    )
    resumed = train(parse_args(args))
    assert resumed.global_step == 4 and resumed.losses == result.losses[2:]
    a, b = read_adapter_file(result.adapter_path).tensors, read_adapter_file(resumed.adapter_path).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_lowers_the_loss_on_its_images(world, tmp_path, family):
    """The flow-matching loss on the instance images (24 samples: 3 images x 8 noises), with the training's own
    objective, is lower with the trained adapter than with the base model at the same noises and σ's, at each of three
    noise seeds (ETHER+ starts at the identity, so disabled adapters are the base model). 15 steps at 2e-2 bring it
    down 5-8 % (SD3) and 10-11 % (Flux) on every seed; 3 % is asked."""
    result = train(parse_args(flags(world, family, tmp_path, "--max_train_steps", "15", "--no_final_reload",
                                    "--center_crop", "--learning_rate", "2e-2")))  # fmt: skip
    task, run = make_task(world, family, tmp_path / "eval", center_crop=True)
    task.load_checkpoint(result.adapter_path)
    dataset = task.dataset(run, lambda *args: None)
    batch = dataset.collate([dataset[i] for i in range(len(dataset))] * 8)

    def loss(seed):
        run.noise_generator.manual_seed(seed)
        with torch.no_grad():
            return float(task.loss(batch, run)[0])

    for seed in (1234, 1, 2):
        trained_loss = loss(seed)
        with task.adapters.disabled():
            base_loss = loss(seed)
        assert trained_loss < 0.97 * base_loss, (seed, trained_loss, base_loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_saved_file_samples_in_a_fresh_pipeline(world, trained, family):
    """The trained file in a fresh pipeline loaded from disk: it changes the images, fusing gives the same images."""
    from ether_diffusion.pipeline import disable_ether, fuse_ether, load_ether_weights, unfuse_ether

    pipe = load(world, family)
    generators = [torch.Generator().manual_seed(0)]

    def sample():
        return pipe(PROMPT, generator=generators, num_inference_steps=3, height=16, width=16, max_sequence_length=16,
                    output_type="np").images  # fmt: skip

    base = sample()
    load_ether_weights(pipe, trained[family][0].adapter_path)
    generators = [torch.Generator().manual_seed(0)]
    adapted = sample()
    assert np.abs(adapted - base).max() > 1e-3
    fuse_ether(pipe)
    generators = [torch.Generator().manual_seed(0)]
    np.testing.assert_allclose(sample(), adapted, atol=1e-4)
    unfuse_ether(pipe)
    disable_ether(pipe)
    generators = [torch.Generator().manual_seed(0)]
    np.testing.assert_allclose(sample(), base, atol=1e-5)


def test_cli_train_sample_and_fuse_take_a_flux_model(world, trained, tmp_path, capsys):
    from diffusers import FluxPipeline

    from ether_diffusion.cli import main
    from ether_diffusion.pipeline import load_ether_weights

    model = str(world / "flux")
    assert (
        main(["train", *flags(world, "flux", tmp_path / "train", "--max_train_steps", "1", "--no_final_reload")]) == 0
    )
    assert read_adapter_file(tmp_path / "train").extra["trained_with"].endswith("dreambooth-flux")
    adapter = str(trained["flux"][0].adapter_path)
    assert main(["sample", "--model", model, "--adapter", adapter, "--prompt", PROMPT, "--steps", "2", "--size", "16",
                 "--compare", "--output_dir", str(tmp_path / "samples")]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["00_seed0_adapted.png", "00_seed0_base.png"]
    assert main(["inspect", adapter]) == 0
    assert "made for     Flux (FluxPipeline)" in capsys.readouterr().out
    assert main(["fuse", "--model", model, "--adapter", adapter, "--output_dir", str(tmp_path / "fused")]) == 0
    assert "FluxPipeline.from_pretrained" in capsys.readouterr().out
    fused = FluxPipeline.from_pretrained(tmp_path / "fused")  # plain diffusers, adapter baked in
    loaded = FluxPipeline.from_pretrained(model)
    load_ether_weights(loaded, adapter)
    images = [pipe(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=2, height=16, width=16,
                   max_sequence_length=16, output_type="np").images for pipe in (fused, loaded)]  # fmt: skip
    np.testing.assert_allclose(images[0], images[1], atol=1e-4)
    assert json.loads((tmp_path / "fused" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"


# --- the shared training flags ----------------------------------------------------------------------------------------
def captioned_folder(world, folder):
    """The instance images with a kohya caption beside the first: its prompt replaces --instance_prompt."""
    folder.mkdir(exist_ok=True)
    for path in sorted((world / "instance").glob("*.png")):
        shutil.copy(path, folder / path.name)
    (folder / "0.txt").write_text("a sks star on grass")
    return folder


class Watch(Callback):
    """Counts the VAE's encodes and the text encoders' calls (T5's too) from the first training step on."""

    def __init__(self, task):
        self.task, self.calls = task, {"vae": 0, "text": 0}

    def on_train_start(self, total_steps, start_step):
        encode = self.task.backend.components.vae.encode

        def counted(*args, **kwargs):
            self.calls["vae"] += 1
            return encode(*args, **kwargs)

        self.task.backend.components.vae.encode = counted
        for encoder in self.task.backend.all_text_encoders():
            encoder.register_forward_pre_hook(self._text)

    def _text(self, *args):
        self.calls["text"] += 1


@pytest.mark.parametrize("family", FAMILIES)
def test_captions_and_both_caches_train_as_without_them(world, tmp_path, family):
    """--cache_latents encodes each (image, crop) once, --pre_compute_text_embeddings encodes each prompt once with
    every text encoder (T5 too) and the training steps read the table: the losses and the adapter are those of a run
    without either; the caption's row is what the pipeline's encode_prompt makes of the caption."""
    from ether_diffusion.training.trainer import Trainer

    config_class, _ = TASKS[family]
    common = dict(pretrained_model_name_or_path=str(world / family), instance_prompt=PROMPT, report_to="none",
                  quiet=True, resolution=16, max_sequence_length=16, center_crop=True, max_train_steps=4,
                  no_final_reload=True,
                  instance_data_dir=str(captioned_folder(world, tmp_path / "captioned")))  # fmt: skip
    runs = {}
    for name, extra in (("plain", {}), ("cached", dict(cache_latents=True, pre_compute_text_embeddings=True))):
        task = task_for(config_class(output_dir=str(tmp_path / name), **common, **extra))
        watch = Watch(task)
        runs[name] = (task, watch.calls, Trainer(task, [watch]).train())
    (_, plain_calls, plain), (task, calls, cached) = runs["plain"], runs["cached"]
    encoders = 3 if family == "sd3" else 2
    assert plain_calls == {"vae": 4, "text": 4 * encoders}
    assert calls == {"vae": 3, "text": 0}  # 3 images with one crop each; prompts encoded before the first step
    table = task.backend.text_table
    assert table["encoder_hidden_states"].shape[0] == 2 and table["pooled_projections"].shape[0] == 2
    pipe = load(world, family)
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt("a sks star on grass", None, None, max_sequence_length=16,
                                                  do_classifier_free_guidance=False)  # fmt: skip
    else:
        embeds, pooled, _ = pipe.encode_prompt("a sks star on grass", None, max_sequence_length=16)
    assert_close(table["encoder_hidden_states"][:1], embeds, rtol=1e-5, atol=1e-6)
    assert_close(table["pooled_projections"][:1], pooled, rtol=1e-5, atol=1e-6)
    assert_close(torch.tensor(cached.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-7)
    a, b = read_adapter_file(plain.adapter_path).tensors, read_adapter_file(cached.adapter_path).tensors
    assert a.keys() == b.keys()
    for key in a:
        assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_shared_flags_that_do_not_fit_flow_models_are_refused(world, tmp_path):
    """The DreamBooth flags of the SD/SDXL scripts that would do something else on SD3/Flux name the reason."""
    for family in FAMILIES:
        config_class, _ = TASKS[family]
        base = dict(pretrained_model_name_or_path=str(world / family), instance_data_dir="x", instance_prompt=PROMPT)
        for field, value, message in (
            ("tokenizer_max_length", 8, "--max_sequence_length sets T5's"),
            ("text_encoder_use_attention_mask", True, "without a padding mask"),
            ("validation_scheduler", "DDPMScheduler", "is not one of FlowMatchEulerDiscreteScheduler"),
        ):
            with pytest.raises(ConfigError, match=message):
                config_class(**base, **{field: value}).validate()
            with pytest.raises(ConfigError, match=message):  # also when it comes in a plain DreamBoothConfig
                task_for(DreamBoothConfig(**base, **{field: value}))


@pytest.mark.parametrize("family", FAMILIES)
def test_text_encoder_lr_groups_the_clip_vectors_apart_from_the_transformer(world, tmp_path, family):
    task, _ = make_task(world, family, tmp_path, train_text_encoder=True, text_encoder_lr=1e-4)
    groups = task.parameter_groups()
    assert [(g["name"], g["lr"]) for g in groups] == [("text_encoder", 1e-4), ("adapter", task.config.learning_rate)]
    by_component = {c: {id(p) for p in task.adapters.parameters([c])} for c in task.adapters.models}
    clip = {"sd3": ("text_encoder", "text_encoder_2"), "flux": ("text_encoder",)}[family]
    assert {id(p) for p in groups[0]["params"]} == set().union(*(by_component[c] for c in clip))
    assert {id(p) for p in groups[1]["params"]} == by_component["transformer"] and by_component["transformer"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_train_the_transformer_and_clip(world, tmp_path, family):
    """Data parallel over gloo with --train_text_encoder: every adapted vector gets a gradient on every rank (SD3's
    unread add_q_proj would fail DDP's reduction: "parameters that were not used in producing loss")."""
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(SCRIPT),
        *flags(world, family, tmp_path, "--max_train_steps", "2", "--train_text_encoder", "--no_final_reload"),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=400, env=launch_env())
    assert run.returncode == 0, run.stderr[-3000:]
    source = read_adapter_file(tmp_path / "ether_adapter.safetensors")
    assert source.extra["num_processes"] == "2" and source.extra["steps"] == "2"
    assert source.extra["trained_with"].endswith(f"dreambooth-{family}") and source.model_family == family


# --- the studio -------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # a studio job end to end: the end-to-end tier
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_studio_trains_and_samples_a_transformer_model(world, tmp_path, family):
    """The studio started on an SD3 or Flux folder: the estimate measures the family's task, a job trains it (with
    previews) and publishes its adapter; the sampler loads it into the model's own pipeline and draws it beside the
    base model."""
    from ether_diffusion.studio import AdapterStore, JobManager, Sampler, TrainSpec, Workspace
    from ether_diffusion.studio.sampling import SampleRequest

    model = str(world / family)
    workspace = Workspace(tmp_path / "studio")
    store = AdapterStore(workspace)
    manager = JobManager(workspace, model, store)
    uploads = [str(p) for p in sorted((world / "instance").iterdir())]
    spec = TrainSpec(adapter_name=f"{family}-star", instance_prompt=PROMPT, uploads=uploads, class_prompt="a star",
                     max_train_steps=2, num_class_images=1, preview_every=2, preview_images=1,
                     preview_steps=2)  # fmt: skip
    estimate = manager.estimate(spec)
    assert estimate.seconds > 0 and estimate.memory_bytes > 0
    manager.start(spec)
    state = manager.wait(300)
    assert state["phase"] == "done", state.get("traceback") or state.get("error")
    assert state["step"] == 2 and all(np.isfinite(state["losses"]))
    adapter = read_adapter_file(store.require(f"{family}-star"))
    assert set(adapter.configs) == {"transformer"} and adapter.model_family == family
    assert estimate.measured.trainable_parameters == adapter.num_parameters()  # the estimate ran the family's task

    sampler = Sampler(model, workspace, store)
    result = sampler.sample(SampleRequest(prompt=PROMPT, adapters=[(f"{family}-star", 1.0)], seeds=[3], steps=2,
                                          compare=True), save=False)  # fmt: skip
    assert type(sampler._pipe).__name__ == ("StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline")
    adapted, base = (np.asarray(image, dtype=np.float64) for image in result.images)
    assert result.captions == [f"seed 3 · {family}-star×1", "seed 3 · base model"]
    assert np.abs(adapted - base).max() > 0  # the adapter acts on the pipeline


@pytest.mark.parametrize("family", FAMILIES)
def test_a_flow_model_trains_on_an_nf4_or_int8_base(world, family, tmp_path):
    """--base_quantization on the transformers: int8 on SD3, nf4 on Flux (the tiny transformers' layers too small for
    NF4's blocks stay as they are), two steps, finite losses, float32 vectors saved."""
    pytest.importorskip("torchao")
    from safetensors.torch import load_file

    kind = "int8" if family == "sd3" else "nf4"
    result = train(parse_args(flags(world, family, tmp_path, "--max_train_steps", "2", "--base_quantization", kind)))
    assert result.global_step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert all(v.dtype == torch.float32 for v in load_file(result.adapter_path).values())
