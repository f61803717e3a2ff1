"""The math against dense references (dense matrices live here only)."""

import pytest
import torch
from torch.testing import assert_close

from ether_diffusion.config import EtherConfig
from ether_diffusion.layers import EtherLinear
from ether_diffusion.reflection import METHODS, apply_low_rank, low_rank_factors, reflected_linear, unit_blocks


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def dense_blocks(method, vectors, strength=1.0):
    """block_diag(H_1 … H_n) built densely from the published formulas."""
    blocks = []
    n = next(iter(vectors.values())).shape[0]
    for i in range(n):
        u = vectors["u"][i] / vectors["u"][i].norm()
        eye = torch.eye(u.numel())
        if method == "ether":
            blocks.append(eye - 2 * strength * torch.outer(u, u))
        else:
            v = vectors["v"][i] / vectors["v"][i].norm()
            blocks.append(eye - strength * torch.outer(u, u) + strength * torch.outer(v, v))
    return torch.block_diag(*blocks)


def transform(method, vectors, x, strength=1.0):
    return apply_low_rank(x, *METHODS[method].factors(vectors, strength))


def random_vectors(method, n, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, b, generator=g) for name in METHODS[method].vector_names}


@pytest.mark.parametrize("n", [1, 2, 4])
def test_ether_is_an_orthogonal_involution_that_flips_u(n):
    vectors = random_vectors("ether", n, 6)
    eye = torch.eye(n * 6)
    h = transform("ether", vectors, eye)  # rows of I·H = H (symmetric)
    assert_close(h @ h.T, eye)
    assert_close(h @ h, eye)
    assert_close(h, h.T)
    # Each block's û is mapped to -û, and a vector orthogonal to it is kept.
    for i in range(n):
        u = torch.zeros(n * 6)
        u[i * 6 : (i + 1) * 6] = vectors["u"][i]
        assert_close(transform("ether", vectors, u), -u)
    # ‖H_B − I‖_F = 2√n whatever u is: ETHER cannot run away.
    assert_close(torch.linalg.matrix_norm(h - eye), torch.tensor(2 * n**0.5))


def test_ether_plus_starts_at_identity_exactly():
    vectors = METHODS["ether_plus"].init_vectors(4, 8, torch.Generator().manual_seed(3))
    assert torch.equal(vectors["v"], -vectors["u"])
    x = torch.randn(5, 32)
    # v̂ = -û makes the two rank-1 terms cancel: the identity up to float rounding
    assert_close(transform("ether_plus", vectors, x), x, rtol=0, atol=1e-14)


def test_ether_plus_strength_is_nonsingular_below_one():
    # û ⊥ v̂ makes H+ singular at strength 1; any strength below 1 keeps it invertible.
    u = torch.tensor([[1.0, 0.0, 0.0]])
    v = torch.tensor([[0.0, 1.0, 0.0]])
    full = transform("ether_plus", {"u": u, "v": v}, torch.eye(3), 1.0)
    assert torch.linalg.matrix_rank(full) == 2
    for s in (0.0, 0.3, 0.9, 0.999):
        h = transform("ether_plus", {"u": u, "v": v}, torch.eye(3), s)
        assert torch.linalg.det(h).abs() > 1e-6
    assert_close(transform("ether_plus", {"u": u, "v": v}, torch.eye(3), 0.0), torch.eye(3))


@pytest.mark.parametrize("method", ["ether", "ether_plus"])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_low_rank_form_equals_dense_blocks(method, n, strength):
    vectors = random_vectors(method, n, 5, seed=n)
    x = torch.randn(7, 3, n * 5)
    expected = x @ dense_blocks(method, vectors, strength).T
    assert_close(transform(method, vectors, x, strength), expected)


def test_factors_are_thin_and_block_sparse():
    directions = unit_blocks(torch.randn(2, 4, 3))
    down, up = low_rank_factors(directions, [-1.0, 1.0])
    assert down.shape == (12, 8) and up.shape == (8, 12)
    # column k·n + i is nonzero only in the rows of block i
    for column in range(8):
        block = column % 4
        nonzero = down[:, column].nonzero().flatten()
        assert nonzero.min() >= block * 3 and nonzero.max() < (block + 1) * 3


@pytest.mark.parametrize("method", ["ether", "ether_plus"])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("sides", [("input",), ("output",), ("input", "output")])
def test_linear_layer_equals_dense_reference(method, n, sides):
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 12)
    layer = EtherLinear(base, "layer")
    adapter = layer.add_adapter("a", EtherConfig(method=method, n_blocks=n, sides=sides))
    layer.set_active(["a"])
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    weight = base.weight.detach()
    if "input" in sides:
        weight = weight @ dense_blocks(method, adapter.vectors("input"))
    if "output" in sides:
        weight = dense_blocks(method, adapter.vectors("output")) @ weight
    x = torch.randn(3, 5, 8)
    assert_close(layer(x), x @ weight.T + base.bias.detach())


def test_ether_n1_equals_peft_hra_r1():
    peft = pytest.importorskip("peft", reason="PEFT is a dev dependency: pip install -e .[dev]")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12))
    ours = EtherLinear(model[0], "0")
    adapter = ours.add_adapter("a", EtherConfig(method="ether", n_blocks=1))
    ours.set_active(["a"])
    x = torch.randn(4, 16)
    expected_ours = ours(x)

    theirs = peft.get_peft_model(model, peft.HRAConfig(r=1, target_modules=["0"], init_weights=False))
    hra_layer = theirs.base_model.model[0]
    with torch.no_grad():
        hra_layer.hra_u["default"].copy_(adapter.ether_u.detach().T)  # PEFT keeps u as (in, r)
    assert_close(theirs(x), expected_ours)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_a_zero_block_stays_zero_in_every_dtype(dtype):
    vectors = torch.zeros(2, 4, dtype=dtype)
    vectors[1] = 1.0
    unit = unit_blocks(vectors)
    assert torch.equal(unit[0], vectors[0])  # not NaN: 1e-12 is 0 in float16
    assert_close(unit[1], torch.full((4,), 0.5, dtype=dtype))


def unfused_linear(method, x, weight, bias, inner, outer, strength):
    """``T̃(T(x) Wᵀ) + b`` through ``apply_low_rank`` and ``F.linear``: the plain formula, autograd recording each op."""
    h = x if inner is None else transform(method, inner, x, strength)
    y = h @ weight.T
    if outer is not None:
        y = transform(method, outer, y, strength)
    return y if bias is None else y + bias


def side_terms(method, vectors, strength):
    return None if vectors is None else METHODS[method].rank_one_terms(vectors, strength)


@pytest.mark.parametrize("method", ["ether", "ether_plus"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("sides", [("input",), ("output",), ("input", "output")])
@pytest.mark.parametrize("tokens", [2, 11])  # fewer tokens than features (z is kept), and more (z is recomputed)
@pytest.mark.parametrize("bias", [True, False])
def test_reflected_linear_gradients_are_exact(method, n, sides, tokens, bias):
    g = torch.Generator().manual_seed(tokens + n)
    x = torch.randn(tokens, 6, generator=g, requires_grad=True)
    weight = torch.randn(9, 6, generator=g, requires_grad=True)
    b = torch.randn(9, generator=g, requires_grad=True) if bias else None
    inner = random_vectors(method, n, 6 // n, seed=1) if "input" in sides else None
    outer = random_vectors(method, n, 9 // n, seed=2) if "output" in sides else None
    vectors = [v.requires_grad_() for found in (inner, outer) if found is not None for v in found.values()]
    strength = 0.7

    def fused(x, weight, b, *flat):
        it = iter(flat)
        rebuilt = [None if found is None else {k: next(it) for k in found} for found in (inner, outer)]
        terms = [side_terms(method, found, strength) for found in rebuilt]
        return reflected_linear(x, weight, b, *terms)

    inputs = (x, weight, b, *vectors) if bias else (x, weight, *vectors)
    call = fused if bias else (lambda x, w, *flat: fused(x, w, None, *flat))
    assert torch.autograd.gradcheck(call, inputs)

    out = fused(x, weight, b, *vectors)
    expected = unfused_linear(method, x, weight, b, inner, outer, strength)
    assert_close(out, expected)
    probe = torch.randn(out.shape, generator=g)
    params = [p for p in inputs if p is not None]
    assert_close(torch.autograd.grad(out, params, probe), torch.autograd.grad(expected, params, probe))


def test_reflected_linear_keeps_leading_dimensions_and_skips_unneeded_gradients():
    vectors = random_vectors("ether_plus", 2, 4)
    for v in vectors.values():
        v.requires_grad_()
    x = torch.randn(2, 3, 8)
    weight = torch.randn(5, 8)
    out = reflected_linear(x, weight, None, side_terms("ether_plus", vectors, 1.0), None)
    assert out.shape == (2, 3, 5)
    expected = unfused_linear("ether_plus", x, weight, None, vectors, None, 1.0)
    assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), list(vectors.values()))
    assert_close(grads, torch.autograd.grad(expected.square().sum(), list(vectors.values())))


def test_reflected_linear_with_wide_vectors_on_a_narrow_model():
    """fp32 vectors on a bf16 layer (diffusers' mixed-precision training): products in bf16, vector grads in fp32."""
    vectors = {k: v.float().requires_grad_() for k, v in random_vectors("ether_plus", 2, 8).items()}
    x = torch.randn(4, 16, dtype=torch.float32)
    weight = torch.randn(16, 16, dtype=torch.float32) / 4
    terms = side_terms("ether_plus", vectors, 1.0)
    out = reflected_linear(x.bfloat16(), weight.bfloat16(), None, terms, terms)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    narrow = [v.grad.clone() for v in vectors.values()]
    assert all(grad.dtype == torch.float32 for grad in narrow)
    for v in vectors.values():
        v.grad = None
    expected = unfused_linear("ether_plus", x, weight, None, vectors, vectors, 1.0)
    expected.square().sum().backward()
    assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    for grad, v in zip(narrow, vectors.values()):
        assert torch.nn.functional.cosine_similarity(grad.flatten(), v.grad.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("method", ["ether", "ether_plus"])
@pytest.mark.parametrize("sides", [("input",), ("input", "output")])
@pytest.mark.parametrize("conv", [False, True])
def test_training_forward_and_gradients_equal_dense_reference(method, sides, conv):
    """With autograd on, a layer runs as one ``reflected_linear`` node: its output and every gradient equal the dense
    formula's."""
    from ether_diffusion.layers import EtherConv2d

    torch.manual_seed(0)
    base = torch.nn.Conv2d(8, 12, 1) if conv else torch.nn.Linear(8, 12)
    layer = (EtherConv2d if conv else EtherLinear)(base, "layer")
    adapter = layer.add_adapter("a", EtherConfig(method=method, n_blocks=2, sides=sides))
    layer.set_active(["a"])
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    x = torch.randn(2, 8, 3, 3) if conv else torch.randn(2, 5, 8)
    x.requires_grad_()
    out = layer(x)
    params = [x, base.weight, base.bias, *adapter.parameters()]
    grads = torch.autograd.grad(out.square().sum(), params)

    weight = base.weight.view(12, 8)
    if "input" in sides:
        weight = weight @ dense_blocks(method, adapter.vectors("input"))
    if "output" in sides:
        weight = dense_blocks(method, adapter.vectors("output")) @ weight
    features = x.movedim(1, -1) if conv else x
    expected = features @ weight.T + base.bias
    expected = expected.movedim(-1, 1) if conv else expected
    assert_close(out, expected)
    assert_close(grads, torch.autograd.grad(expected.square().sum(), params))
