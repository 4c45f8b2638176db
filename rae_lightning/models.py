"""LightningModules: the training, scoring and logging around the plain networks.

:class:`AutoEncoder` covers the AE and, with ``residual=True``, the RAE;
:class:`VariationalAutoEncoder` covers the VAE and the residual VAE. Both share
:class:`AnomalyDetector`: one step that computes the loss and per-sample anomaly scores,
AUROC of every score type on validation and test, a decision threshold chosen on
validation and saved with the checkpoint, pictures for TensorBoard, and the pre-clip
gradient norm ``g_norm``. The RaPP scores (``sap``, ``nap``) come from
:mod:`rae_lightning.scoring`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import CatMetric, MeanMetric, Metric
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    BinaryROC,
)
from torchvision.utils import make_grid

from rae_lightning.metrics import AnomalyAUROC, AnomalyAveragePrecision
from rae_lightning.networks import AutoEncoderNet, VAENet, kl_divergence
from rae_lightning.scoring import (
    NAPStatistics,
    f1_optimal_threshold,
    pathway_differences,
    quantile_threshold,
    sap_score,
)

log = logging.getLogger(__name__)

THRESHOLD_RULES = ("quantile", "f1")


class NonFiniteError(RuntimeError):
    """Training met a NaN or infinite gradient (from the loss or the data)."""


class AnomalyDetector(L.LightningModule):
    """Base class: one shared step, scores, AUROC metrics, threshold and ``g_norm`` logging.

    Subclasses build ``self.net`` (with an ``encoder`` :class:`~rae_lightning.networks.
    MLPStack`) and implement :meth:`forward_pass`, which maps a batch ``(batch, input_dim)``
    to per-sample tensors ``(batch,)`` (at least ``loss`` and ``recon``) and the
    deterministic reconstruction ``(batch, input_dim)``.

    Score types: ``recon`` (input-space error), ``sap`` and ``nap`` (RaPP along the
    encoder; NAP's statistics come from the training normals), and whatever a subclass
    adds. Validation and test log ``stage/auroc`` for ``score`` and ``stage/auroc_<type>``
    for every other type. Samples labelled -1 (unknown) are left out of every metric.

    At the end of each validation the decision threshold on ``score`` is chosen from the
    validation scores of all processes, kept in the ``threshold`` buffer (so it is saved in
    the checkpoint) and logged as ``val/threshold``; a sample is anomalous when its score
    is above it. ``test`` reports ``test/precision``, ``test/recall`` and ``test/f1`` at it.

    Args:
        input_dim: features per sample; linked from the DataModule by the CLI.
        hidden_dim: width of the hidden layers.
        latent_dim: size of the code.
        n_layers: Linear layers in the encoder; the decoder mirrors it.
        residual: build the stacks from pre-activation residual units.
        activation: activation name (``leaky_relu``, ``relu``, ``elu``, ``gelu``, ...).
        lr: learning rate handed to the optimizer.
        score: the anomaly score that ``val/auroc``, ``test/auroc`` and the threshold use.
        threshold: rule for the threshold: ``quantile`` (the ``threshold_quantile``
            quantile of the normal validation scores) or ``f1`` (the F1-optimal point on
            validation; needs anomalies in validation, else the quantile is used, with a
            warning).
        threshold_quantile: quantile of the normal validation scores for ``quantile``.
        optimizer: optimizer class or callable taking ``(params, lr=...)``; Adam by default.
        lr_scheduler: optional scheduler callable taking the optimizer.
    """

    score_types: tuple[str, ...] = ("recon", "sap", "nap")
    logged_terms: tuple[str, ...] = ()
    network_class: type[nn.Module] | None = None

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
        threshold: str = "quantile",
        threshold_quantile: float = 0.95,
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
        if threshold not in THRESHOLD_RULES:
            raise ValueError(
                f"threshold must be one of {list(THRESHOLD_RULES)}, got {threshold!r}"
            )
        if not 0.0 < threshold_quantile < 1.0:
            raise ValueError(f"threshold_quantile must be in (0, 1), got {threshold_quantile}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.net = self.build_network()

        # Anomaly scores are unbounded: torchmetrics must rank them as they are, not
        # squash them with a sigmoid (which saturates and ties scores above ~17).
        # Label -1 marks a sample whose label is unknown: metrics leave it out.
        self.val_loss = MeanMetric()
        self.val_auroc = AnomalyAUROC()
        self.test_loss = MeanMetric()
        self.test_auroc = AnomalyAUROC()
        self.test_auprc = AnomalyAveragePrecision()
        self.other_auroc = nn.ModuleDict(
            {
                f"{stage}_{name}": AnomalyAUROC()
                for stage in ("val", "test")
                for name in self.score_types
                if name != score
            }
        )
        # decisions at the threshold are 0/1 ints, which the metrics take as they are
        self.test_precision = BinaryPrecision(ignore_index=-1)
        self.test_recall = BinaryRecall(ignore_index=-1)
        self.test_f1 = BinaryF1Score(ignore_index=-1)
        self.test_roc = BinaryROC(normalization=None, ignore_index=-1)
        # (score, label) rows of every sample, gathered from all processes on compute()
        self.val_scored = CatMetric(nan_strategy="disable")
        self.test_scored = CatMetric(nan_strategy="disable")

        self.nap = NAPStatistics(self._pathway_widths())
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self._picture: tuple[Tensor, Tensor] | None = None
        self._has_threshold = False
        # the optimisation step whose weights this process last validated (None: never)
        self._validated_step: int | None = None

        # g_norm of each optimisation step, kept on the device until the next flush
        self._g_norm_pending: list[tuple[int, Tensor]] = []
        self.g_norm_history: list[tuple[int, float]] = []
        # the optimizer and norm of the step in progress, which clipping reuses
        self._step_norm: tuple[torch.optim.Optimizer, Tensor] | None = None

    def build_network(self) -> nn.Module:
        """The plain network this module trains: ``network_class`` with the size arguments."""
        if self.network_class is None:
            raise NotImplementedError(f"{type(self).__name__} must set network_class")
        hp = self.hparams
        return self.network_class(
            hp.input_dim, hp.hidden_dim, hp.latent_dim, hp.n_layers, hp.residual, hp.activation
        )

    def forward_pass(
        self, x: Tensor, code: Tensor | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Per-sample loss and score terms of ``x`` ``(batch, input_dim)``, each ``(batch,)``,
        and the reconstruction ``(batch, input_dim)``, deterministic in eval mode.

        ``code``, when given, is the encoder's output for ``x`` (the end of
        :meth:`pathway`), which scoring has already computed: the encoder need not run again.
        """
        raise NotImplementedError(f"{type(self).__name__} must define forward_pass()")

    def terms(self, x: Tensor) -> dict[str, Tensor]:
        """Per-sample loss and score terms for ``x`` ``(batch, input_dim)``; each ``(batch,)``."""
        return self.forward_pass(x)[0]

    def pathway(self, x: Tensor) -> list[Tensor]:
        """What RaPP compares: ``x`` itself, then the output of every encoder block and the
        encoder's output; each ``(batch, width_i)``."""
        return [x, *self.net.encoder.features(x)]

    def _forward_and_pathway(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor, list[Tensor]]:
        """:meth:`forward_pass` of ``x`` and RaPP's pathway differences, with the encoder
        run once on ``x`` (its pathway ends with the code) and once on the reconstruction."""
        feats_x = self.pathway(x)
        terms, x_hat = self.forward_pass(x, code=feats_x[-1])
        return terms, x_hat, pathway_differences(feats_x, self.pathway(x_hat))

    def _pathway_widths(self) -> list[int]:
        was_training = self.net.training
        self.net.eval()
        with torch.no_grad():
            feats = self.pathway(torch.zeros(2, self.hparams.input_dim))
        self.net.train(was_training)
        return [f.shape[1] for f in feats]

    def score_batch(
        self, x: Tensor, types: Iterable[str] | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Score types of ``x`` ``(batch, input_dim)`` and the reconstruction.

        The one scoring method of validation, test and predict. Returns the per-sample
        terms (``loss``, the terms of :meth:`forward_pass` and each requested score type,
        ``(batch,)``) and ``x_hat`` ``(batch, input_dim)``. ``types`` defaults to every one
        of :attr:`score_types`; without ``sap`` and ``nap`` the encoder runs only on ``x``,
        about half the work. Call it in eval mode, where BatchNorm uses its running
        statistics and the VAE its posterior mean, so a sample's scores do not depend on
        the rest of its batch. ``nap`` is 0 until :meth:`fit_nap_statistics` has run.
        """
        wanted = set(self.score_types if types is None else types)
        unknown = wanted - set(self.score_types)
        if unknown:
            raise ValueError(
                f"types must be among {list(self.score_types)}, got {sorted(unknown)}"
            )
        if not wanted & {"sap", "nap"}:
            return self.forward_pass(x)
        terms, x_hat, diffs = self._forward_and_pathway(x)
        if "sap" in wanted:
            terms["sap"] = sap_score(diffs)
        if "nap" in wanted:
            terms["nap"] = self.nap.score(diffs)
        return terms, x_hat

    def forward(self, x: Tensor) -> Tensor:
        """The configured anomaly score of each sample: ``(batch,)``; higher is more anomalous."""
        if self.hparams.score == "nap" and not self.nap.ready:
            raise RuntimeError(
                "score='nap' needs NAP statistics: call fit_nap_statistics() or run validation"
            )
        return self.score_batch(x, [self.hparams.score])[0][self.hparams.score]

    def decide(self, score: Tensor) -> Tensor:
        """Decisions ``(batch,)`` at the saved threshold: 1 when ``score`` is above it, else 0;
        -1 everywhere while no threshold has been chosen."""
        decision = (score > self.threshold).long()
        return torch.where(torch.isnan(self.threshold), -1, decision)

    @torch.no_grad()
    def fit_nap_statistics(self, loader: Iterable | None = None) -> None:
        """Fit NAP's per-layer centring and whitening to the training normals.

        Runs the model in eval mode over ``loader`` (by default this process's share of the
        attached Trainer's training data), sums the statistics over all processes and keeps
        them in buffers, so they match the current weights and are saved with them.

        Args:
            loader: batches ``(x, y)`` or ``(x,)``; samples labelled 1 are skipped.
        """
        if loader is None:
            source = self._training_source()
            if source is None:
                raise RuntimeError(
                    "NAP statistics need the training data: use a DataModule with a "
                    "train_dataloader, or call fit_nap_statistics(loader)"
                )
            loader = self._training_data(source)
        self._buffers_from_rank_zero()
        was_training = self.training
        self.eval()
        self.nap.reset()
        for batch in loader:
            x = batch[0].to(self.device)
            if len(batch) > 1:
                x = x[batch[1].to(self.device) != 1]
            self.nap.update(self._forward_and_pathway(x)[2])
        self.nap.finalize(reduce=self._sum_over_processes)
        self.train(was_training)

    def _buffers_from_rank_zero(self) -> None:
        # DDP copies rank 0's buffers to the others only at the next training forward, so
        # after the last step each process holds its own BatchNorm running statistics; give
        # every process those of rank 0, the ones its checkpoint saves
        if self._trainer is None or self.trainer.world_size < 2:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for buffer in self.net.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def _sum_over_processes(self, tensor: Tensor) -> Tensor:
        if self._trainer is None:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def _training_source(self) -> DataLoader | None:
        """The training loader of the DataModule, or the one given to ``fit``; else None."""
        trainer = self.trainer
        if trainer.datamodule is not None:
            return trainer.datamodule.train_dataloader()
        if isinstance(trainer.train_dataloader, DataLoader):
            return trainer.train_dataloader
        return None

    def _training_data(self, source: DataLoader) -> DataLoader:
        """A fresh loader over this process's share of ``source``'s data, in a fixed order."""
        trainer = self.trainer
        # a loader of its own: iterating the Trainer's would disturb a running epoch
        dataset = source.dataset
        shard = list(range(trainer.global_rank, len(dataset), trainer.world_size))
        batch_size = max(source.batch_size or 1, 256)
        return DataLoader(
            dataset, batch_size=batch_size, sampler=shard, collate_fn=source.collate_fn
        )

    def choose_threshold(self, scores: Tensor, labels: Tensor) -> None:
        """Set the ``threshold`` buffer from validation scores ``(n,)`` and labels ``(n,)``
        (1 anomaly, 0 normal, -1 unknown) with the configured rule."""
        normal = scores[labels == 0]
        if normal.numel() == 0:
            # unlabelled validation rows are taken as normal, as unlabelled training rows are
            normal = scores[labels == -1]
        rule = self.hparams.threshold
        if rule == "f1" and bool((labels == 1).any()):
            known = labels >= 0
            value = f1_optimal_threshold(scores[known], labels[known])
        else:
            if rule == "f1":
                rank_zero_warn(
                    "threshold='f1' needs anomalies in validation and there are none; "
                    "using the threshold_quantile quantile of the normal scores instead"
                )
            if normal.numel() == 0:
                rank_zero_warn("validation has no normal sample: the threshold is unchanged")
                return
            value = quantile_threshold(normal, self.hparams.threshold_quantile)
        self.threshold.fill_(value)

    def shared_step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean loss of the batch and the per-sample terms (training)."""
        x = batch[0]
        terms = self.terms(x)
        return terms["loss"].mean(), terms

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The mean loss of a batch ``(x, y)``; ``train/loss`` (and the subclass's terms)
        logged on the steps the Trainer writes (see :meth:`_logs_this_step`)."""
        loss, terms = self.shared_step(batch)
        if self._logs_this_step(batch_idx):
            self.log("train/loss", loss)
            for name in self.logged_terms:
                self.log(f"train/{name}", terms[name].mean())
        return loss

    def _logs_this_step(self, batch_idx: int) -> bool:
        """Whether the Trainer writes step metrics to the loggers after this batch, or it
        is the last of the epoch or of the run (so ``callback_metrics`` ends with its values).

        One ``self.log`` costs about a millisecond of Python, some 10% of a small step, and
        the Trainer keeps only the values of the steps it writes: the others skip it.
        """
        trainer = self.trainer
        connector = getattr(trainer, "_logger_connector", None)
        writes = getattr(connector, "should_update_logs", True)
        last = batch_idx + 1 >= trainer.num_training_batches
        final = 0 <= trainer.max_steps <= trainer.global_step + 1
        return bool(writes or trainer.fast_dev_run or last or final or trainer.should_stop)

    def _eval_step(
        self, stage: str, batch: tuple[Tensor, Tensor], batch_idx: int
    ) -> tuple[Tensor, Tensor]:
        """Score a batch and update and log the metrics of ``stage``; returns score and y."""
        x, y = batch[0], batch[1]
        terms, x_hat = self.score_batch(x)
        score = terms[self.hparams.score]

        # the loss on held-out normals measures how well normality generalises
        loss_metric = getattr(self, f"{stage}_loss")
        loss_metric.update(terms["loss"][y == 0])
        auroc = getattr(self, f"{stage}_auroc")
        auroc.update(score, y)
        getattr(self, f"{stage}_scored").update(torch.stack([score, y.to(score.dtype)], dim=1))
        if batch_idx == 0:
            self._keep_picture(x, x_hat, y)

        self.log(f"{stage}/loss", loss_metric)
        self.log(f"{stage}/auroc", auroc, prog_bar=stage == "val")
        for name in self.score_types:
            if name != self.hparams.score:
                metric = self.other_auroc[f"{stage}_{name}"]
                metric.update(terms[name], y)
                self.log(f"{stage}/auroc_{name}", metric)
        return score, y

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Score a batch ``(x, y)`` and update the ``val/`` metrics."""
        self._eval_step("val", batch, batch_idx)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Score a batch ``(x, y)`` and update the ``test/`` metrics, including AUPRC, the
        ROC curve and precision, recall and F1 at the saved threshold."""
        score, y = self._eval_step("test", batch, batch_idx)
        self.test_auprc.update(score, y)
        self.log("test/auprc", self.test_auprc)
        self.test_roc.update(score, y)
        if self._has_threshold:
            decision = self.decide(score)
            for name in ("precision", "recall", "f1"):
                metric = getattr(self, f"test_{name}")
                metric.update(decision, y)
                self.log(f"test/{name}", metric)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Per-sample ``(batch,)`` tensors: the configured ``score``, the ``decision`` (see
        :meth:`decide`) and, when the batch carries one, the ``label``.

        Only the configured score is computed (with ``recon`` the encoder runs once); call
        :meth:`score_batch` for every score type.
        """
        out = {"score": self.forward(batch[0])}
        out["decision"] = self.decide(out["score"])
        if len(batch) > 1:
            out["label"] = batch[1]
        return out

    def on_fit_start(self) -> None:
        # States left by an earlier validate/test ran under inference mode; fit validates
        # without it and could not update them in place, so start from fresh ones.
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()

    def on_validation_epoch_start(self) -> None:
        # first make sure no step since the last check diverged: validating (and saving)
        # NaN weights would only hide where training broke
        self.flush_g_norm()
        # recomputed with the weights being validated, so a checkpoint saved after this
        # validation carries statistics that match its weights
        source = self._training_source()
        if source is None:
            if self.trainer.sanity_checking:
                return  # loaders given to fit() are set up after the sanity check
            if not bool(self.nap.ready):
                raise RuntimeError(
                    "NAP statistics need the training data: validate with a DataModule or "
                    "a checkpoint that has them, or call fit_nap_statistics(loader) first"
                )
            rank_zero_warn("no training data to refresh NAP statistics; keeping those loaded")
            return
        self.fit_nap_statistics(self._training_data(source))

    def on_validation_epoch_end(self) -> None:
        scores, labels = self._gather(self.val_scored)
        if scores is not None:
            self.choose_threshold(scores, labels)
        self.log("val/threshold", self.threshold)
        self._validated_step = self.trainer.global_step
        if not self.trainer.sanity_checking:
            self._draw("val", scores, labels)
        self._picture = None

    def on_test_epoch_start(self) -> None:
        self._prepare_to_decide()

    def on_predict_epoch_start(self) -> None:
        self._prepare_to_decide()

    def _prepare_to_decide(self) -> None:
        stale = self._validated_step is not None and self._validated_step != self.global_step
        if stale:
            # trained on after its last validation (test or predict right after a fit whose
            # last steps were not validated): the statistics must match these weights
            rank_zero_warn(
                f"the weights changed after the last validation (step {self._validated_step}, "
                f"now {self.global_step}): NAP statistics are refitted, but the threshold is "
                "the one chosen then; validate first for a threshold of these weights"
            )
        if stale or not bool(self.nap.ready):
            self.fit_nap_statistics()
        self._has_threshold = bool(torch.isfinite(self.threshold))
        hp = self.hparams
        if not self._has_threshold:
            rank_zero_warn(
                "no decision threshold: it is chosen during validation (fit with a "
                "validation set, or load such a checkpoint); decisions are left out"
            )
            return
        rule = f"quantile {hp.threshold_quantile}" if hp.threshold == "quantile" else "F1"
        rank_zero_info(
            f"Decision threshold on {hp.score} ({rule} rule on validation): "
            f"{self.threshold.item():.6g}"
        )

    def on_test_epoch_end(self) -> None:
        scores, labels = self._gather(self.test_scored)
        has_both = scores is not None and bool((labels == 0).any() and (labels == 1).any())
        curve = self.test_roc.compute() if has_both else None
        self._draw("test", scores, labels, curve)
        self.test_roc.reset()
        self._picture = None

    @staticmethod
    def _gather(metric: CatMetric) -> tuple[Tensor | None, Tensor | None]:
        """Scores and labels of every process from a CatMetric of (score, label) rows."""
        rows = metric.compute()
        metric.reset()
        if not isinstance(rows, Tensor) or rows.numel() == 0:
            return None, None
        return rows[:, 0], rows[:, 1].long()

    def _keep_picture(self, x: Tensor, x_hat: Tensor, y: Tensor, n: int = 8) -> None:
        # up to half anomalies, so the grid shows both kinds when the batch has both
        anomalous = torch.nonzero(y == 1).flatten()[: n // 2]
        others = torch.nonzero(y != 1).flatten()[: n - len(anomalous)]
        pick = torch.cat([others, anomalous])
        self._picture = (x[pick].detach(), x_hat[pick].detach())

    def _draw(
        self,
        stage: str,
        scores: Tensor | None,
        labels: Tensor | None,
        curve: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        """Score histograms, the ROC curve and an input/reconstruction grid for TensorBoard."""
        experiment = next(
            (lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None
        )
        if experiment is None or not self.trainer.is_global_zero:
            return
        step = self.global_step
        if scores is not None:
            for name, mask in (("normal", labels == 0), ("anomalous", labels == 1)):
                if bool(mask.any()):
                    values = scores[mask].float().cpu()
                    experiment.add_histogram(f"{stage}/score_{name}", values, step)
        if curve is not None:
            fpr, tpr, _ = curve
            fig, ax = self.test_roc.plot(curve=curve)
            auroc = torch.trapezoid(tpr, fpr).item()
            ax.set_title(f"ROC of the {self.hparams.score} score on {stage} (AUROC {auroc:.3f})")
            experiment.add_figure(f"{stage}/roc", fig, step)
        image_shape = getattr(self.trainer.datamodule, "image_shape", None)
        if self._picture is not None and image_shape is not None:
            experiment.add_image(f"{stage}/reconstructions", self._grid(image_shape), step)

    def _grid(self, image_shape: tuple[int, ...]) -> Tensor:
        """Each input beside its reconstruction, two pairs a row: ``(3, height, width)``."""
        x, x_hat = self._picture
        pairs = torch.stack([x, x_hat], dim=1).reshape(-1, *image_shape).float().cpu()
        if pairs.shape[-1] < 64:
            pairs = nn.functional.interpolate(pairs, scale_factor=64 // pairs.shape[-1])
        # one shared scale, so an input and its reconstruction compare pixel for pixel
        return make_grid(pairs, nrow=4, normalize=True, padding=2, pad_value=1.0)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The Trainer calls this hook after backward (and AMP's unscaling) and before it
        # clips, so this is the pre-clip norm. It stays on the device: no host sync per step.
        # The optimizer's parameters, not self.parameters(): walking every submodule (the
        # metrics too) each step costs more than the norm itself.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        self._step_norm = None
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        self._step_norm = (optimizer, norm)
        self._g_norm_pending.append((self.trainer.global_step, norm.detach()))

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by norm with the norm that ``g_norm`` just computed instead of a second one.

        Any other case (clipping by value, precision plugins that clip their own way) goes
        to Lightning's :meth:`clip_gradients`.
        """
        step_norm, self._step_norm = self._step_norm, None
        plugin = type(self.trainer.precision_plugin)
        reuse = (
            step_norm is not None
            and step_norm[0] is optimizer
            and isinstance(gradient_clip_val, (int, float))
            and gradient_clip_val > 0
            and (gradient_clip_algorithm or "norm") == "norm"
            and plugin.clip_gradients is Precision.clip_gradients
            and plugin.clip_grad_by_norm is Precision.clip_grad_by_norm
        )
        if not reuse:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, step_norm[1])

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
        self._stop_if_not_finite(steps, values)

    def _stop_if_not_finite(self, steps: list[int], values: list[float]) -> None:
        # A NaN or infinite loss gives a non-finite gradient, so the norm watches both.
        bad = next((s for s, v in zip(steps, values, strict=True) if not math.isfinite(v)), None)
        if bad is None:
            return
        finite = [(s, v) for s, v in self.g_norm_history if s < bad and math.isfinite(v)]
        last = f"{finite[-1][1]:.4g} at step {finite[-1][0]}" if finite else "none"
        clip = self.trainer.gradient_clip_val if self._trainer is not None else None
        raise NonFiniteError(
            f"training stopped: non-finite gradient at step {bad} (last finite g_norm: {last}); "
            f"lower model.init_args.lr (now {self.hparams.lr}), turn on or tighten "
            f"trainer.gradient_clip_val (now {clip}), and check the data for NaN or inf"
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # loaded weights come with their own NAP statistics and threshold
        self._validated_step = None
        # a resumed run that diverges can still name the last finite g_norm before it
        last = checkpoint.get("g_norm_last")
        self.g_norm_history = [(int(last[0]), float(last[1]))] if last else []

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # every step before this save is checked, so no checkpoint holds diverged weights
        self.flush_g_norm()
        if self.g_norm_history:
            step, value = self.g_norm_history[-1]
            checkpoint["g_norm_last"] = [step, value]

    def configure_optimizers(self) -> Any:
        """The configured optimizer at ``lr``, with the LR scheduler when one is set
        (``ReduceLROnPlateau`` watches ``val/loss``)."""
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
    ``residual=True``; trained on the mean squared error, scored by it per sample
    (``recon``) or along the encoder (``sap``, ``nap``).

    See :class:`AnomalyDetector` for the arguments.
    """

    score_types = ("recon", "sap", "nap")
    network_class = AutoEncoderNet

    def forward_pass(
        self, x: Tensor, code: Tensor | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        x_hat = self.net.decoder(self.net.encoder(x) if code is None else code)
        recon = (x - x_hat).pow(2).mean(dim=1)
        return {"loss": recon, "recon": recon}, x_hat


class VariationalAutoEncoder(AnomalyDetector):
    """Variational autoencoder (VAE), or residual VAE with ``residual=True``.

    Trained on the negative ELBO of a Gaussian decoder: per sample, the summed squared
    error plus ``beta`` times KL(q(z|x) || N(0, I)). In eval mode the decoder reads the
    posterior mean, so scores are deterministic. Score types: ``recon``, the mean squared
    error of the posterior-mean reconstruction, and ``elbo``, the negative ELBO
    (summed squared error plus KL, ``beta`` = 1), besides ``sap`` and ``nap``, which
    compare the encoder's representations of ``x`` and of that reconstruction.

    Args:
        beta: weight of the KL term in the training loss.
        **kwargs: see :class:`AnomalyDetector`.
    """

    score_types = ("recon", "elbo", "sap", "nap")
    network_class = VAENet
    logged_terms = ("recon", "kl")

    def __init__(self, input_dim: int, beta: float = 1.0, **kwargs: Any) -> None:
        if beta < 0:
            raise ValueError(f"beta must be at least 0, got {beta}")
        self.beta = beta
        self._noise_base: int | None = None
        super().__init__(input_dim, **kwargs)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._noise_base = torch.initial_seed()

    def _noise_generator(self, device: torch.device) -> torch.Generator | None:
        # The sampling noise of a training step depends only on the run's seed and the
        # step number, so a resumed run draws what an uninterrupted run would have drawn.
        if not self.net.training or self._trainer is None or self._noise_base is None:
            return None
        seed = (self._noise_base * 1_000_003 + self.trainer.global_step) % (2**63 - 1)
        return torch.Generator(device=device).manual_seed(seed)

    def forward_pass(
        self, x: Tensor, code: Tensor | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        if code is None or self.net.training:
            x_hat, mu, logvar = self.net(x, generator=self._noise_generator(x.device))
        else:
            # eval mode: the decoder reads the posterior mean, as VAENet does
            mu, logvar = code.chunk(2, dim=1)
            x_hat = self.net.decoder(mu)
        sq_err = (x - x_hat).pow(2).sum(dim=1)
        kl = kl_divergence(mu, logvar)
        terms = {
            "loss": sq_err + self.beta * kl,
            "recon": sq_err / x.shape[1],
            "kl": kl,
            "elbo": sq_err + kl,
        }
        return terms, x_hat
