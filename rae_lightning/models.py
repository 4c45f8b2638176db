"""LightningModules: the training, scoring and logging around the plain networks.

:class:`AutoEncoder` covers the AE and, with ``residual=True``, the RAE;
:class:`VariationalAutoEncoder` covers the VAE and the residual VAE. Both share
:class:`AnomalyDetector`: one step that computes the loss and per-sample anomaly scores,
AUROC on validation and test, and the pre-clip gradient norm ``g_norm``.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

from rae_lightning.networks import AutoEncoderNet, VAENet, kl_divergence

log = logging.getLogger(__name__)


class AnomalyDetector(L.LightningModule):
    """Base class: one shared step, AUROC metrics and ``g_norm`` logging.

    Subclasses build ``self.net`` and implement :meth:`terms`, which maps a batch
    ``(batch, input_dim)`` to per-sample tensors ``(batch,)``: at least ``loss`` and
    every name in :attr:`score_types`.

    Args:
        input_dim: features per sample; linked from the DataModule by the CLI.
        hidden_dim: width of the hidden layers.
        latent_dim: size of the code.
        n_layers: Linear layers in the encoder; the decoder mirrors it.
        residual: build the stacks from pre-activation residual units.
        activation: activation name (``leaky_relu``, ``relu``, ``elu``, ``gelu``, ...).
        lr: learning rate handed to the optimizer.
        score: the anomaly score that ``val/auroc`` and ``test/auroc`` use.
        optimizer: optimizer class or callable taking ``(params, lr=...)``; Adam by default.
        lr_scheduler: optional scheduler callable taking the optimizer.
    """

    score_types: tuple[str, ...] = ("recon",)
    logged_terms: tuple[str, ...] = ()

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int = 128,
        latent_dim: int = 16,
        n_layers: int = 4,
        residual: bool = False,
        activation: str = "leaky_relu",
        lr: float = 1e-3,
        score: str = "recon",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if score not in self.score_types:
            raise ValueError(
                f"score must be one of {list(self.score_types)} for {type(self).__name__}, "
                f"got {score!r}"
            )
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.net = self.build_network()

        # Anomaly scores are unbounded: torchmetrics must rank them as they are, not
        # squash them with a sigmoid (which saturates and ties scores above ~17).
        self.val_loss = MeanMetric()
        self.val_auroc = BinaryAUROC(normalization=None)
        self.test_loss = MeanMetric()
        self.test_auroc = BinaryAUROC(normalization=None)
        self.test_auprc = BinaryAveragePrecision(normalization=None)

        # g_norm of each optimisation step, kept on the device until the next flush
        self._g_norm_pending: list[tuple[int, Tensor]] = []
        self.g_norm_history: list[tuple[int, float]] = []

    def build_network(self) -> nn.Module:
        """The plain network this module trains."""
        raise NotImplementedError(f"{type(self).__name__} must define build_network()")

    def terms(self, x: Tensor) -> dict[str, Tensor]:
        """Per-sample loss and score terms for ``x`` ``(batch, input_dim)``; each ``(batch,)``."""
        raise NotImplementedError(f"{type(self).__name__} must define terms()")

    def forward(self, x: Tensor) -> Tensor:
        """The configured anomaly score of each sample: ``(batch,)``; higher is more anomalous."""
        return self.terms(x)[self.hparams.score]

    def shared_step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean loss of the batch and the per-sample terms, the same for every stage."""
        x = batch[0]
        terms = self.terms(x)
        return terms["loss"].mean(), terms

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, terms = self.shared_step(batch)
        self.log("train/loss", loss)
        for name in self.logged_terms:
            self.log(f"train/{name}", terms[name].mean())
        return loss

    def _update_eval_metrics(
        self, batch: tuple[Tensor, Tensor], loss_metric: MeanMetric, *metrics: Any
    ) -> None:
        _, terms = self.shared_step(batch)
        y = batch[1]
        normal = y == 0
        # the loss on held-out normals measures how well normality generalises
        loss_metric.update(terms["loss"][normal])
        score = terms[self.hparams.score]
        for metric in metrics:
            metric.update(score, y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._update_eval_metrics(batch, self.val_loss, self.val_auroc)
        self.log("val/loss", self.val_loss)
        self.log("val/auroc", self.val_auroc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._update_eval_metrics(batch, self.test_loss, self.test_auroc, self.test_auprc)
        self.log("test/loss", self.test_loss)
        self.log("test/auroc", self.test_auroc)
        self.log("test/auprc", self.test_auprc)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Per-sample scores of every type, and the labels the batch carries."""
        _, terms = self.shared_step(batch)
        out = {name: terms[name] for name in self.score_types}
        out["score"] = terms[self.hparams.score]
        if len(batch) > 1:
            out["label"] = batch[1]
        return out

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The Trainer calls this hook after backward and before it clips, so this is the
        # pre-clip norm. It stays on the device: no host sync per step.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        self._g_norm_pending.append((self.trainer.global_step, norm.detach()))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if len(self._g_norm_pending) >= self.trainer.log_every_n_steps:
            self.flush_g_norm()

    def on_train_epoch_end(self) -> None:
        self.flush_g_norm()

    def flush_g_norm(self) -> None:
        """Write the buffered per-step ``g_norm`` values to every logger with one host sync."""
        if not self._g_norm_pending:
            return
        steps = [step for step, _ in self._g_norm_pending]
        values = torch.stack([value for _, value in self._g_norm_pending]).tolist()
        self._g_norm_pending.clear()
        self.g_norm_history.extend(zip(steps, values, strict=True))
        for logger in self.loggers:
            for step, value in zip(steps, values, strict=True):
                logger.log_metrics({"g_norm": value}, step=step)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters(), lr=self.hparams.lr)
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        config = {"scheduler": scheduler}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}


class AutoEncoder(AnomalyDetector):
    """Deep fully-connected autoencoder (AE), or residual autoencoder (RAE) with
    ``residual=True``; trained on the mean squared error, scored by it per sample.

    See :class:`AnomalyDetector` for the arguments.
    """

    score_types = ("recon",)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        return AutoEncoderNet(
            hp.input_dim, hp.hidden_dim, hp.latent_dim, hp.n_layers, hp.residual, hp.activation
        )

    def terms(self, x: Tensor) -> dict[str, Tensor]:
        x_hat = self.net(x)
        recon = (x - x_hat).pow(2).mean(dim=1)
        return {"loss": recon, "recon": recon}


class VariationalAutoEncoder(AnomalyDetector):
    """Variational autoencoder (VAE), or residual VAE with ``residual=True``.

    Trained on the negative ELBO of a Gaussian decoder: per sample, the summed squared
    error plus ``beta`` times KL(q(z|x) || N(0, I)). In eval mode the decoder reads the
    posterior mean, so scores are deterministic. Score types: ``recon``, the mean squared
    error of the posterior-mean reconstruction, and ``elbo``, the negative ELBO
    (summed squared error plus KL, ``beta`` = 1).

    Args:
        beta: weight of the KL term in the training loss.
        **kwargs: see :class:`AnomalyDetector`.
    """

    score_types = ("recon", "elbo")
    logged_terms = ("recon", "kl")

    def __init__(self, input_dim: int, beta: float = 1.0, **kwargs: Any) -> None:
        if beta < 0:
            raise ValueError(f"beta must be at least 0, got {beta}")
        self.beta = beta
        super().__init__(input_dim, **kwargs)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        return VAENet(
            hp.input_dim, hp.hidden_dim, hp.latent_dim, hp.n_layers, hp.residual, hp.activation
        )

    def terms(self, x: Tensor) -> dict[str, Tensor]:
        x_hat, mu, logvar = self.net(x)
        sq_err = (x - x_hat).pow(2).sum(dim=1)
        kl = kl_divergence(mu, logvar)
        return {
            "loss": sq_err + self.beta * kl,
            "recon": sq_err / x.shape[1],
            "kl": kl,
            "elbo": sq_err + kl,
        }
