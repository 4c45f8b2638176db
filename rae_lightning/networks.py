"""Plain PyTorch networks: fully-connected encoders, decoders and autoencoders.

This module imports only torch. The LightningModules in :mod:`rae_lightning.models`
wrap these networks; they can also be used on their own with a random tensor.

Depth is counted in Linear layers: an encoder with ``n_layers`` holds exactly
``n_layers`` Linear layers, whether it is plain or residual, and the decoder mirrors it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "leaky_relu": nn.LeakyReLU,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def activation_layer(name: str) -> type[nn.Module]:
    """Look up an activation class by its config name (``leaky_relu``, ``relu``, ...)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def check_dims(input_dim: int, hidden_dim: int, latent_dim: int, n_layers: int) -> None:
    """Raise a ValueError naming the first size parameter that cannot build a network."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be at least 1, got {n_layers}")
    if input_dim < 1:
        raise ValueError(f"input_dim must be at least 1, got {input_dim}")
    if hidden_dim < 1:
        raise ValueError(f"hidden_dim must be at least 1, got {hidden_dim}")
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be at least 1, got {latent_dim}")
    if latent_dim >= input_dim:
        raise ValueError(
            f"latent_dim must be smaller than input_dim={input_dim} for a bottleneck, "
            f"got latent_dim={latent_dim}"
        )


class PlainLayer(nn.Module):
    """Linear, then normalisation, then activation: one layer of a plain stack."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        norm_layer: type[nn.Module] = nn.BatchNorm1d,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm = norm_layer(out_dim)
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, in_dim)`` to ``(batch, out_dim)``."""
        return self.act(self.norm(self.linear(x)))


class ResidualUnit(nn.Module):
    """Pre-activation identity unit: ``x + F(x)``, F = (norm, activation, Linear) x depth.

    The width is constant, so the identity path needs no projection (He et al., 2016).
    """

    def __init__(
        self,
        dim: int,
        depth: int = 2,
        norm_layer: type[nn.Module] = nn.BatchNorm1d,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [norm_layer(dim), act_layer(), nn.Linear(dim, dim)]
        self.branch = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, dim)`` to ``(batch, dim)``: the input plus the branch."""
        return x + self.branch(x)


class MLPStack(nn.Module):
    """A stack of ``n_layers`` Linear layers from ``in_dim`` to ``out_dim``.

    Plain: ``n_layers - 1`` blocks of (Linear, norm, activation) at ``hidden_dim``, then a
    Linear to ``out_dim``. Residual: a Linear projection to ``hidden_dim``, residual units
    holding ``n_layers - 2`` Linear layers at constant width (pairs; one single-layer unit
    when the count is odd), a final norm and activation, then a Linear projection to
    ``out_dim``. With ``n_layers`` of 1 or 2 both kinds are the same network shape.

    The last Linear has no norm or activation, so the output is unconstrained (a code or a
    reconstruction). :meth:`features` returns the hidden representations along the way,
    which RaPP-style scores compare.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        n_layers: int,
        residual: bool = False,
        norm_layer: type[nn.Module] = nn.BatchNorm1d,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        self.residual = residual
        blocks: list[nn.Module] = []
        if n_layers == 1:
            self.head = nn.Linear(in_dim, out_dim)
        elif not residual:
            dims = [in_dim] + [hidden_dim] * (n_layers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
                blocks.append(PlainLayer(d_in, d_out, norm_layer, act_layer))
            self.head = nn.Linear(hidden_dim, out_dim)
        else:
            blocks.append(nn.Linear(in_dim, hidden_dim))
            n_inner = n_layers - 2
            for _ in range(n_inner // 2):
                blocks.append(ResidualUnit(hidden_dim, 2, norm_layer, act_layer))
            if n_inner % 2:
                blocks.append(ResidualUnit(hidden_dim, 1, norm_layer, act_layer))
            # the last unit's output is pre-activation, as in He et al. (2016)
            self.head = nn.Sequential(
                norm_layer(hidden_dim), act_layer(), nn.Linear(hidden_dim, out_dim)
            )
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, in_dim)`` to ``(batch, out_dim)``."""
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def features(self, x: Tensor) -> list[Tensor]:
        """Hidden representations, one per block, then the output; each ``(batch, width)``.

        For a plain stack these are the activations after each hidden layer; for a
        residual stack, the input projection and the output of every residual unit.
        """
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        feats.append(self.head(x))
        return feats


def _stack_kwargs(activation: str) -> dict:
    return {"norm_layer": nn.BatchNorm1d, "act_layer": activation_layer(activation)}


class AutoEncoderNet(nn.Module):
    """Fully-connected autoencoder, plain or residual.

    Args:
        input_dim: features per sample.
        hidden_dim: width of the hidden layers.
        latent_dim: size of the code.
        n_layers: Linear layers in the encoder; the decoder has as many.
        residual: build both stacks from pre-activation residual units.
        activation: name of the activation (see ``ACTIVATIONS``).

    Shapes: ``forward`` maps ``(batch, input_dim)`` to ``(batch, input_dim)``.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int = 128,
        latent_dim: int = 16,
        n_layers: int = 4,
        residual: bool = False,
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        check_dims(input_dim, hidden_dim, latent_dim, n_layers)
        kw = _stack_kwargs(activation)
        self.encoder = MLPStack(input_dim, hidden_dim, latent_dim, n_layers, residual, **kw)
        self.decoder = MLPStack(latent_dim, hidden_dim, input_dim, n_layers, residual, **kw)

    def encode(self, x: Tensor) -> Tensor:
        """The code of ``x`` ``(batch, input_dim)``: ``(batch, latent_dim)``."""
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of ``x``: ``(batch, input_dim)`` to ``(batch, input_dim)``."""
        z = self.encoder(x)
        return self.decoder(z)


class VAENet(nn.Module):
    """Variational autoencoder on the same stacks, plain or residual.

    The encoder's last Linear layer outputs ``2 * latent_dim`` values, read as the mean
    and the log-variance of a diagonal Gaussian posterior; this keeps the Linear-layer
    count equal to the plain autoencoder's.

    Shapes: ``forward`` maps ``(batch, input_dim)`` to a tuple of the reconstruction
    ``(batch, input_dim)``, ``mu`` and ``logvar``, each ``(batch, latent_dim)``.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int = 128,
        latent_dim: int = 16,
        n_layers: int = 4,
        residual: bool = False,
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        check_dims(input_dim, hidden_dim, latent_dim, n_layers)
        kw = _stack_kwargs(activation)
        self.latent_dim = latent_dim
        self.encoder = MLPStack(input_dim, hidden_dim, 2 * latent_dim, n_layers, residual, **kw)
        self.decoder = MLPStack(latent_dim, hidden_dim, input_dim, n_layers, residual, **kw)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters ``mu`` and ``logvar``, each ``(batch, latent_dim)``."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def forward(
        self,
        x: Tensor,
        sample: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruct ``x``; samples ``z`` in training mode (from ``generator`` when given,
        else torch's global generator), uses ``mu`` in eval mode."""
        mu, logvar = self.encode(x)
        if sample is None:
            sample = self.training
        z = mu
        if sample:
            z = mu + torch.randn(
                mu.shape, generator=generator, device=mu.device, dtype=mu.dtype
            ) * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample, summed over latent dims: ``(batch,)``."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def count_linear(module: nn.Module) -> int:
    """Number of ``nn.Linear`` layers in a module."""
    return sum(isinstance(m, nn.Linear) for m in module.modules())
