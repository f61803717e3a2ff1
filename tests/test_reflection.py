"""The math against dense references (dense matrices live here only)."""

import pytest
import torch
from torch.testing import assert_close

from ether_diffusion.config import EtherConfig
from ether_diffusion.layers import EtherLinear
from ether_diffusion.reflection import METHODS, apply_low_rank, low_rank_factors, unit_blocks


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
