"""Wrappers: merge/unmerge exactness, strengths, dtypes, conv layers, mixed batches."""

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from ether_diffusion.config import EtherConfig
from ether_diffusion.layers import EtherConv2d, EtherLinear

CONFIGS = [
    EtherConfig(method="ether", n_blocks=1),
    EtherConfig(method="ether", n_blocks=4, sides=("input", "output")),
    EtherConfig(method="ether_plus", n_blocks=2),
    EtherConfig(method="ether_plus", n_blocks=4, sides=("input",)),
]


def make_layer(kind="linear", config=None, names=("a",), seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(16, 8) if kind == "linear" else nn.Conv2d(16, 8, 1)
    layer = (EtherLinear if kind == "linear" else EtherConv2d)(base, "blocks.0.to_q")
    for i, name in enumerate(names):
        adapter = layer.add_adapter(name, config or CONFIGS[0])
        generator = torch.Generator().manual_seed(seed + 10 + i)
        with torch.no_grad():
            for p in adapter.parameters():
                p.normal_(generator=generator)
    layer.set_active(list(names))
    return layer


def sample_input(kind, batch=3):
    torch.manual_seed(1)
    return torch.randn(batch, 5, 16) if kind == "linear" else torch.randn(batch, 16, 4, 4)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-n{c.n_blocks}-{'+'.join(c.sides)}")
def test_merge_matches_forward_and_unmerge_restores(kind, config):
    layer = make_layer(kind, config, names=("a", "b"))
    x = sample_input(kind)
    original = layer.base_layer.weight.detach().clone()
    unmerged_out = layer(x)
    assert not torch.allclose(unmerged_out, layer.base_layer(x), atol=1e-3)

    layer.merge()
    assert layer.merged_adapters == ["a", "b"]
    assert_close(layer(x), unmerged_out)
    merged_weight = layer.base_layer.weight.detach().clone()
    layer.merge()  # merging again is a no-op
    assert torch.equal(layer.base_layer.weight, merged_weight)

    layer.unmerge()
    assert layer.merged_adapters == []
    assert_close(layer.base_layer.weight, original)
    assert_close(layer(x), unmerged_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-n{c.n_blocks}-{'+'.join(c.sides)}")
def test_ten_merge_unmerge_cycles_leave_the_weight_bit_identical(config, dtype):
    layer = make_layer(config=config, names=("a", "b")).to(dtype)
    original = layer.base_layer.weight.detach().clone()
    for strengths in ([1.0, 1.0], [0.7, 1.0]):  # the published method and a blend
        layer.set_active(["a", "b"], strengths)
        for _ in range(10):
            layer.merge()
            assert not torch.equal(layer.base_layer.weight, original)
            layer.unmerge()
            assert torch.equal(layer.base_layer.weight, original)  # a stored copy, not the reflection re-applied
    assert layer._weight_before_merge is None  # the copy lives only while merged


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    layer = make_layer()
    with torch.no_grad():
        layer.ether_adapters["a"].ether_u[0, 0] = float("inf")
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)
    assert layer.merged_adapters == []


def test_merged_layer_refuses_to_switch_adapters():
    layer = make_layer(names=("a", "b"))
    layer.merge(["a"])
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.merge(["b"])
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_active(["b"])


@pytest.mark.parametrize("method", ["ether", "ether_plus"])
def test_strength_zero_is_the_base_layer_and_one_the_method(method):
    layer = make_layer(config=EtherConfig(method=method, sides=("input",)))
    x = sample_input("linear")
    full = layer(x)
    layer.set_active(["a"], [0.0])
    assert_close(layer(x), layer.base_layer(x))
    layer.set_active(["a"], [0.5])
    half = layer(x)
    assert not torch.allclose(half, full) and not torch.allclose(half, layer.base_layer(x))
    # one-sided H(s) is linear in s for both methods: the half-strength output is the average
    assert_close(half, (full + layer.base_layer(x)) / 2)


def test_disabled_layer_is_the_base_layer():
    layer = make_layer()
    x = sample_input("linear")
    layer.adapters_enabled = False
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_keeps_dtype_and_device(dtype):
    base = nn.Linear(16, 8).to(dtype)
    layer = EtherLinear(base, "x")
    adapter = layer.add_adapter("a", EtherConfig(method="ether_plus", n_blocks=2))
    layer.set_active(["a"])
    assert all(p.dtype == dtype for p in adapter.parameters())
    x = torch.randn(2, 16, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype
    assert_close(out, base(x))  # ETHER+ at init
    assert layer.base_layer is base


def test_only_pointwise_convolutions_are_wrapped():
    with pytest.raises(ValueError, match="'conv_in' is a 3×3 convolution; ETHER adapts only 1×1"):
        EtherConv2d(nn.Conv2d(8, 8, 3, padding=1), "conv_in")


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_mixed_batch_equals_one_adapter_at_a_time(kind):
    # adapters with different methods, block counts and sides share one batch
    torch.manual_seed(0)
    base = nn.Linear(16, 8) if kind == "linear" else nn.Conv2d(16, 8, 1)
    layer = (EtherLinear if kind == "linear" else EtherConv2d)(base, "x")
    for name, config in zip("abc", CONFIGS[1:]):
        adapter = layer.add_adapter(name, config)
        with torch.no_grad():
            for p in adapter.parameters():
                p.normal_()
    layer.set_active(["a"], [1.0])
    layer.strengths["c"] = 0.7
    assignment = ["a", None, "c", "b", "a"]
    x = sample_input(kind, batch=5)

    expected = []
    for i, name in enumerate(assignment):
        layer.set_active([] if name is None else [name], None if name is None else [layer.strengths[name]])
        expected.append(layer(x[i : i + 1]))
    expected = torch.cat(expected)

    slots = list(dict.fromkeys(assignment))
    layer.set_mixed_batch(slots, torch.tensor([slots.index(n) for n in assignment]))
    assert_close(layer(x), expected)
    # classifier-free guidance doubles the batch: [uncond, cond] both follow the assignment
    assert_close(layer(torch.cat([x, x])), torch.cat([expected, expected]))
    with pytest.raises(ValueError, match="does not match"):
        layer(x[:4])
    layer.set_mixed_batch(None)


def test_mixed_batch_reuses_its_gathered_factors_only_while_nothing_changes():
    torch.manual_seed(0)
    layer = EtherLinear(nn.Linear(16, 8), "x")
    for name in "ab":
        with torch.no_grad():
            for p in layer.add_adapter(name, CONFIGS[2]).parameters():
                p.normal_()
    x = torch.randn(2, 3, 16)

    def one_by_one():
        outs = []
        for i, name in enumerate("ab"):
            layer.set_mixed_batch(None)
            layer.set_active([name], [layer.strengths[name]])
            outs.append(layer(x[i : i + 1]))
        return torch.cat(outs)

    with torch.no_grad():
        layer.set_mixed_batch(["a", "b"], torch.tensor([0, 1]))
        first = layer(x)
        gathered = layer._mixed.gathered["input"].factors
        assert layer(x) is not first and layer._mixed.gathered["input"].factors is gathered  # steps reuse the gather
        layer(torch.cat([x, x]))  # classifier-free guidance doubles the batch: gathered again for two copies
        assert layer._mixed.gathered["input"].repeat == 2 and layer._mixed.gathered["input"].factors[0].shape[0] == 4
        gathered = layer._mixed.gathered["input"].factors
        layer.ether_adapters["b"].ether_u.add_(1.0)  # a vector changes between steps
        changed = layer(torch.cat([x, x]))[:2]
        assert layer._mixed.gathered["input"].factors is not gathered
        layer.strengths["a"] = 0.5  # so does a strength
        halved = layer(x)
        expected = one_by_one()
    assert_close(halved, expected)
    assert not torch.allclose(changed, first)


def _new_values(layer, seed=5):
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) for k, v in layer.ether_adapters.state_dict().items()}


def _via_data_copy(layer, new):
    for key, param in layer.ether_adapters.named_parameters():
        param.data.copy_(new[key])  # .data has its own version counter: the parameter's does not move


def _via_data_assignment(layer, new):
    for key, param in layer.ether_adapters.named_parameters():
        param.data = new[key].clone()


def _via_load_state_dict(layer, new):
    layer.ether_adapters.load_state_dict(new)


def _via_load_state_dict_assign(layer, new):
    layer.ether_adapters.load_state_dict(new, assign=True)


def _via_ema_copy_to(layer, new):
    from diffusers.training_utils import EMAModel

    params = list(layer.ether_adapters.parameters())
    ema = EMAModel(params)
    for shadow, key in zip(ema.shadow_params, layer.ether_adapters.state_dict()):
        shadow.copy_(new[key])
    ema.copy_to(params)  # diffusers writes param.data.copy_(...)


def _via_numpy_view(layer, new):
    for key, param in layer.ether_adapters.named_parameters():
        param.detach().numpy()[...] = new[key].numpy()


@pytest.mark.parametrize(
    "change",
    [_via_data_copy, _via_data_assignment, _via_load_state_dict, _via_load_state_dict_assign, _via_ema_copy_to]
    + [_via_numpy_view],
    ids=lambda f: f.__name__[5:],
)
@pytest.mark.parametrize("method", ["ether", "ether_plus"])
def test_cached_factors_follow_every_way_a_vector_changes(change, method):
    layer = make_layer(config=EtherConfig(method=method, n_blocks=2, sides=("input", "output")))
    x = sample_input("linear")
    with torch.no_grad():
        before = layer(x)  # fills the inference cache
        assert torch.equal(layer(x), before)
        change(layer, _new_values(layer))
        after = layer(x)
        fresh = copy.deepcopy(layer)(x)  # a copy keeps no cache: made anew from the vectors as they are now
    assert not torch.allclose(after, before, atol=1e-3)
    assert_close(after, fresh, rtol=0, atol=0)
    assert_close(after, layer(x).detach(), rtol=1e-5, atol=1e-6)  # with autograd: the training path, no cache


def test_cached_factors_follow_a_dtype_change():
    layer = make_layer(config=EtherConfig(method="ether_plus", n_blocks=2))
    layer.merged_cache = False  # the factors' cache; the merged weight's dtype is tested below
    x = sample_input("linear")
    with torch.no_grad():
        layer(x)
        layer.to(torch.float64)  # Module._apply assigns .data: same parameter objects, same version counters
        after = layer(x.double())
        assert layer.ether_adapters["a"]._cache.factors.input[0].dtype == torch.float64
    assert_close(after, layer(x.double()).detach(), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_merged_weight_is_reused_while_nothing_changes(kind):
    """Sampling on the CPU runs the base layer's one product with ``T̃ W T``: the same layer as the transforms on
    the activations, kept while nothing changes, made again for a new strength or dtype."""
    layer = make_layer(kind, EtherConfig(method="ether_plus", n_blocks=2, sides=("input", "output")))
    x = sample_input(kind)
    with torch.no_grad():
        y = layer(x)
        merged = layer._merged.weight
        layer(x)
        assert layer._merged.weight is merged
        layer.merged_cache = False  # the transforms on the activations (what GPUs and several adapters run)
        assert_close(layer(x), y, rtol=1e-5, atol=1e-6)
        layer.merged_cache = True
        layer.set_active(["a"], [0.5])
        half = layer(x)
        assert layer._merged.weight is not merged  # a new strength
        layer.merged_cache = False
        assert_close(layer(x), half, rtol=1e-5, atol=1e-6)
        layer.merged_cache = True
        layer.to(torch.float64)
        assert_close(layer(x.double()), half.double(), rtol=1e-5, atol=1e-6)
        assert layer._merged.weight.dtype == torch.float64


def test_cache_is_reused_while_nothing_changes():
    layer = make_layer(config=EtherConfig(method="ether_plus", n_blocks=2))
    layer.merged_cache = False  # the factors' cache (what mixed batches and several active adapters use)
    x = sample_input("linear")
    adapter = layer.ether_adapters["a"]
    with torch.no_grad():
        layer(x)
        factors = adapter._cache.factors
        layer(x)
        assert adapter._cache.factors is factors  # same tensors: mixed batches key their gathers on them
        layer.set_active(["a"], [0.5])
        layer(x)
        assert adapter._cache.factors is not factors  # a new strength
