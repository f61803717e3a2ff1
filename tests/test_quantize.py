"""``--base_quantization`` (ether_diffusion/quantize.py): ETHER layers over a quantised base weight compute what they
compute over that weight dequantised, a tiny DreamBooth run trains on an int8 base, and what cannot run is refused."""

import pytest
import torch
from conftest import dreambooth_config, randomize_adapters
from torch import nn

from ether_diffusion import EtherConfig, inject
from ether_diffusion.layers import is_quantized
from ether_diffusion.quantize import check_quantization, quantize_base
from ether_diffusion.registry import train
from ether_diffusion.training import ConfigError

pytest.importorskip("torchao")  # a dev dependency: present wherever the test suite is installed from the project


def dequantized(weight):
    return weight.get_original_weight() if hasattr(weight, "get_original_weight") else weight.dequantize()


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("method", ["ether", "ether_plus"])
def test_an_adapted_layer_over_a_quantised_weight_is_the_layer_over_its_dequantised_weight(kind, method):
    torch.manual_seed(0)
    quantised = nn.Sequential(nn.Linear(256, 256)).requires_grad_(False)  # 65,536 weights: a whole NF4 block
    assert quantize_base(quantised, kind) == 1 and is_quantized(quantised[0].weight)
    reference = nn.Sequential(nn.Linear(256, 256)).requires_grad_(False)
    reference[0].weight.copy_(dequantized(quantised[0].weight))
    reference[0].bias.copy_(quantised[0].bias)
    for model in (quantised, reference):
        inject(model, EtherConfig(method=method, n_blocks=4, target_modules=["0"]), "a")
        randomize_adapters(model, "a", seed=3)
    x = torch.randn(5, 256)
    outputs, grads = [], []
    for model in (quantised, reference):
        y = model(x)
        y.square().sum().backward()
        outputs.append(y.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        with torch.no_grad():  # sampling: the quantised layer has no merged copy to keep
            outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs[1], outputs[3], rtol=1e-4, atol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    with pytest.raises(RuntimeError, match="quantised base weight, which cannot hold a merged adapter"):
        quantised[0].merge()


def test_a_dreambooth_run_trains_on_an_int8_base(training_world, tmp_path):
    from safetensors.torch import load_file

    from ether_diffusion.export import export_adapters
    from ether_diffusion.models import load_pipeline

    result = train(dreambooth_config(training_world, tmp_path, base_quantization="int8", max_train_steps=3,
                                     validation_prompt="a sks star", validation_steps=3))  # fmt: skip
    assert result.global_step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    vectors = load_file(result.adapter_path)
    assert vectors and all(v.dtype == torch.float32 for v in vectors.values())  # the adapters train in float32
    # the saved adapter exports exactly against the unquantised model (the export loads it afresh)
    summary = export_adapters([result.adapter_path], tmp_path / "lora.safetensors",
                              load_pipeline(str(training_world / "model")), format="kohya")  # fmt: skip
    assert summary.max_relative_error < 1e-6


def test_the_int8_run_really_quantised_the_unet(training_world, tmp_path):
    from ether_diffusion.registry import task_for
    from ether_diffusion.training import Trainer

    task = task_for(dreambooth_config(training_world, tmp_path, base_quantization="int8", max_train_steps=1))
    Trainer(task).train()
    unet = task.backend.components.unet
    linears = [m for m in unet.modules() if type(m) is nn.Linear]
    assert linears and all(is_quantized(m.weight) for m in linears)


def test_what_cannot_run_is_refused_before_training(training_world, tmp_path, monkeypatch):
    assert check_quantization("none") is None and check_quantization("int8") is None
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="float8 needs a CUDA GPU with float8 support"):
            dreambooth_config(training_world, tmp_path, base_quantization="float8").validate()
    with pytest.raises(ConfigError, match="--cuda_graphs is not checked with a quantised base"):
        dreambooth_config(training_world, tmp_path, base_quantization="int8", cuda_graphs=True).validate()
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "torchao" else object())
    with pytest.raises(ConfigError, match=r"needs torchao \(pip install torchao"):
        dreambooth_config(training_world, tmp_path, base_quantization="nf4").validate()


def test_the_studio_estimate_counts_the_quantised_weights_as_stored(training_world, tmp_path):
    """The estimate runs the job's own configuration, so it trains on the quantised base; its weight memory counts
    what the int8 codes and scales take, not the original dtype's bytes."""
    from ether_diffusion.studio.estimate import measure

    common = dict(max_train_steps=1, validation_prompt="a sks star")
    plain = measure(dreambooth_config(training_world, tmp_path / "a", **common).validate())
    int8 = measure(dreambooth_config(training_world, tmp_path / "b", base_quantization="int8", **common).validate())
    assert int8.weights_bytes < plain.weights_bytes
    assert int8.trainable_parameters == plain.trainable_parameters
