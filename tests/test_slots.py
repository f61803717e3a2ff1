"""Slots: one training forward through several adapters of one layout (``ether_diffusion/slots.py``)."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from ether_diffusion.config import EtherConfig
from ether_diffusion.layers import EtherConv2d, EtherLinear
from ether_diffusion.slots import SlotPlan, SlotRoute, check_same_layout

LAYOUTS = [
    EtherConfig(method="ether", n_blocks=1),
    EtherConfig(method="ether", n_blocks=4, sides=("input", "output")),
    EtherConfig(method="ether_plus", n_blocks=2),  # two-sided by default
    EtherConfig(method="ether_plus", n_blocks=1, sides=("output",)),
]


def slotted_layer(kind, config, slots, dtype=torch.float64):
    torch.manual_seed(0)
    base = nn.Linear(16, 8) if kind == "linear" else nn.Conv2d(16, 8, 1)
    layer = (EtherLinear if kind == "linear" else EtherConv2d)(base.to(dtype), "blocks.0.to_q")
    for k in range(slots):
        adapter = layer.add_adapter(f"s{k}", config)
        with torch.no_grad():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + k)))
                p.requires_grad_(True)
    return layer


def inputs(kind, batch, dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    shape = (batch, 5, 16) if kind == "linear" else (batch, 16, 3, 3)
    return torch.randn(shape, generator=generator, dtype=dtype)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("config", LAYOUTS, ids=lambda c: f"{c.method}-n{c.n_blocks}-{'+'.join(c.sides)}")
@pytest.mark.parametrize("counts", [[2, 2, 2], [1, 3, 2], [3]])
@pytest.mark.parametrize("planned", [False, True], ids=["own-rows", "plan"])
def test_each_sample_runs_through_its_slots_adapter_with_its_gradients(kind, config, counts, planned):
    # equal groups take the view path, unequal ones the gathered rows; both equal one adapter at a time, and so do
    # the gradients of every slot's vectors (the sum of its own samples' contributions); with a plan, the rows made
    # in one batch for every layer give the same
    layer = slotted_layer(kind, config, len(counts))
    names = [f"s{k}" for k in range(len(counts))]
    x = inputs(kind, sum(counts))
    weights = torch.randn_like(layer.base_layer(x))

    expected, start = [], 0
    for name, count in zip(names, counts):
        layer.set_active([name])
        expected.append(layer(x[start : start + count]))
        start += count
    expected = torch.cat(expected)
    (expected * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad(set_to_none=True)

    route = SlotRoute(names)
    route.assign(counts, x.device)
    layer.route_slots(route)
    if planned:
        route.plan = SlotPlan([layer], names)
        route.plan.prepare()
        assert all(route.plan.rows_of(layer, side, names) is not None for side in config.sides)
    out = layer(x)
    assert_close(out, expected)
    (out * weights).sum().backward()
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, grads[name], msg=name)
    layer.route_slots(None)


@pytest.mark.parametrize("config", LAYOUTS[1:3], ids=["ether-two-sided", "ether_plus"])
def test_the_slots_backward_passes_float64_gradcheck(config):
    layer = slotted_layer("linear", config, 2)
    route = SlotRoute(["s0", "s1"])
    route.assign([1, 2], "cpu")
    layer.route_slots(route)
    vectors = [p for p in layer.parameters() if p.requires_grad]
    x = inputs("linear", 3).requires_grad_(True)
    # gradcheck perturbs the vectors themselves in place: the layer reads them on every call
    assert torch.autograd.gradcheck(lambda x, *v: layer(x), (x, *vectors))


def test_a_plan_batches_every_layer_and_never_serves_stale_rows():
    """Two layers of different widths in one plan (a group per vector shape): their outputs are those of rows made
    per layer; a vector written in place after ``prepare`` (an optimizer step, an EMA copy) makes that layer build
    its own rows from the new values; another route's names are not served."""
    config = EtherConfig(method="ether_plus", n_blocks=2)
    layers = [slotted_layer("linear", config, 2)]
    torch.manual_seed(3)
    wide = EtherLinear(nn.Linear(32, 16).double(), "blocks.1.to_k")
    for k in range(2):
        adapter = wide.add_adapter(f"s{k}", config)
        with torch.no_grad():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, dtype=p.dtype))
    layers.append(wide)
    names = ["s0", "s1"]
    xs = [inputs("linear", 4), torch.randn(4, 5, 32, dtype=torch.float64)]
    route = SlotRoute(names)
    route.assign([2, 2], "cpu")
    for layer in layers:
        layer.route_slots(route)
    alone = [layer(x) for layer, x in zip(layers, xs)]
    route.plan = SlotPlan(layers, names)
    # vectors (n=2, b): 16→8 gives b = 8 in, 4 out; 32→16 gives 16 in, 8 out: three shapes, the b = 8 group shared
    assert sorted(key[0] for key in route.plan.groups) == [(2, 4), (2, 8), (2, 16)]
    route.plan.prepare()
    for layer, x, expected in zip(layers, xs, alone):
        assert_close(layer(x), expected)
    vector = next(p for n, p in wide.named_parameters() if "s1" in n)
    with torch.no_grad():
        vector.mul_(-2.0).add_(0.5)
    assert route.plan.rows_of(wide, "input", names) is None or route.plan.rows_of(wide, "output", names) is None
    fresh = SlotRoute(names)
    fresh.assign([2, 2], "cpu")
    wide.route_slots(fresh)
    expected = wide(xs[1])
    wide.route_slots(route)
    assert_close(wide(xs[1]), expected)  # the written vector's new values, not the prepared rows
    assert route.plan.rows_of(layers[0], "input", ["s1", "s0"]) is None
    for layer in layers:
        layer.route_slots(None)


def test_a_batch_the_route_does_not_describe_is_refused():
    layer = slotted_layer("linear", LAYOUTS[0], 2)
    route = SlotRoute(["s0", "s1"])
    route.assign([1, 1], "cpu")
    layer.route_slots(route)
    with pytest.raises(ValueError, match="slot route assigns 2"):
        layer(inputs("linear", 3))
    with pytest.raises(ValueError, match="3 sample counts for 2 slots"):
        route.assign([1, 1, 1], "cpu")


def test_slots_of_another_layout_are_refused():
    from ether_diffusion.inject import inject

    model = nn.Sequential()
    model.add_module("to_q", nn.Linear(8, 8))
    inject(model, EtherConfig(method="ether", target_modules=["to_q"]), "a")
    inject(model, EtherConfig(method="ether_plus", target_modules=["to_q"]), "b")
    inject(model, EtherConfig(method="ether", target_modules=["to_q"], init_seed=3), "c")
    check_same_layout({"unet": model}, ["a", "c"])
    with pytest.raises(ValueError, match="one adapter layout"):
        check_same_layout({"unet": model}, ["a", "b"])
