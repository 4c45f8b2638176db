"""The LightningModules: metrics against sklearn, g_norm, clipping, loss terms."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import GradNormRecorder, quiet_trainer
from sklearn.metrics import average_precision_score, roc_auc_score

from rae_lightning import AutoEncoder, DigitsDataModule, VariationalAutoEncoder

MODELS = [
    pytest.param(AutoEncoder, {"residual": False}, id="ae"),
    pytest.param(AutoEncoder, {"residual": True}, id="rae"),
    pytest.param(VariationalAutoEncoder, {"residual": False}, id="vae"),
    pytest.param(VariationalAutoEncoder, {"residual": True, "score": "elbo"}, id="rvae-elbo"),
]


def _digits(**kwargs) -> DigitsDataModule:
    return DigitsDataModule(**({"protocol": "leave_one_out", "classes": [1]} | kwargs))


@pytest.mark.parametrize(("cls", "kwargs"), MODELS)
def test_auroc_and_auprc_match_sklearn(tmp_path, cls, kwargs) -> None:
    L.seed_everything(0)
    dm = _digits()
    model = cls(input_dim=64, hidden_dim=32, latent_dim=4, n_layers=3, **kwargs)
    trainer = quiet_trainer(tmp_path, max_epochs=2)

    trainer.fit(model, dm)
    assert {"val/auroc", "val/loss"} <= set(trainer.callback_metrics)
    metrics = trainer.test(model, dm, verbose=False)[0]

    # the same scores, batch by batch, through predict (which serves the test split)
    outputs = trainer.predict(model, dm)
    scores = torch.cat([out["score"] for out in outputs]).numpy()
    labels = torch.cat([out["label"] for out in outputs]).numpy()
    assert len(labels) == len(dm.datasets["test"])
    assert metrics["test/auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-5)
    # the direction: anomalies (the 1s) score higher after two epochs (0.73 to 0.83 here; a
    # flipped score or label would give about 1 minus that)
    assert metrics["test/auroc"] > 0.65
    assert metrics["test/auprc"] == pytest.approx(
        average_precision_score(labels, scores), abs=1e-4
    )


def test_val_loss_is_the_mean_loss_of_normal_samples(tmp_path) -> None:
    L.seed_everything(0)
    dm = _digits()
    model = AutoEncoder(input_dim=64, hidden_dim=32, latent_dim=4, n_layers=2)
    trainer = quiet_trainer(tmp_path)

    metrics = trainer.validate(model, dm, verbose=False)[0]

    val = dm.datasets["val"]
    model.eval()
    with torch.no_grad():
        expected = model.terms(val.x[val.y == 0])["loss"].mean().item()
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-5)


def test_vae_logs_its_terms_and_loss_is_recon_plus_beta_kl(tmp_path) -> None:
    L.seed_everything(0)
    model = VariationalAutoEncoder(input_dim=64, hidden_dim=32, latent_dim=4, n_layers=2, beta=0.5)
    x = torch.rand(16, 64)

    model.eval()
    terms = model.terms(x)

    torch.testing.assert_close(terms["loss"], 64 * terms["recon"] + 0.5 * terms["kl"])
    torch.testing.assert_close(terms["elbo"], 64 * terms["recon"] + terms["kl"])
    model.train()
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(model, _digits())
    assert {"train/loss", "train/recon", "train/kl"} <= set(trainer.callback_metrics)


@pytest.mark.parametrize(("cls", "kwargs"), MODELS)
def test_g_norm_is_the_pre_clip_norm_of_every_step(tmp_path, cls, kwargs) -> None:
    L.seed_everything(0)
    recorder = GradNormRecorder()
    model = cls(input_dim=64, hidden_dim=32, latent_dim=4, n_layers=4, **kwargs)
    trainer = quiet_trainer(tmp_path, max_steps=12, gradient_clip_val=0.5, callbacks=[recorder])

    trainer.fit(model, _digits(batch_size=32))

    history = dict(model.g_norm_history)
    assert sorted(history) == list(range(12))
    for step, value in history.items():
        assert value == pytest.approx(recorder.pre_clip[step], rel=1e-5)


def test_clipping_bounds_the_update(tmp_path) -> None:
    L.seed_everything(0)
    recorder = GradNormRecorder()
    model = AutoEncoder(input_dim=64, hidden_dim=32, latent_dim=4, n_layers=6, residual=True)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=8,
        gradient_clip_val=1e-3,
        gradient_clip_algorithm="norm",
        callbacks=[recorder],
    )

    trainer.fit(model, _digits(batch_size=32))

    assert len(recorder.post_clip) == 8
    for step, post in recorder.post_clip.items():
        assert recorder.pre_clip[step] > 1e-3
        assert post == pytest.approx(1e-3, rel=1e-3)


def test_without_clipping_the_update_keeps_its_norm(tmp_path) -> None:
    L.seed_everything(0)
    recorder = GradNormRecorder()
    model = AutoEncoder(input_dim=64, hidden_dim=32, latent_dim=4, n_layers=6, residual=True)
    trainer = quiet_trainer(tmp_path, max_steps=4, callbacks=[recorder])

    trainer.fit(model, _digits(batch_size=32))

    for step, post in recorder.post_clip.items():
        assert post == pytest.approx(recorder.pre_clip[step], rel=1e-6)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (AutoEncoder, {"score": "elbo"}, r"score must be one of \['recon', 'sap', 'nap'\]"),
        (AutoEncoder, {"threshold": "best"}, r"threshold must be one of \['quantile', 'f1'\]"),
        (AutoEncoder, {"threshold_quantile": 1.0}, r"threshold_quantile must be in \(0, 1\)"),
        (AutoEncoder, {"lr": 0.0}, "lr must be positive, got 0.0"),
        (AutoEncoder, {"n_layers": 0}, "n_layers must be at least 1, got 0"),
        (VariationalAutoEncoder, {"beta": -1.0}, "beta must be at least 0, got -1.0"),
    ],
)
def test_bad_hyperparameters_name_the_parameter(cls, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        cls(input_dim=64, **kwargs)


def test_checkpoint_restores_hyperparameters(tmp_path) -> None:
    model = VariationalAutoEncoder(
        input_dim=64, hidden_dim=24, n_layers=5, residual=True, beta=2.0
    )
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(model, _digits())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    loaded = VariationalAutoEncoder.load_from_checkpoint(path)

    assert loaded.hparams.beta == 2.0
    assert loaded.hparams.n_layers == 5
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_auroc_ranks_large_scores_as_they_are() -> None:
    # negative ELBO scores run into the hundreds; a sigmoid would tie them all at 1.0
    model = AutoEncoder(input_dim=64)
    scores = torch.tensor([120.0, 95.0, 300.0, 80.0, 150.0, 60.0])
    labels = torch.tensor([1, 0, 1, 0, 0, 1])

    model.test_auroc.update(scores, labels)

    expected = roc_auc_score(labels.numpy(), scores.numpy())
    assert model.test_auroc.compute().item() == pytest.approx(expected, abs=1e-6)


def test_fit_after_validate_on_the_same_model(tmp_path) -> None:
    # validate runs under inference mode; fit must still be able to update the metrics
    L.seed_everything(0)
    model = AutoEncoder(input_dim=64, hidden_dim=32, latent_dim=4, n_layers=3)
    dm = _digits()
    trainer = quiet_trainer(tmp_path, limit_train_batches=3)

    trainer.validate(model, dm, verbose=False)
    trainer.fit(model, dm)

    assert "val/auroc" in trainer.callback_metrics
