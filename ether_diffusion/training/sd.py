"""What every Stable Diffusion task shares: the frozen components on the run's device and dtype, the adapters, the
denoising loss, and pipelines over the training modules for validation.

``StableDiffusionTask`` is SD 1.x/2.x; ``training/sdxl.py`` overrides the few hooks where SDXL differs:

    family                      the model family the task trains (``families.FAMILIES``), checked before loading
    load_components()           tokenizers, text encoders, VAE, UNet, noise scheduler
    text_encoders()             ``{component: text encoder}`` (one for SD, two for SDXL)
    text_encoder_adapter_config(component, unet_config)   what ``--train_text_encoder`` adapts in each
    encode_text(tokens, run)    the text encoders' outputs the UNet reads, per prompt (``--pre_compute_text_embeddings``
                                keeps them per distinct prompt)
    condition(batch, run)       the UNet's keyword arguments for a batch (text embeddings, SDXL's added conditions)
    pipeline() / fresh_pipeline()   a pipeline over the training modules / a fresh one from disk

Two caches make a step cheaper without changing what it computes: ``enable_latent_cache()`` keeps the VAE's latent
distribution of each (image, crop, flip) the data yields (``batch["latent_key"]``), so an input seen before is not
encoded again; ``precompute_text()`` encodes each distinct prompt once (``batch["prompt_index"]``).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..families import FAMILIES, require_family
from ..models import load_components, load_pipeline
from ..sampling import sample_images
from .adapters import adapters_for
from .diffusion import dreambooth_loss, prediction_target, sample_noise
from .task import Run, Task

__all__ = ["StableDiffusionTask"]


class StableDiffusionTask(Task):
    """Loads the model, freezes it, adds the adapters the subclass asks for (``adapter_configs``), and computes the
    denoising loss (epsilon or v target, from the scheduler's ``prediction_type``). Subclasses add their data,
    validation and artifact."""

    #: the model family this task trains; another family's model is refused before anything loads
    family = "sd"
    #: said when a model of another family is refused (where the right task is)
    family_hint = ""
    #: ``{(stream, image, top, left, flipped): VAE distribution parameters (2C, h, w)}`` once enabled
    latent_cache: dict | None = None
    #: ``{output name: (prompts, ...) tensor}``: the text conditioning of each distinct prompt, once pre-computed
    text_table: dict | None = None

    def adapter_configs(self) -> dict:
        """``{component: EtherConfig}`` of what to adapt; the UNet with the flags' targets by default."""
        return {"unet": self.config.adapter_config()}

    def text_encoder_adapter_config(self, component: str, unet_config):
        """The adapter of text encoder ``component`` when the task trains it: its attention, else as the UNet's."""
        return dataclasses.replace(unet_config, target_modules="text-encoder-attention")

    # --- the model --------------------------------------------------------------------------------------------
    def check_family(self) -> None:
        config = self.config
        what = f"{self.name} training ({type(self).__name__})"
        require_family(config.pretrained_model_name_or_path, (self.family,), what, self.family_hint, config.revision,
                       config.model_config)  # fmt: skip

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

    def tokenizers(self) -> list:
        """Tokenizers in the order of ``input_ids``, ``input_ids_2``, ..."""
        return [self.components.tokenizer]

    def setup(self, run: Run) -> None:
        config = self.config
        self.check_family()
        parts = self.components = self.load_components()
        if config.resolution is None:
            config.resolution = parts.native_resolution
        text_encoders = self.text_encoders()
        for model in (parts.vae, parts.unet, *text_encoders.values()):
            model.requires_grad_(False)
        weight_dtype = run.weight_dtype
        parts.vae.to(run.device, dtype=torch.float32 if weight_dtype == torch.float16 else weight_dtype)
        self.adapters = adapters_for(config)
        configs = self.adapter_configs()
        models = {"unet": parts.unet, **text_encoders}
        self.adapters.add({c: models[c] for c in configs}, configs)
        for model in models.values():
            model.to(run.device, dtype=weight_dtype)
        self.params = self.adapters.parameters()
        if config.enable_xformers_memory_efficient_attention:
            parts.unet.enable_xformers_memory_efficient_attention()
        if config.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            for component, model in text_encoders.items():
                if component in configs:
                    model.gradient_checkpointing_enable()

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {name: model for name, model in self.adapters.models.items()}

    def parameter_groups(self) -> list[dict]:
        return [{"params": self.params, "lr": self.config.learning_rate, "name": "adapter"}]

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
        for encoder in self.text_encoders().values():
            encoder.to("cpu")

    @contextlib.contextmanager
    def text_encoders_ready(self):
        """The text encoders on the training device while sampling, also when pre-computed embeddings keep them off
        it during training."""
        device = getattr(self, "_text_device", None)
        if self.text_table is None or device is None or device.type == "cpu":
            yield
            return
        for encoder in self.text_encoders().values():
            encoder.to(device)
        try:
            yield
        finally:
            for encoder in self.text_encoders().values():
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
        pixels = batch["pixel_values"].to(run.device, dtype=vae.dtype)
        with torch.no_grad():
            if self.latent_cache is None:
                return vae.encode(pixels).latent_dist
            rows = []
            for key, row in zip(map(tuple, batch["latent_key"].tolist()), pixels):
                if key not in self.latent_cache:
                    self.latent_cache[key] = vae.encode(row[None]).latent_dist.parameters[0]
                rows.append(self.latent_cache[key])
            return DiagonalGaussianDistribution(torch.stack(rows))  # (B, 2C, h, w): mean and log-variance

    def denoising_loss(self, batch: dict, run: Run, offset_noise: float = 0.0, prior_preservation: bool = False,
                       prior_loss_weight: float = 1.0):  # fmt: skip
        """Noise ``batch["pixel_values"]``'s latents at random timesteps and score the UNet's prediction of the
        scheduler's target (epsilon or v), conditioned on ``condition(batch)``."""
        parts, generator = self.components, run.noise_generator
        vae, scheduler = parts.vae, parts.noise_scheduler
        latents = self.latent_distribution(batch, run).sample(generator=generator)
        latents = (latents * vae.config.scaling_factor).to(run.weight_dtype)
        noise = sample_noise(latents, generator, offset_noise)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = run.module("unet", parts.unet)(noisy, timesteps, **self.condition(batch, run)).sample
        target = prediction_target(scheduler, latents, noise, timesteps)
        return dreambooth_loss(
            prediction, target, timesteps, scheduler, self.config.snr_gamma, prior_preservation, prior_loss_weight
        )

    # --- sampling -----------------------------------------------------------------------------------------------
    def pipeline_class(self):
        return FAMILIES[self.family].pipeline_class()

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
