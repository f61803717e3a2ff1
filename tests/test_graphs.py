"""``--cuda_graphs`` (training/graphs.py): what it refuses, on any machine, and on a CUDA GPU that the captured step
trains what the eager step trains. The capture itself needs CUDA; those tests skip elsewhere."""

import pytest
import torch
from conftest import dreambooth_config

from ether_diffusion.registry import train
from ether_diffusion.training import ConfigError
from ether_diffusion.training.dreambooth import DreamBoothConfig, DreamBoothTask
from ether_diffusion.training.graphs import CapturedStep, CaptureError, _restore_state, capturable_lr, copy_batch
from ether_diffusion.training.sdxl import StableDiffusionXLBackend

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="capturing a CUDA graph needs a CUDA GPU")


# --- refusals (any machine) ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, flag",
    [
        (dict(compile=True), "--compile"),
        (dict(gradient_accumulation_steps=2), "--gradient_accumulation_steps"),
        (dict(gradient_checkpointing=True), "--gradient_checkpointing"),
        (dict(use_8bit_adam=True), "--use_8bit_adam"),
        (dict(optimizer="Prodigy"), "--optimizer prodigy"),
        (dict(mixed_precision="fp16"), "--mixed_precision fp16"),
    ],
)
def test_flags_a_graph_cannot_hold_are_refused_by_name(changes, flag, monkeypatch):
    import sys
    import types

    for module in ("bitsandbytes", "prodigyopt"):  # the check is about the combination, not what is installed
        monkeypatch.setitem(sys.modules, module, sys.modules.get(module) or types.ModuleType(module))
    config = DreamBoothConfig(instance_data_dir="x", instance_prompt="a sks dog", cuda_graphs=True, **changes)
    with pytest.raises(ConfigError, match=f"--cuda_graphs cannot be used with {flag}: .*Drop one of the two"):
        config.validate()
    config = DreamBoothConfig(instance_data_dir="x", instance_prompt="a sks dog", cuda_graphs=False)
    config.validate()  # without the flag the same configuration's other checks pass


def test_tasks_and_features_that_are_not_captured_say_so(training_world, tmp_path):
    config = dreambooth_config(training_world, tmp_path, cuda_graphs=True).validate()
    from ether_diffusion.training.sd import StableDiffusionBackend

    assert DreamBoothTask(config, StableDiffusionBackend(config)).capture_refusal() is None
    sdxl = DreamBoothTask(config, StableDiffusionXLBackend(config))
    assert "sdxl model's step is not captured" in sdxl.capture_refusal()
    cached = dreambooth_config(training_world, tmp_path, cuda_graphs=True, cache_latents=True).validate()
    with pytest.raises(ConfigError, match="--cuda_graphs: --cache_latents looks each batch's latents up on the host"):
        train(cached)
    assert not any(tmp_path.iterdir())  # refused before anything was written

    from ether_diffusion.control.train import ControlTask

    assert "only DreamBooth on SD 1.x/2.x" in ControlTask.__new__(ControlTask).capture_refusal()


@pytest.mark.skipif(torch.cuda.is_available(), reason="--cuda_graphs is valid on this CUDA machine")
def test_cuda_graphs_on_a_cpu_is_refused_before_training(training_world, tmp_path):
    with pytest.raises(ConfigError, match="--cuda_graphs replays the training step as a CUDA graph and needs a CUDA"):
        train(dreambooth_config(training_world, tmp_path, cuda_graphs=True))
    assert not (tmp_path / "ether_adapter.safetensors").exists()


# --- the pieces that run on any device --------------------------------------------------------------------------


def test_a_batch_unlike_the_captured_one_is_refused_by_field():
    static = {"pixel_values": torch.zeros(2, 3, 8, 8), "input_ids": torch.zeros(2, 4, dtype=torch.long)}
    batch = {"pixel_values": torch.randn(2, 3, 8, 8), "input_ids": torch.arange(8).view(2, 4)}
    copy_batch(static, batch)
    assert torch.equal(static["pixel_values"], batch["pixel_values"])
    assert torch.equal(static["input_ids"], batch["input_ids"])
    with pytest.raises(CaptureError, match=r"'pixel_values' is \(1, 3, 8, 8\).*captured with \(2, 3, 8, 8\)"):
        copy_batch(static, {**batch, "pixel_values": torch.randn(1, 3, 8, 8)})
    with pytest.raises(CaptureError, match="'input_ids' is .*torch.int32.*torch.int64.*Drop --cuda_graphs"):
        copy_batch(static, {**batch, "input_ids": batch["input_ids"].int()})
    with pytest.raises(CaptureError, match="fields .*prompt_index.* captured with"):
        copy_batch(static, {**batch, "prompt_index": torch.zeros(2, dtype=torch.long)})


def test_the_schedule_fills_a_device_learning_rate_in_place():
    from diffusers.optimization import get_scheduler

    vector = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([{"params": [vector], "lr": 0.5}])
    capturable_lr(optimizer, torch.device("cpu"))
    rate = optimizer.param_groups[0]["lr"]
    assert isinstance(rate, torch.Tensor) and optimizer.param_groups[0]["initial_lr"] == 0.5
    schedule = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=4)
    for expected in (0.375, 0.25):
        vector.grad = torch.zeros(4)
        optimizer.step()
        schedule.step()
        assert optimizer.param_groups[0]["lr"] is rate  # the same tensor: what a captured step reads
        assert rate.item() == pytest.approx(expected)
    capturable_lr(optimizer, torch.device("cpu"))  # again (after a resume): nothing changes
    assert optimizer.param_groups[0]["lr"] is rate and optimizer.param_groups[0]["initial_lr"] == 0.5


def test_warm_up_steps_are_undone_in_the_optimizer():
    vector = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([vector], lr=0.1)
    saved = {}  # a fresh run: no state before the warm-up
    vector.grad = torch.ones(3)
    optimizer.step()
    _restore_state(optimizer, saved)
    state = optimizer.state[vector]
    assert all(not value.any() for value in state.values())  # back to AdamW's zeros, in place
    vector.grad = torch.ones(3)
    optimizer.step()
    before = {vector: {k: v.clone() for k, v in optimizer.state[vector].items()}}
    optimizer.step()  # a resumed run: its loaded state comes back
    _restore_state(optimizer, before)
    for key, value in optimizer.state[vector].items():
        assert torch.equal(value, before[vector][key]), key


# --- the capture (CUDA) ------------------------------------------------------------------------------------------


@cuda
def test_a_captured_step_trains_what_the_eager_step_trains():
    def run(captured: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).cuda()
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-2, capturable=captured, foreach=True)
        if captured:
            capturable_lr(optimizer, torch.device("cuda"))
        generator = torch.Generator("cuda").manual_seed(0)

        def body(batch):
            noise = torch.randn(batch["x"].shape, generator=generator, device="cuda")
            loss = (model(batch["x"] + noise) - batch["x"]).pow(2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            return {"loss": loss.detach()}

        step = CapturedStep(body, optimizer, params, [generator]) if captured else None
        data = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(8):
            batch = {"x": torch.randn(4, 16, generator=data).cuda()}
            if step is None:
                parts = body(batch)
                optimizer.zero_grad(set_to_none=True)
            else:
                parts = step(batch)
            losses.append(float(parts["loss"]))
        return [p.detach().cpu() for p in params], losses

    eager, eager_losses = run(False)
    captured, captured_losses = run(True)
    assert captured_losses == pytest.approx(eager_losses, rel=1e-4)
    for a, b in zip(eager, captured):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@cuda
def test_captured_dreambooth_trains_the_eager_adapter(training_world, tmp_path):
    from ether_diffusion.io import read_adapter_file

    files = {}
    for name, graphs in (("eager", False), ("captured", True)):
        config = dreambooth_config(training_world, tmp_path / name, max_train_steps=12, train_batch_size=2,
                                   cuda_graphs=graphs, validation_prompt="a sks star", validation_steps=6)  # fmt: skip
        result = train(config)
        assert result.global_step == 12
        files[name] = read_adapter_file(tmp_path / name / "ether_adapter.safetensors").tensors
    for key, value in files["eager"].items():
        torch.testing.assert_close(files["captured"][key], value, rtol=1e-3, atol=1e-5)
