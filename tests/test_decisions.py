"""Thresholds and NAP statistics in checkpoints, `rae predict` CSVs, TensorBoard pictures."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import quiet_trainer, read_scalars
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from rae_lightning import AutoEncoder, DigitsDataModule
from rae_lightning.cli import RAECLI, main
from rae_lightning.data.base import BatchTensorDataset, keep_batch
from rae_lightning.prediction import PredictionWriter

DIGITS_RAE = Path(__file__).parents[1] / "configs" / "digits_rae.yaml"


@pytest.mark.parametrize("rule", ["f1", "quantile"])
def test_checkpoints_carry_the_threshold_and_nap_statistics_of_their_weights(
    tmp_path, rule: str
) -> None:
    L.seed_everything(0)
    dm = DigitsDataModule(protocol="leave_one_out", classes=[1])
    model = AutoEncoder(
        input_dim=64, hidden_dim=32, latent_dim=4, n_layers=4, residual=True, threshold=rule
    )
    every_epoch = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    trainer = quiet_trainer(
        tmp_path, max_epochs=2, limit_train_batches=5, enable_checkpointing=True
    )
    trainer.callbacks.append(every_epoch)
    trainer.fit(model, dm)
    paths = sorted(tmp_path.glob("epoch=*.ckpt"))
    assert len(paths) == 2

    x_test = dm.datasets["test"].x
    for path in paths:
        loaded = AutoEncoder.load_from_checkpoint(path)
        saved_threshold = loaded.threshold.clone()
        saved_stats = {k: v.clone() for k, v in loaded.nap.state_dict().items()}
        assert torch.isfinite(saved_threshold) and bool(loaded.nap.ready)

        # the saved statistics and threshold are what these weights give again
        loaded.fit_nap_statistics([(dm.datasets["train"].x,)])
        for name, value in loaded.nap.state_dict().items():
            torch.testing.assert_close(value, saved_stats[name], rtol=1e-4, atol=1e-5)
        metrics = quiet_trainer(tmp_path).validate(loaded, dm, verbose=False)[0]
        assert metrics["val/threshold"] == pytest.approx(saved_threshold.item(), rel=1e-5)

    # the last checkpoint holds the final weights: the same scores and decisions
    last = AutoEncoder.load_from_checkpoint(paths[-1]).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(last.threshold, model.threshold)
        for name in ("recon", "sap", "nap"):
            torch.testing.assert_close(
                last.score_batch(x_test)[0][name], model.score_batch(x_test)[0][name]
            )
        decisions = last.decide(last(x_test))
        assert torch.equal(decisions, model.decide(model(x_test)))
    assert 0 < int(decisions.sum()) < len(x_test)
    if rule == "quantile":
        # 95% of the validation normals lie at or below the threshold
        val = dm.datasets["val"]
        with torch.no_grad():
            normal_scores = last(val.x[val.y == 0])
        assert float((normal_scores <= last.threshold).float().mean()) == pytest.approx(
            0.95, abs=1 / len(normal_scores) + 1e-9
        )


def test_predict_writes_unknown_labels_as_empty_cells(tmp_path) -> None:
    torch.manual_seed(0)
    model = AutoEncoder(input_dim=64, hidden_dim=16, latent_dim=4, n_layers=2)
    x = torch.rand(50, 64)
    model.fit_nap_statistics([(x,)])
    model.eval()
    with torch.no_grad():
        scores = model(x)
    model.threshold.fill_(scores.median())
    unlabelled = BatchTensorDataset(x, torch.full((50,), -1))
    loader = DataLoader(unlabelled, batch_size=16, collate_fn=keep_batch)
    path = tmp_path / "out" / "predictions.csv"

    quiet_trainer(tmp_path, callbacks=[PredictionWriter(path)]).predict(model, loader)

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == list(range(50))
    assert all(r["label"] == "" for r in rows)
    np.testing.assert_allclose([float(r["score"]) for r in rows], scores.numpy(), rtol=1e-6)
    expected = (scores > scores.median()).long().tolist()
    assert [int(r["decision"]) for r in rows] == expected


def _tags(log_dir: Path, kind: str) -> set[str]:
    acc = EventAccumulator(str(log_dir), size_guidance={kind: 0})
    acc.Reload()
    return set(acc.Tags()[kind])


def test_rae_predict_agrees_with_rae_test_and_pictures_reach_tensorboard(tmp_path) -> None:
    quick = [
        "--config",
        str(DIGITS_RAE),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=6",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--model.init_args.n_layers=4",
        "--model.init_args.hidden_dim=32",
    ]
    csv_path = tmp_path / "predictions.csv"
    main(["fit", *quick])
    main(["test", *quick])
    main(["predict", *quick, f"--predictions.path={csv_path}"])

    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["index", "score", "decision", "label"]
    cli = RAECLI(args=quick, run=False)
    cli.datamodule.setup("test")
    assert [int(r["index"]) for r in rows] == list(range(len(cli.datamodule.datasets["test"])))
    labels = np.array([int(r["label"]) for r in rows])
    np.testing.assert_array_equal(labels, cli.datamodule.datasets["test"].y.numpy())
    scores = np.array([float(r["score"]) for r in rows])
    decisions = np.array([int(r["decision"]) for r in rows])

    fit_logs, test_logs = (
        tmp_path / "lightning_logs" / "version_0",
        tmp_path / "lightning_logs" / "version_1",
    )
    logged = {
        name: next(iter(read_scalars(test_logs, f"test/{name}").values()))
        for name in ("auroc", "precision", "recall", "f1")
    }
    assert logged["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-5)
    assert logged["precision"] == pytest.approx(precision_score(labels, decisions), abs=1e-5)
    assert logged["recall"] == pytest.approx(recall_score(labels, decisions), abs=1e-5)
    assert logged["f1"] == pytest.approx(f1_score(labels, decisions), abs=1e-5)
    assert read_scalars(fit_logs, "val/threshold")
    assert read_scalars(fit_logs, "val/auroc_nap") and read_scalars(fit_logs, "val/auroc_sap")

    assert {"val/score_normal", "val/score_anomalous"} <= _tags(fit_logs, "histograms")
    assert "val/reconstructions" in _tags(fit_logs, "images")
    assert {"test/score_normal", "test/score_anomalous"} <= _tags(test_logs, "histograms")
    assert {"test/roc", "test/reconstructions"} <= _tags(test_logs, "images")


def test_testing_weights_trained_past_the_last_validation_refits_nap(tmp_path) -> None:
    L.seed_everything(0)
    dm = DigitsDataModule(protocol="leave_one_out", classes=[1])
    model = AutoEncoder(input_dim=64, hidden_dim=32, latent_dim=4, n_layers=4, score="nap")
    # validation after the second epoch only: the third trains on past it
    trainer = quiet_trainer(
        tmp_path, max_epochs=3, limit_train_batches=5, check_val_every_n_epoch=2
    )
    trainer.fit(model, dm)
    assert model._validated_step == 10 and trainer.global_step == 15
    validated = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("nap.")}

    with pytest.warns(UserWarning, match=r"weights changed after the last validation \(step 10"):
        trainer.test(model, dm, verbose=False)

    fresh = AutoEncoder(input_dim=64, hidden_dim=32, latent_dim=4, n_layers=4)
    fresh.load_state_dict(model.state_dict())
    fresh.fit_nap_statistics([(dm.datasets["train"].x,)])
    refitted = {k: v for k, v in model.state_dict().items() if k.startswith("nap.")}
    for name, tensor in fresh.state_dict().items():
        if name.startswith("nap."):
            torch.testing.assert_close(refitted[name], tensor, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(validated[k], refitted[k]) for k in validated)
