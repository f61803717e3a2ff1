"""The model a task trains on, as a backend: Stable Diffusion 1.x/2.x here, the other families in their modules.

A task (``task.py``) holds one backend and asks it everything that depends on the model family; the backend knows
nothing of DreamBooth or control. ``StableDiffusionBackend`` is SD 1.x/2.x; ``sdxl.py`` overrides the few hooks where
SDXL differs, ``flow.py`` (with ``sd3.py``, ``flux.py``) those where the transformer models trained on flow matching
do:

    family                      the model family (``families.FAMILIES``); another family's model is refused
    denoiser_component          the component that denoises: "unet", or "transformer" (SD3, Flux)
    load(run) / attach(...)     the frozen components on the run's device and dtype / the adapters added to them
    load_components()           tokenizers, text encoders, VAE, denoiser, noise scheduler
    text_encoders()             ``{component: text encoder}`` that ``--train_text_encoder`` adapts (one for SD, two
                                for SDXL)
    frozen_encoders()           ``{component: encoder}`` the condition also needs but that never train (T5)
    denoiser_adapter_config()   what the flags' targets adapt in the denoiser (less what the model never reads)
    text_encoder_adapter_config(component, denoiser_config)   what ``--train_text_encoder`` adapts in each
    encode_text(tokens, run)    the text encoders' outputs the denoiser reads, per prompt
                                (``--pre_compute_text_embeddings`` keeps them per distinct prompt)
    condition(batch, run)       the denoiser's keyword arguments for a batch (text embeddings, added conditions)
    denoising_loss(batch, run)  noise the batch's latents and score the denoiser's prediction
    pipeline() / fresh_pipeline()   a pipeline over the training modules / a fresh one from disk

Two caches make a step cheaper without changing what it computes: ``enable_latent_cache()`` keeps the VAE's latent
distribution of each (image, crop, flip) the data yields (``batch["latent_key"]``), so an input seen before is not
encoded again; ``precompute_text()`` encodes each distinct prompt once (``batch["prompt_index"]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple

import torch

from ..families import FAMILIES, ModelFamily, require_family
from ..models import load_components, load_pipeline
from ..quantize import quantize_base
from ..sampling import sample_images
from .diffusion import dreambooth_loss, prediction_target, sample_noise
from .run import Run

__all__ = ["Draws", "StableDiffusionBackend"]


class Draws(NamedTuple):
    """A training step's random draws: clean latents, noise and timesteps (one row per sample)."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


def place(model: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """``model.to(device, dtype=dtype)``. diffusers' models warn at every cast with a dtype that modules which must
    stay in float32 would be cast too, even when they have none; that warning is kept for a model that has such
    modules (``_keep_in_fp32_modules``) and left out where it names none."""
    if getattr(model, "_keep_in_fp32_modules", None):
        model.to(device, dtype=dtype)
    else:
        torch.nn.Module.to(model, device, dtype=dtype)


class StableDiffusionBackend:
    """Stable Diffusion 1.x/2.x: loads the model, freezes it, carries the adapters a task adds (``attach``), and
    computes the denoising loss (epsilon or v target, from the scheduler's ``prediction_type``).

    ``config`` is the run's configuration (model path, resolution, caches, validation sampling); ``family``, when
    given, is the model's family as the registry already read it (else it is read from the model once, at ``load``).
    """

    #: the model family this backend trains; another family's model is refused before anything loads
    family = "sd"
    #: the component that denoises (a pipeline attribute and the adapter file's key)
    denoiser_component = "unet"
    #: the model card's tag of this family (besides the task's)
    card_tag: str | None = None
    #: whether ``--cuda_graphs`` may capture this backend's denoising loss (checked on SD 1.x/2.x only so far)
    captures_step = True

    def __init__(self, config, family: ModelFamily | None = None):
        self.config = config
        self.model_family = family
        self.components = None
        #: ``{(stream, image, top, left, flipped): VAE distribution parameters (2C, h, w)}`` once enabled
        self.latent_cache: dict | None = None
        #: ``{output name: (prompts, ...) tensor}``: the text conditioning of each distinct prompt, once pre-computed
        self.text_table: dict | None = None
        self._text_device = None

    def denoiser(self) -> torch.nn.Module:
        return getattr(self.components, self.denoiser_component)

    def denoiser_adapter_config(self):
        """The denoiser's ``EtherConfig``: the flags' targets (the components are loaded)."""
        return self.config.adapter_config()

    def text_encoder_adapter_config(self, component: str, denoiser_config):
        """The adapter of text encoder ``component`` when the task trains it: its attention, else as the
        denoiser's."""
        return dataclasses.replace(denoiser_config, target_modules="text-encoder-attention")

    # --- the model --------------------------------------------------------------------------------------------
    def check_family(self, what: str) -> None:
        """Refuse a model of another family (``what``: the training that asks, for the message)."""
        family = self.model_family
        if family is not None and family.name == self.family:
            return
        config = self.config
        require_family(config.pretrained_model_name_or_path, (self.family,), what, revision=config.revision,
                       config=config.model_config)  # fmt: skip

    def load_components(self):
        config = self.config
        return load_components(
            config.pretrained_model_name_or_path,
            config.revision,
            config.variant,
            config.tokenizer_name,
            config=config.model_config,
            original_config=config.original_config,
        )

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.components.text_encoder}

    def frozen_encoders(self) -> dict[str, torch.nn.Module]:
        """Encoders the condition needs that never carry adapters (none for SD)."""
        return {}

    def tokenizers(self) -> list:
        """Tokenizers in the order of ``input_ids``, ``input_ids_2``, ..."""
        return [self.components.tokenizer]

    def check_components(self) -> None:
        """Refuse settings the loaded model cannot train with (a resolution its latent grid cannot take, ...)."""
        return None

    def load(self, run: Run, what: str = "training") -> None:
        """Load the components (``--resolution`` defaults to the model's native size), freeze them, and put the VAE
        on the run's device (fp32 under fp16 training: its decoder overflows in half precision)."""
        config = self.config
        self.check_family(what)
        parts = self.components = self.load_components()
        if config.resolution is None:
            config.resolution = parts.native_resolution
        self.check_components()
        for model in (parts.vae, self.denoiser(), *self.all_text_encoders()):
            model.requires_grad_(False)
        weight_dtype = run.weight_dtype
        place(parts.vae, run.device, torch.float32 if weight_dtype == torch.float16 else weight_dtype)

    def attach(self, adapters, configs: dict, run: Run) -> None:
        """Add ``adapters`` with ``configs`` (``{component: EtherConfig}``) to the components, move the denoiser and
        text encoders to the run's device and dtype, and switch on the flags' memory savers."""
        config, denoiser, text_encoders = self.config, self.denoiser(), self.text_encoders()
        models = {self.denoiser_component: denoiser, **text_encoders}
        adapters.add({c: models[c] for c in configs}, configs)
        for model in (*models.values(), *self.frozen_encoders().values()):
            place(model, run.device, run.weight_dtype)
        quantize_base(denoiser, config.base_quantization)  # after the cast: a quantised weight keeps its dtype
        if config.enable_xformers_memory_efficient_attention:
            denoiser.enable_xformers_memory_efficient_attention()
        if config.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
            for component, model in text_encoders.items():
                if component in configs:
                    model.gradient_checkpointing_enable()

    # --- the loss -----------------------------------------------------------------------------------------------
    def encode_text(self, tokens: dict, run: Run) -> dict[str, torch.Tensor]:
        """What the UNet reads of the prompts in ``tokens`` (``input_ids``, optionally ``attention_mask``): the text
        encoder's last hidden state, (B, T, D)."""
        text_encoder = run.module("text_encoder", self.components.text_encoder)
        mask = tokens.get("attention_mask")
        output = text_encoder(tokens["input_ids"].to(run.device), attention_mask=_on(mask, run.device))
        return {"encoder_hidden_states": output[0]}

    def text_condition(self, batch: dict, run: Run) -> dict[str, torch.Tensor]:
        """``encode_text`` of the batch's prompts, or their rows of the pre-computed table."""
        if self.text_table is None:
            return self.encode_text(batch, run)
        index = batch["prompt_index"].to(run.device)
        return {name: table.index_select(0, index) for name, table in self.text_table.items()}

    def condition(self, batch: dict, run: Run) -> dict:
        """The UNet's conditioning for ``batch``: the text encoder's last hidden state."""
        return self.text_condition(batch, run)

    def precompute_text(self, tokens: list[dict[str, torch.Tensor]], run: Run) -> None:
        """Encode each prompt (``tokens[i]`` is prompt ``i``'s ids) once; batches then index the table by
        ``prompt_index`` and the text encoders leave the accelerator until validation needs them."""
        stacked = {key: torch.stack([t[key] for t in tokens]) for key in tokens[0]}
        with torch.no_grad():
            self.text_table = {name: value.detach() for name, value in self.encode_text(stacked, run).items()}
        self._text_device = run.device
        for encoder in self.all_text_encoders():
            encoder.to("cpu")

    def all_text_encoders(self) -> list[torch.nn.Module]:
        """Every text encoder the conditioning reads: the trainable ones and the frozen ones (T5)."""
        return [*self.text_encoders().values(), *self.frozen_encoders().values()]

    @contextlib.contextmanager
    def text_encoders_ready(self):
        """The text encoders on the training device while sampling, also when pre-computed embeddings keep them off
        it during training."""
        device = getattr(self, "_text_device", None)
        if self.text_table is None or device is None or device.type == "cpu":
            yield
            return
        for encoder in self.all_text_encoders():
            encoder.to(device)
        try:
            yield
        finally:
            for encoder in self.all_text_encoders():
                encoder.to("cpu")

    def enable_latent_cache(self) -> None:
        """Keep each encoded training input's latent distribution (``--cache_latents``)."""
        self.latent_cache = {}

    def latent_distribution(self, batch: dict, run: Run):
        """The VAE's latent distribution of ``batch["pixel_values"]``; with the cache, each (image, crop, flip) of
        ``batch["latent_key"]`` is encoded the first time it appears, alone, so an entry never depends on which
        batch brought it (a resumed run reads the same numbers)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        vae = self.components.vae
        with torch.no_grad():
            if self.latent_cache is None:
                return vae.encode(batch["pixel_values"].to(run.device, dtype=vae.dtype)).latent_dist
            rows = []  # cached rows touch no pixels (and ask no module its dtype: diffusers walks every module)
            for i, key in enumerate(map(tuple, batch["latent_key"].tolist())):
                if key not in self.latent_cache:
                    pixels = batch["pixel_values"][i : i + 1].to(run.device, dtype=vae.dtype)
                    self.latent_cache[key] = vae.encode(pixels).latent_dist.parameters[0]
                rows.append(self.latent_cache[key])
            return DiagonalGaussianDistribution(torch.stack(rows))  # (B, 2C, h, w): mean and log-variance

    def denoising_loss(self, batch: dict, run: Run, offset_noise: float = 0.0, prior_preservation: bool = False,
                       prior_loss_weight: float = 1.0):  # fmt: skip
        """Noise ``batch["pixel_values"]``'s latents at random timesteps and score the UNet's prediction of the
        scheduler's target (epsilon or v), conditioned on ``condition(batch)``."""
        draws = self.draw(self.latent_distribution(batch, run), run.noise_generator, run, offset_noise)
        prediction = self.predict_noise(draws, batch, run)
        return self.score(prediction, draws, self.config.snr_gamma, prior_preservation, prior_loss_weight)

    def draw(self, distribution, generator: torch.Generator, run: Run, offset_noise: float = 0.0) -> Draws:
        """A step's random draws from ``generator``, in this order: the latents from the VAE's ``distribution``, the
        noise, the timesteps. A packed step (``pack.py``) draws each run's rows from that run's own generator."""
        vae, scheduler = self.components.vae, self.components.noise_scheduler
        latents = distribution.sample(generator=generator)
        latents = (latents * vae.config.scaling_factor).to(run.weight_dtype)
        noise = sample_noise(latents, generator, offset_noise)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
        )
        return Draws(latents, noise, timesteps)

    def predict_noise(self, draws: Draws, batch: dict, run: Run) -> torch.Tensor:
        """The UNet's prediction on the noised latents of ``draws``, conditioned on ``batch``."""
        return self.denoise(draws, self.condition(batch, run), run)

    def denoise(self, draws: Draws, condition: dict, run: Run) -> torch.Tensor:
        """The UNet's prediction on the noised latents of ``draws`` with the keyword arguments ``condition``."""
        parts = self.components
        noisy = parts.noise_scheduler.add_noise(draws.latents, draws.noise, draws.timesteps)
        return run.module("unet", parts.unet)(noisy, draws.timesteps, **condition).sample

    def score(self, prediction, draws: Draws, snr_gamma, prior_preservation: bool, prior_loss_weight: float):
        """The DreamBooth loss of ``prediction`` against the scheduler's target (epsilon or v) of ``draws``."""
        scheduler = self.components.noise_scheduler
        target = prediction_target(scheduler, draws.latents, draws.noise, draws.timesteps)
        return dreambooth_loss(
            prediction, target, draws.timesteps, scheduler, snr_gamma, prior_preservation, prior_loss_weight
        )

    # --- sampling -----------------------------------------------------------------------------------------------
    def pipeline_class(self):
        return FAMILIES[self.family].pipeline_class()

    def card_loading_code(self) -> list[str]:
        """The model card's lines that load the base pipeline as ``pipe``."""
        pipeline = FAMILIES[self.family].pipeline
        return [
            f"from diffusers import {pipeline}",
            "from ether_diffusion import load_ether_weights",
            "",
            f'pipe = {pipeline}.from_pretrained("{self.config.pretrained_model_name_or_path}")',
        ]

    def validation_scheduler(self, scheduler_config):
        """``--validation_scheduler`` (DPM-Solver++ by default) from a model's scheduler configuration; a learned
        variance is sampled as fixed, as diffusers' scripts do (the adapters train the mean only)."""
        import diffusers

        extra = {}
        if scheduler_config.get("variance_type") in ("learned", "learned_range"):
            extra["variance_type"] = "fixed_small"
        return getattr(diffusers, self.config.validation_scheduler).from_config(scheduler_config, **extra)

    def pipeline(self, pipeline_class=None, device=None):
        """A pipeline over the training modules (adapters as they are now), sampling with
        ``--validation_scheduler``."""
        parts = self.components
        pipe = (pipeline_class or self.pipeline_class())(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=parts.unet,
            scheduler=self.validation_scheduler(parts.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validation_images(self, pipe, prompt: str, run: Run | None, **kwargs) -> list:
        """``num_validation_images`` images of ``prompt`` from seeds ``seed``, ``seed + 1``, ..."""
        config = self.config
        seeds = [config.seed + i for i in range(config.num_validation_images)]
        with run.autocast() if run is not None else torch.autocast("cpu", enabled=False):
            samples = sample_images(
                pipe,
                [prompt],
                seeds,
                num_inference_steps=config.validation_inference_steps,
                guidance_scale=config.validation_guidance_scale,
                batch_size=len(seeds),
                **kwargs,
            )
        return [s.image for s in samples]

    def base_model(self) -> str:
        return str(self.config.pretrained_model_name_or_path)

    def fresh_pipeline(self, pipeline_class=None, device=None, scheduler: str | None = "dpm", **kwargs):
        """The base model loaded anew from where the run loaded it (folder, hub id or single file), sampling with
        ``--validation_scheduler`` (``scheduler=None``: the model's own): what users get when they load the saved
        file themselves. ``pipeline_class`` defaults to the family's; ``kwargs`` go to ``load_pipeline``
        (``torch_dtype``)."""
        config = self.config
        pipe = load_pipeline(config.pretrained_model_name_or_path, pipeline_class or self.pipeline_class(), None,
                             config=config.model_config, original_config=config.original_config, **kwargs)  # fmt: skip
        if scheduler is not None:
            pipe.scheduler = self.validation_scheduler(pipe.scheduler.config)
        return pipe.to(device) if device is not None else pipe


def _on(tensor: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)
