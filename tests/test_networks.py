"""The plain networks: shapes, layer counts, residual form, and that they learn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rae_lightning.networks import (
    AutoEncoderNet,
    MLPStack,
    ResidualUnit,
    VAENet,
    count_linear,
    kl_divergence,
)

VARIANTS = [
    pytest.param(AutoEncoderNet, False, id="ae"),
    pytest.param(AutoEncoderNet, True, id="rae"),
    pytest.param(VAENet, False, id="vae"),
    pytest.param(VAENet, True, id="rvae"),
]


def _reconstruct(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = net(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize(("cls", "residual"), VARIANTS)
@pytest.mark.parametrize("n_layers", [1, 2, 3, 6])
def test_shapes(cls: type[nn.Module], residual: bool, n_layers: int) -> None:
    net = cls(input_dim=20, hidden_dim=16, latent_dim=4, n_layers=n_layers, residual=residual)
    x = torch.randn(8, 20)

    out = net(x)

    if cls is VAENet:
        x_hat, mu, logvar = out
        assert mu.shape == logvar.shape == (8, 4)
    else:
        x_hat = out
    assert x_hat.shape == x.shape


@pytest.mark.parametrize("n_layers", range(1, 12))
@pytest.mark.parametrize("cls", [AutoEncoderNet, VAENet])
def test_plain_and_residual_have_equal_linear_counts(cls: type[nn.Module], n_layers: int) -> None:
    plain = cls(input_dim=20, hidden_dim=16, latent_dim=4, n_layers=n_layers, residual=False)
    resid = cls(input_dim=20, hidden_dim=16, latent_dim=4, n_layers=n_layers, residual=True)

    assert count_linear(plain.encoder) == count_linear(resid.encoder) == n_layers
    assert count_linear(plain.decoder) == count_linear(resid.decoder) == n_layers


def test_residual_stack_is_built_from_identity_units() -> None:
    stack = MLPStack(20, 16, 4, n_layers=8, residual=True)
    units = [m for m in stack.modules() if isinstance(m, ResidualUnit)]

    assert len(units) == 3
    assert all(isinstance(m, nn.BatchNorm1d) for m in [u.branch[0] for u in units])
    assert not any(isinstance(m, ResidualUnit) for m in MLPStack(20, 16, 4, 8).modules())


def test_residual_unit_is_identity_when_branch_is_zero() -> None:
    unit = ResidualUnit(16)
    for layer in unit.branch:
        if isinstance(layer, nn.Linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
    x = torch.randn(5, 16)

    assert torch.equal(unit(x), x)


def test_features_end_with_the_output() -> None:
    stack = MLPStack(20, 16, 4, n_layers=6, residual=True).eval()
    x = torch.randn(5, 20)

    feats = stack.features(x)

    assert len(feats) == len(stack.blocks) + 1
    torch.testing.assert_close(feats[-1], stack(x))


@pytest.mark.parametrize(("cls", "residual"), VARIANTS)
def test_training_lowers_the_loss(
    cls: type[nn.Module], residual: bool, manifold_data: torch.Tensor
) -> None:
    torch.manual_seed(0)
    net = cls(input_dim=20, hidden_dim=32, latent_dim=3, n_layers=4, residual=residual)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def eval_loss() -> float:
        net.eval()
        with torch.no_grad():
            return (manifold_data - _reconstruct(net, manifold_data)).pow(2).mean().item()

    before = eval_loss()
    for _ in range(150):
        net.train()
        idx = torch.randint(0, len(manifold_data), (64,))
        x = manifold_data[idx]
        out = net(x)
        x_hat = out[0] if isinstance(out, tuple) else out
        loss = (x - x_hat).pow(2).mean()
        if isinstance(out, tuple):
            loss = loss + 1e-3 * kl_divergence(out[1], out[2]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()

    assert after < 0.5 * before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_layers": 0}, "n_layers must be at least 1, got 0"),
        ({"hidden_dim": 0}, "hidden_dim must be at least 1, got 0"),
        ({"latent_dim": 20}, "latent_dim must be smaller than input_dim=20"),
        ({"activation": "sigmoidish"}, "activation must be one of"),
    ],
)
def test_bad_sizes_name_the_parameter(kwargs: dict, message: str) -> None:
    args = {"input_dim": 20, "hidden_dim": 16, "latent_dim": 4, "n_layers": 3} | kwargs
    with pytest.raises(ValueError, match=message):
        AutoEncoderNet(**args)


def test_kl_is_zero_for_the_prior() -> None:
    mu = torch.zeros(3, 4)
    logvar = torch.zeros(3, 4)

    torch.testing.assert_close(kl_divergence(mu, logvar), torch.zeros(3))
