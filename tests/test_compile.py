"""The adapter forward (and backward) traces with torch.compile(fullgraph=True): no graph breaks in ETHER's
layers, in training and in sampling, one- and two-sided, linear and 1×1 conv, in a mixed batch."""

import pytest
import torch
from torch import nn

from ether_diffusion import EtherConfig, inject
from ether_diffusion.inject import adapter_parameters, mixed_batch

pytestmark = pytest.mark.slow  # torch.compile traces (seconds each): the end-to-end tier


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Conv2d(8, 16, 1)
        self.to_q = nn.Linear(16, 16)
        self.to_out = nn.Linear(16, 8)

    def forward(self, x):  # (B, 8, H, W)
        h = self.proj_in(x).flatten(2).transpose(1, 2)  # (B, HW, 16)
        return self.to_out(torch.nn.functional.gelu(self.to_q(h)))


def adapted(method, n_blocks, names=("a",)):
    torch.manual_seed(0)
    model = Block()
    for name in names:
        inject(model, EtherConfig(method=method, n_blocks=n_blocks, target_modules=["proj_in", "to_q", "to_out"]),
               name, activate=False)  # fmt: skip
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("method, n_blocks", [("ether", 1), ("ether", 4), ("ether_plus", 2)])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_forward_and_backward_compile_without_graph_breaks(method, n_blocks, backend):
    model = adapted(method, n_blocks)
    model.to_q.set_active(["a"])
    for layer in (model.proj_in, model.to_out):
        layer.set_active(["a"])
    x = torch.randn(2, 8, 3, 3)
    expected = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # raises on any graph break
    out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.square().mean().backward()  # through the compiled graph (aot_eager traces the backward too)
    grads = [p.grad for p in adapter_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)  # sampling: the cached factors


def test_a_mixed_batch_compiles_without_graph_breaks():
    model = adapted("ether_plus", 2, names=("a", "b"))
    x = torch.randn(3, 8, 2, 2)
    with torch.no_grad(), mixed_batch(model, ["a", None, "b"]):
        expected = model(x)
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ether", "ether_plus"])
def test_the_unets_transformer_blocks_compile_with_adapters_inside(tiny_unet, method):
    """diffusers' regional compilation (``compile_repeated_blocks(fullgraph=True)``) of a UNet with ETHER on every
    attention projection: no graph break in the real blocks, and the same prediction and gradients as eager."""
    torch.manual_seed(0)
    inject(tiny_unet, EtherConfig(method=method), "a")
    tiny_unet.requires_grad_(False)
    params = adapter_parameters(tiny_unet)
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))
    size = tiny_unet.config.sample_size
    latents = torch.randn(2, tiny_unet.config.in_channels, size, size)
    context = torch.randn(2, 7, tiny_unet.config.cross_attention_dim)
    timesteps = torch.tensor([10, 500])

    def loss_and_grads():
        loss = tiny_unet(latents, timesteps, context).sample.square().mean()
        grads = torch.autograd.grad(loss, params)
        return loss.detach(), grads

    expected, expected_grads = loss_and_grads()
    torch._dynamo.reset()
    tiny_unet.compile_repeated_blocks(fullgraph=True, backend="aot_eager")  # raises on any graph break
    compiled_blocks = [m for m in tiny_unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert compiled_blocks and all(m._compiled_call_impl is not None for m in compiled_blocks)
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()
