"""The training path of adapted layers (directions.py): every layer's unit directions normalised in one batch per
forward of the model, the layer run as plain products. Equal to the one-node layer, exact gradients, used only while
current, fewer operations per layer than PEFT's LoRA."""

import collections
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from ether_diffusion import EtherConfig, directions, eject, inject, set_active_adapters
from ether_diffusion.inject import (
    _prepare_directions,
    adapter_layers,
    adapter_parameters,
    enable_adapters,
    set_merged_cache,
)


class Convs(nn.Module):
    """Two 1×1 convolutions, as SD's proj_in / proj_out."""

    def __init__(self, width):
        super().__init__()
        self.a, self.b = nn.Conv2d(width, width, 1), nn.Conv2d(width, width, 1, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def build(kind="linear", method="ether_plus", sides=None, n_blocks=1, width=8, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width, bias=False))
        targets = ["0", "2"]
    else:
        model, targets = Convs(width), ["a", "b"]
    model = model.to(dtype).requires_grad_(False)
    inject(model, EtherConfig(method=method, n_blocks=n_blocks, sides=sides, target_modules=targets, init_seed=seed),
           "a")  # fmt: skip
    with torch.no_grad():  # away from the identity, so that every term matters
        for p in adapter_parameters(model, "a"):
            p.add_(torch.randn(p.shape, dtype=p.dtype))
    for p in adapter_parameters(model, "a"):
        p.requires_grad_(True)
    return model


def run(model, x):
    """Output, input gradient and vector gradients of one training forward and backward."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    grads = [p.grad.clone() for p in adapter_parameters(model, "a")]
    for p in adapter_parameters(model, "a"):
        p.grad = None
    return y.detach(), x.grad, grads


def without_directions(model):
    """The same model trained through the one-node layer (``reflected_linear``): no pre-hook, nothing prepared."""
    other = copy.deepcopy(model)
    for key, hook in list(other._forward_pre_hooks.items()):
        if hook is _prepare_directions:
            del other._forward_pre_hooks[key]
    return other


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize(
    "method, sides, n_blocks",
    [("ether", None, 1), ("ether", None, 4), ("ether_plus", None, 1), ("ether_plus", ("input",), 2),
     ("ether_plus", ("output",), 1), ("ether", ("input", "output"), 2)],
)  # fmt: skip
def test_a_training_forward_equals_the_one_node_layer(kind, method, sides, n_blocks):
    model = build(kind, method, sides, n_blocks)
    reference = without_directions(model)
    for layer in (layer for _, layer in adapter_layers(model)):
        layer.set_active(["a"], [0.7])  # a strength other than 1 reaches the coefficients
    for layer in (layer for _, layer in adapter_layers(reference)):
        layer.set_active(["a"], [0.7])
    x = torch.randn(3, 8) if kind == "linear" else torch.randn(2, 8, 3, 3)
    y, gx, grads = run(model, x)
    assert all(directions.current(layer) is not None for _, layer in adapter_layers(model))  # the fast path ran
    y_ref, gx_ref, grads_ref = run(reference, x)
    assert all(layer._directions is None for _, layer in adapter_layers(reference))
    assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method, n_blocks", [("ether", 1), ("ether_plus", 2)])
def test_the_gradients_are_exact_in_float64(method, n_blocks):
    """Autograd's gradients of the prepared path against central differences, for the input and every vector (the
    directions are prepared anew after each in-place change: the vectors' versions move)."""
    model = build("linear", method, ("input", "output"), n_blocks, dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda inputs: model(inputs), (x.requires_grad_(True),))
    _, _, grads = run(model, x.detach())
    weights = torch.linspace(-1, 1, 24, dtype=torch.float64).view(3, 8)
    eps = 1e-6
    for p, g in zip(adapter_parameters(model, "a"), grads):
        d = torch.randn(p.shape, dtype=torch.float64)
        with torch.no_grad():
            p.add_(eps * d)
            plus = float((model(x) * weights).sum())
            p.sub_(2 * eps * d)
            minus = float((model(x) * weights).sum())
            p.add_(eps * d)
        assert (plus - minus) / (2 * eps) == pytest.approx(float((g * d).sum()), rel=1e-6, abs=1e-9)


def test_directions_are_used_only_while_current():
    model = build("linear")
    layer = model[0]
    run(model, torch.randn(2, 8))
    assert directions.current(layer) is not None
    vector = layer.ether_adapters["a"].ether_u
    with torch.no_grad():
        vector.mul_(1.5)  # an optimizer step: the version moves
    assert directions.current(layer) is None
    run(model, torch.randn(2, 8))
    assert directions.current(layer) is not None
    for change in (lambda: set_active_adapters(model, ["a"], 0.5), lambda: enable_adapters(model, True)):
        change()  # any change of what the layers run
        assert directions.current(layer) is None
        run(model, torch.randn(2, 8))
    # an EMA copy writes through .data (no version moves): the next forward of the model prepares from the new values
    fresh = copy.deepcopy(model)
    x = torch.randn(2, 8)
    for p, q in zip(adapter_parameters(model, "a"), adapter_parameters(fresh, "a")):
        new = torch.randn(p.shape)
        p.data.copy_(new)
        q.data.copy_(new)
    y, *_ = run(model, x)
    y_fresh, *_ = run(without_directions(fresh), x)
    assert_close(y, y_fresh, rtol=1e-5, atol=1e-6)


def test_copies_leave_the_prepared_directions_out():
    model = build("linear")
    run(model, torch.randn(2, 8))
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(layer._directions is None for _, layer in adapter_layers(copied))
        y, _, grads = run(copied, torch.randn(2, 8))  # and train on their own
        assert all(directions.current(layer) is not None for _, layer in adapter_layers(copied))
        assert all(torch.isfinite(g).all() for g in grads)


def test_layers_the_prepared_path_does_not_serve_train_as_before():
    """Two active adapters, a merged one, or none in the plan: the layer computes as it did, with gradients."""
    model = build("linear")
    inject(model, EtherConfig(method="ether", target_modules=["0", "2"]), "b", activate=False)
    set_active_adapters(model, ["a", "b"])
    y, _, grads = run(model, torch.randn(2, 8))
    assert all(layer._directions is None or directions.current(layer) is None for _, layer in adapter_layers(model))
    assert all(g.abs().sum() > 0 for g in grads)


def test_the_hook_leaves_with_the_adapters():
    model = build("linear")
    assert _prepare_directions in model._forward_pre_hooks.values()
    eject(model)
    assert _prepare_directions not in model._forward_pre_hooks.values()


def test_gradient_checkpointing_trains_the_same_vectors():
    """Non-reentrant checkpointing (diffusers', transformers') recomputes the layers in the backward from the same
    prepared directions."""
    from torch.utils.checkpoint import checkpoint

    model = build("linear", "ether_plus", ("input", "output"))

    class Checkpointed(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    plain = run(model, torch.randn(3, 8, generator=torch.Generator().manual_seed(1)))
    wrapped = Checkpointed(model)
    checkpointed = run(wrapped, torch.randn(3, 8, generator=torch.Generator().manual_seed(1)))
    for a, b in zip(plain[2], checkpointed[2]):
        assert_close(a, b, rtol=1e-6, atol=1e-7)


class _Count(TorchDispatchMode):
    """Counts the operations that do work (views left out), forward and backward."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _operations_per_layer(kind: str) -> int:
    """Operations one more adapted Linear(64, 64) adds to a training step (forward, backward, gradients set to None
    as the trainer's ``zero_grad(set_to_none=True)`` does): a chain of 3 layers against one of 2."""

    def step_operations(layers):
        model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(layers)]).requires_grad_(False)
        names = [str(i) for i in range(layers)]
        if kind == "lora":
            import peft

            peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=4, target_modules=names), model)
            trained = [p for n, p in model.named_parameters() if "lora_" in n]
        elif kind != "frozen":
            inject(model, EtherConfig(method=kind, target_modules=names), "a")
            trained = adapter_parameters(model, "a")
        else:
            trained = []
        for p in trained:
            p.requires_grad_(True)
        x = torch.randn(4, 64, requires_grad=True)
        model(x).sum().backward()  # warm-up: plans and caches are built once
        for p in trained:
            p.grad = None
        counter = _Count()
        with counter:
            model(x).sum().backward()
        return counter.count

    return step_operations(3) - step_operations(2)


def test_a_training_step_issues_fewer_operations_per_layer_than_lora():
    pytest.importorskip("peft")
    counts = {kind: _operations_per_layer(kind) for kind in ("frozen", "lora", "ether", "ether_plus")}
    assert counts["frozen"] == 2  # the frozen layer's forward and its input gradient
    assert counts["ether"] <= counts["lora"], counts
    assert counts["ether_plus"] <= 1.5 * counts["lora"], counts


def test_sampling_issues_the_base_layers_operations():
    """Unfused sampling with one adapter runs one product per layer, as the frozen layer: the merged weight, kept
    while nothing changes (``EtherLayer._merged_weight``); switched off, the transforms act on the activations."""

    def sampling_operations(kind, layers, merged=True):
        model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(layers)]).requires_grad_(False)
        if kind != "frozen":
            inject(model, EtherConfig(method=kind, target_modules=[str(i) for i in range(layers)]), "a")
            set_merged_cache(model, merged)
        x = torch.randn(4, 64)
        with torch.no_grad():
            model(x)
            counter = _Count()
            with counter:
                model(x)
        return counter.count

    def per_layer(kind, merged=True):
        return sampling_operations(kind, 3, merged) - sampling_operations(kind, 2, merged)

    base = per_layer("frozen")
    assert per_layer("ether") <= base + 1 and per_layer("ether_plus") <= base + 1
    assert per_layer("ether_plus", merged=False) > base + 1  # the switch off: the low-rank products per step


def test_without_autograd_nothing_is_prepared():
    model = build("linear")
    with torch.no_grad():
        model(torch.randn(2, 8))
    assert all(layer._directions is None for _, layer in adapter_layers(model))
    counts = collections.Counter(type(hook).__name__ for hook in model._forward_pre_hooks.values())
    assert sum(counts.values()) == 1  # one hook, however often adapters were added


def _prepared_rows(d_in, d_out, r, dtype=torch.float64):
    generator = torch.Generator().manual_seed(3)

    def rows(d):
        return [torch.randn(r, d, generator=generator, dtype=dtype, requires_grad=True) for _ in range(2)]

    return rows(d_in), rows(d_out)


@pytest.mark.parametrize("tokens", [3, 40], ids=["few-tokens-keep-z", "many-tokens-recompute-z"])
@pytest.mark.parametrize("with_inner", [True, False], ids=["two-sided", "output-only"])
def test_the_two_sided_node_passes_float64_gradcheck(tokens, with_inner):
    from ether_diffusion.directions import Directions, directed_linear

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(10, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(10, generator=generator, dtype=torch.float64, requires_grad=True)
    inner, outer = _prepared_rows(12, 10, 4)

    def layer(x, weight, bias, *rows):
        found = Directions(0, (), (), tuple(rows[:2]) if with_inner else None, tuple(rows[-2:]))
        return directed_linear(x, weight, bias, found)

    def plain(x, weight, bias, *rows):  # the products autograd differentiates itself
        h = x + (x @ rows[0].T) @ rows[1] if with_inner else x
        z = h @ weight.T
        return z + (z @ rows[-2].T) @ rows[-1] + bias

    inputs = (x, weight, bias, *(inner if with_inner else []), *outer)
    assert torch.autograd.gradcheck(layer, inputs)
    assert_close(layer(*inputs), plain(*inputs))


def test_the_two_sided_node_keeps_no_activation_the_size_of_its_output():
    """Many tokens: what autograd keeps for the backward is the input and thin (tokens × rank) tensors, not
    ``T(x) Wᵀ`` (tokens × out), which the plain products kept for R̃'s gradient."""
    from ether_diffusion.directions import Directions, directed_linear

    tokens, d = 256, 64
    x = torch.randn(tokens, d, requires_grad=True)
    weight = torch.randn(d, d)
    inner, outer = _prepared_rows(d, d, 2, torch.float32)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = directed_linear(x, weight, None, Directions(0, (), (), tuple(inner), tuple(outer)))
    activations = [t for t in saved if t.dim() == 2 and t.shape[0] == tokens]
    assert [tuple(t.shape) for t in activations if t.shape[1] == d] == [(tokens, d)]  # x itself
    assert all(t.shape[1] <= 2 for t in activations if t is not x and t.shape[1] != d)  # P, Q: thin
    y.sum().backward()
    assert x.grad is not None and inner[0].grad is not None and outer[1].grad is not None
