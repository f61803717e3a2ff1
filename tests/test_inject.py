"""Inject / eject on any nn.Module, trainable parameters, named adapters, parameter counts."""

import pytest
import torch
from conftest import assert_model_unchanged, model_record, randomize_adapters
from torch import nn
from torch.testing import assert_close

from ether_diffusion import (
    EtherConfig,
    adapter_names,
    adapter_parameters,
    count_parameters,
    delete_adapter,
    eject,
    inject,
    mark_only_adapters_trainable,
    merge_adapters,
    mixed_batch,
    set_active_adapters,
    unmerge_adapters,
)
from ether_diffusion.layers import EtherLayer

MLP_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["ether", "ether_plus"])
def test_inject_eject_round_trip_on_mlp(mlp, method):
    modules = dict(mlp.named_modules())
    state = snapshot(mlp)
    x = torch.randn(4, 16)
    base_out = mlp(x)

    paths = inject(mlp, EtherConfig(method=method, n_blocks=2, target_modules=MLP_TARGETS))
    assert paths == ["to_q", "to_k", "block.to_v", "block.to_out.0"]
    assert all(isinstance(mlp.get_submodule(p), EtherLayer) for p in paths)
    randomize_adapters(mlp)
    assert not torch.allclose(mlp(x), base_out, atol=1e-4)

    assert eject(mlp) == paths
    assert dict(mlp.named_modules()).keys() == modules.keys()
    assert all(mlp.get_submodule(name) is module for name, module in modules.items())
    after = mlp.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(mlp(x), base_out)


def test_inject_eject_round_trip_on_tiny_unet(tiny_unet):
    state = snapshot(tiny_unet)
    sample, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 6, 32)
    with torch.no_grad():
        base_out = tiny_unet(sample, t, context).sample
        paths = inject(tiny_unet, EtherConfig(method="ether_plus", n_blocks=4))
        # q/k/v/out of self- and cross-attention in 4 transformer blocks (down 1, mid 1, up 2)
        assert len(paths) == 4 * 2 * 4 and all(p.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0"} for p in paths)
        assert_close(tiny_unet(sample, t, context).sample, base_out)  # ETHER+ starts at the identity
        randomize_adapters(tiny_unet)
        assert not torch.allclose(tiny_unet(sample, t, context).sample, base_out, atol=1e-4)
        eject(tiny_unet)
        assert snapshot(tiny_unet).keys() == state.keys()
        assert torch.equal(tiny_unet(sample, t, context).sample, base_out)


def test_only_adapter_vectors_are_trainable_found_by_structure(mlp):
    inject(mlp, EtherConfig(method="ether_plus", target_modules=MLP_TARGETS))
    params = mark_only_adapters_trainable(mlp)
    trainable = {id(p) for p in mlp.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params} == {id(p) for p in adapter_parameters(mlp)}
    # the base layer called "ether_lookalike" stays frozen
    assert not mlp.ether_lookalike.weight.requires_grad
    # ETHER+ two-sided: u, v on both sides of 4 layers
    widths = [(16, 16), (16, 32), (32, 16), (16, 8)]
    assert count_parameters(mlp) == sum(2 * i + 2 * o for i, o in widths)
    loss = mlp(torch.randn(3, 16)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in params)


@pytest.mark.parametrize(
    "config, expected",
    [
        (EtherConfig(method="ether"), 99_456),
        (EtherConfig(method="ether_plus"), 398_592),
        (EtherConfig(method="ether_plus", sides=("input",)), 198_912),
        (EtherConfig(method="ether", n_blocks=16), 99_456),
    ],
)
def test_parameter_counts_on_the_sd15_unet(config, expected):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the SD-1.5 architecture without allocating its 860M weights
        unet = UNet2DConditionModel(cross_attention_dim=768)
    paths = inject(unet, config)
    assert len(paths) == 128
    assert count_parameters(unet) == expected


def test_indivisible_width_names_the_layer_and_leaves_the_model_alone(mlp):
    state = snapshot(mlp)
    with pytest.raises(ValueError, match=r"n_blocks=3 does not divide the input width 16 of 'to_q'.*1, 2, 4, 8, 16"):
        inject(mlp, EtherConfig(method="ether", n_blocks=3, target_modules=MLP_TARGETS))
    assert not any(isinstance(m, EtherLayer) for m in mlp.modules())
    assert snapshot(mlp).keys() == state.keys()


def test_targets_and_exclusions(mlp):
    with pytest.raises(ValueError, match="no module"):
        inject(mlp, EtherConfig(target_modules=["nothing_here"]))
    paths = inject(mlp, EtherConfig(target_modules=MLP_TARGETS, exclude_modules=["block"]))
    assert paths == ["to_q", "to_k"]
    with pytest.raises(ValueError, match="invalid adapter name"):
        inject(mlp, EtherConfig(target_modules=MLP_TARGETS), adapter_name="../evil")


def test_several_named_adapters(mlp):
    x = torch.randn(2, 16)
    base_out = mlp(x)
    inject(mlp, EtherConfig(method="ether", target_modules=MLP_TARGETS), "a")
    inject(mlp, EtherConfig(method="ether_plus", target_modules=["to_q"]), "b")
    randomize_adapters(mlp, "b")
    assert adapter_names(mlp) == ["a", "b"]
    with pytest.raises(ValueError, match="already has an adapter"):
        inject(mlp, EtherConfig(target_modules=["to_q"]), "b")

    outputs = {}
    for active in (["a"], ["b"], ["a", "b"], ["b", "a"]):
        set_active_adapters(mlp, active)
        outputs[tuple(active)] = mlp(x)
    assert not torch.allclose(outputs[("a",)], outputs[("b",)])
    assert not torch.allclose(outputs[("a", "b")], outputs[("b", "a")])  # reflections do not commute

    set_active_adapters(mlp, ["a", "b"])
    merge_adapters(mlp)
    assert_close(mlp(x), outputs[("a", "b")])
    unmerge_adapters(mlp)

    with pytest.raises(KeyError, match="unknown adapters"):
        set_active_adapters(mlp, ["c"])
    delete_adapter(mlp, "b")
    assert adapter_names(mlp) == ["a"]
    set_active_adapters(mlp, ["a"])
    assert_close(mlp(x), outputs[("a",)])
    delete_adapter(mlp, "a")  # the last adapter: the model is back to its own modules
    assert not any(isinstance(m, EtherLayer) for m in mlp.modules())
    assert torch.equal(mlp(x), base_out)  # unmerge restored the stored weights bit for bit


def test_mixed_batch_on_a_model(tiny_unet):
    inject(tiny_unet, EtherConfig(method="ether", n_blocks=2), "a")
    inject(tiny_unet, EtherConfig(method="ether_plus", n_blocks=4), "b")
    randomize_adapters(tiny_unet)
    sample, context = torch.randn(3, 4, 8, 8), torch.randn(3, 6, 32)
    t = torch.tensor([5, 300, 900])
    assignment = ["b", None, "a"]
    with torch.no_grad():
        expected = []
        for i, name in enumerate(assignment):
            set_active_adapters(tiny_unet, [] if name is None else [name])
            expected.append(tiny_unet(sample[i : i + 1], t[i : i + 1], context[i : i + 1]).sample)
        with mixed_batch(tiny_unet, assignment):
            mixed = tiny_unet(sample, t, context).sample
    assert_close(mixed, torch.cat(expected), rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyError, match="unknown adapters"), mixed_batch(tiny_unet, ["a", "zzz"]):
        pass


def test_unsupported_layer_is_refused_before_anything_changes(mlp):
    mlp.block["to_out"].append(nn.Conv2d(8, 8, 3, padding=1))  # block.to_out.1, a 3×3 convolution
    before = model_record(mlp)
    with pytest.raises(ValueError, match=r"'block.to_out.1' \(a 3×3 convolution; ETHER adapts only 1×1"):
        inject(mlp, EtherConfig(method="ether", target_modules=["to_q", "to_k", "to_out.1"]))
    assert_model_unchanged(mlp, before)


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "with-another-adapter"])
@pytest.mark.parametrize("fail_at", [1, 3, 4])
def test_inject_failing_half_way_restores_the_model(mlp, monkeypatch, existing, fail_at):
    """Whatever fails after the checks (here: memory, at the n-th layer) leaves the model exactly as it was."""
    if existing:
        inject(mlp, EtherConfig(method="ether_plus", target_modules=["to_q", "to_v"]), "old")
        randomize_adapters(mlp)
        set_active_adapters(mlp, ["old"], 0.5)
    before = model_record(mlp)
    calls = []
    add_adapter = EtherLayer.add_adapter

    def add_adapter_or_fail(self, *args, **kwargs):
        calls.append(self.layer_name)
        if len(calls) == fail_at:
            raise MemoryError("simulated: out of memory")
        return add_adapter(self, *args, **kwargs)

    monkeypatch.setattr(EtherLayer, "add_adapter", add_adapter_or_fail)
    with pytest.raises(MemoryError):
        inject(mlp, EtherConfig(method="ether", target_modules=MLP_TARGETS), "new")
    assert len(calls) == fail_at
    assert_model_unchanged(mlp, before)


def test_targeting_resnet_convolutions_is_a_clear_value_error(tiny_unet):
    """``--target_modules conv1``: a ValueError naming the layers and what to do (it was a TypeError)."""
    before = model_record(tiny_unet)
    with pytest.raises(ValueError) as info:
        inject(tiny_unet, EtherConfig(method="ether", target_modules=["conv1"]))
    message = str(info.value)
    assert "matches 8 layer(s) ETHER cannot adapt: 'down_blocks.0.resnets.0.conv1' (a 3×3 convolution" in message
    presets = message.split("Narrow target_modules (presets: ")[1].split(")")[0].split(", ")
    assert {"unet-attention", "text-encoder-attention", "sd3-attention", "flux-attention"} <= set(presets)
    assert "or add those layers to exclude_modules" in message
    assert_model_unchanged(tiny_unet, before)
    with pytest.raises(ValueError, match=r"'mid_block.attentions.0.transformer_blocks.0.attn1' \(a module of type Att"):
        inject(tiny_unet, EtherConfig(method="ether", target_modules=["attn1"], exclude_modules=["down_blocks"]))
