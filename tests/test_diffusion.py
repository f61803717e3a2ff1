"""Training targets and loss weights for epsilon and v-prediction (SD 2.x) models, against diffusers' formulas, and a
tiny v-prediction model trained end to end with min-SNR weighting and prior preservation."""

import numpy as np
import pytest
import torch
from conftest import build_tiny_components
from PIL import Image
from torch.testing import assert_close

from ether_diffusion.registry import train
from ether_diffusion.training import sd as sd_module
from ether_diffusion.training.diffusion import compute_snr, dreambooth_loss, prediction_target
from ether_diffusion.training.dreambooth import DreamBoothConfig


def scheduler(prediction_type):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type)  # fmt: skip


def by_hand(sched, timesteps):
    """√ᾱ_t, √(1 − ᾱ_t) and snr_t = ᾱ_t / (1 − ᾱ_t), shaped to broadcast over (B, C, H, W)."""
    alpha_bar = sched.alphas_cumprod.double()[timesteps]
    return alpha_bar.sqrt().view(-1, 1, 1, 1), (1 - alpha_bar).sqrt().view(-1, 1, 1, 1), alpha_bar / (1 - alpha_bar)


def test_the_target_follows_the_prediction_type():
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 10, 500, 999])
    assert prediction_target(scheduler("epsilon"), latents, noise, timesteps) is noise
    v_sched = scheduler("v_prediction")
    target = prediction_target(v_sched, latents, noise, timesteps)
    assert torch.equal(target, v_sched.get_velocity(latents, noise, timesteps))  # diffusers' own
    a, s, _ = by_hand(v_sched, timesteps)
    velocity = a * noise.double() - s * latents.double()  # v = √ᾱ ε − √(1−ᾱ) x₀
    assert_close(target.double(), velocity, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="'sample'.*supports 'epsilon' and 'v_prediction'"):
        prediction_target(scheduler("sample"), latents, noise, timesteps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("prior", [False, True])
def test_min_snr_weights_and_prior_preservation(prediction_type, prior):
    sched = scheduler(prediction_type)
    generator = torch.Generator().manual_seed(1)
    prediction, target = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([3, 200, 600, 990])  # snr from ~1e3 (clipped at γ) to ~5e-3
    gamma, weight_of_prior = 5.0, 0.7
    loss, parts = dreambooth_loss(prediction, target, timesteps, sched, gamma, prior, weight_of_prior)
    _, _, snr = by_hand(sched, timesteps)
    assert_close(compute_snr(sched, timesteps).double(), snr, rtol=1e-6, atol=0)
    # diffusers: min(snr, γ) / snr for epsilon, min(snr, γ) / (snr + 1) for v
    weight = snr.clamp(max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    per_sample = ((prediction - target).double() ** 2).mean(dim=(1, 2, 3)) * weight
    if prior:  # the batch is [instance; class]
        expected = per_sample[:2].mean() + weight_of_prior * per_sample[2:].mean()
        assert_close(parts["instance_loss"].double(), per_sample[:2].mean(), rtol=1e-6, atol=0)
        assert_close(parts["prior_loss"].double(), per_sample[2:].mean(), rtol=1e-6, atol=0)
    else:
        expected = per_sample.mean()
    assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    # on the same errors the v weights are below the epsilon ones at every step (snr + 1 > snr)
    losses = {kind: dreambooth_loss(prediction, target, timesteps, scheduler(kind), gamma, prior, weight_of_prior)[0]
              for kind in ("epsilon", "v_prediction")}  # fmt: skip
    assert losses["v_prediction"] < losses["epsilon"]


@pytest.mark.slow
def test_training_a_v_prediction_model(tmp_path, monkeypatch):
    """A tiny SD 2.x-style v-prediction model saved to disk trains on the velocity target with v's min-SNR weights and
    prior preservation; the loss the loop reports is the one computed from diffusers' get_velocity by hand."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    (tmp_path / "tokenizer").mkdir()
    components = build_tiny_components(tmp_path / "tokenizer", prediction_type="v_prediction")
    StableDiffusionPipeline(**components).save_pretrained(tmp_path / "model")
    instance = tmp_path / "instance"
    instance.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(instance / f"{i}.png")

    seen = []
    real_target, real_loss = sd_module.prediction_target, sd_module.dreambooth_loss

    def record_target(sched, latents, noise, timesteps):
        target = real_target(sched, latents, noise, timesteps)
        kept = {"latents": latents, "noise": noise, "timesteps": timesteps, "target": target}
        seen.append({"type": sched.config.prediction_type, **{k: v.detach().clone() for k, v in kept.items()}})
        return target

    def record_loss(prediction, target, *args):
        loss, parts = real_loss(prediction, target, *args)
        seen[-1].update(prediction=prediction.detach().clone(), loss=float(loss.detach()), parts=parts)
        return loss, parts

    monkeypatch.setattr(sd_module, "prediction_target", record_target)
    monkeypatch.setattr(sd_module, "dreambooth_loss", record_loss)
    config = DreamBoothConfig(
        pretrained_model_name_or_path=str(tmp_path / "model"), instance_data_dir=str(instance),
        instance_prompt="a sks star", output_dir=str(tmp_path / "out"), max_train_steps=3, snr_gamma=5.0,
        with_prior_preservation=True, class_prompt="a star", num_class_images=2, prior_loss_weight=0.5,
        validation_prompt="a sks star", validation_inference_steps=2, num_validation_images=1, report_to="none",
        quiet=True,
    )  # fmt: skip
    result = train(config)
    assert len(seen) == 3 and result.global_step == 3
    sched = DDPMScheduler.from_pretrained(tmp_path / "model", subfolder="scheduler")  # what is on disk
    assert sched.config.prediction_type == "v_prediction"
    for step, record in enumerate(seen):
        assert record["type"] == "v_prediction" and record["latents"].shape[0] == 2  # [instance; class]
        a, s, snr = by_hand(sched, record["timesteps"])
        velocity = a * record["noise"].double() - s * record["latents"].double()
        assert_close(record["target"].double(), velocity, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(record["target"], record["noise"])
        error = ((record["prediction"] - record["target"]).double() ** 2).mean(dim=(1, 2, 3))
        weighted = error * snr.clamp(max=5.0) / (snr + 1)
        expected = weighted[0] + 0.5 * weighted[1]
        assert record["loss"] == pytest.approx(float(expected), rel=1e-5)
        assert result.losses[step] == pytest.approx(record["loss"], rel=1e-6)
    assert (tmp_path / "out" / "samples.png").is_file()  # the v model samples with the saved file reloaded
