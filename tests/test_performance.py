"""The fast paths give what the straightforward ones give: logging, clipping, scores, batches."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import read_scalars
from lightning.pytorch.loggers import TensorBoardLogger

from rae_lightning import AutoEncoder, DigitsDataModule, VariationalAutoEncoder
from rae_lightning.cli import RAECLI, main
from rae_lightning.scoring import pathway_differences, sap_score

DIGITS_RAE = Path(__file__).parents[1] / "configs" / "digits_rae.yaml"
SMALL = {"input_dim": 64, "hidden_dim": 32, "latent_dim": 4, "n_layers": 4, "residual": True}


def _digits(**kwargs) -> DigitsDataModule:
    return DigitsDataModule(protocol="leave_one_out", classes=[1], batch_size=32, **kwargs)


def _fit(model: L.LightningModule, tmp_path, name: str, **kwargs) -> L.Trainer:
    L.seed_everything(0)
    trainer = L.Trainer(
        max_epochs=1,
        logger=TensorBoardLogger(tmp_path, name=name, version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        **kwargs,
    )
    trainer.fit(model, _digits())
    return trainer


class LogsEveryStep(VariationalAutoEncoder):
    """self.log on every step, as before the logging was thinned out."""

    def _logs_this_step(self, batch_idx: int) -> bool:
        return True


class LightningClipping(AutoEncoder):
    """Lightning's own clipping, which computes the norm a second time."""

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def test_train_terms_reach_the_logger_as_with_a_log_call_every_step(tmp_path) -> None:
    kwargs = {"limit_train_batches": 10, "log_every_n_steps": 3}
    L.seed_everything(0)
    fast = VariationalAutoEncoder(**SMALL)
    L.seed_everything(0)
    reference = LogsEveryStep(**SMALL)

    fast_trainer = _fit(fast, tmp_path, "fast", **kwargs)
    ref_trainer = _fit(reference, tmp_path, "reference", **kwargs)

    for tag in ("train/loss", "train/recon", "train/kl"):
        logged = read_scalars(tmp_path / "fast" / "version_0", tag)
        assert sorted(logged) == [2, 5, 8]
        assert logged == read_scalars(tmp_path / "reference" / "version_0", tag)
        assert fast_trainer.callback_metrics[tag] == ref_trainer.callback_metrics[tag]


def test_clipping_with_the_g_norm_matches_lightnings_clipping(tmp_path) -> None:
    kwargs = {"limit_train_batches": 6, "gradient_clip_val": 0.05}
    L.seed_everything(0)
    fast = AutoEncoder(**SMALL)
    L.seed_everything(0)
    reference = LightningClipping(**SMALL)

    _fit(fast, tmp_path, "fast", **kwargs)
    _fit(reference, tmp_path, "reference", **kwargs)

    assert len(fast.g_norm_history) == 6
    for a, b in zip(fast.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    fast_steps, fast_norms = zip(*fast.g_norm_history, strict=True)
    ref_steps, ref_norms = zip(*reference.g_norm_history, strict=True)
    assert fast_steps == ref_steps
    assert fast_norms == pytest.approx(ref_norms, rel=1e-6)


@pytest.mark.parametrize("cls", [AutoEncoder, VariationalAutoEncoder])
def test_scores_match_a_separate_encoder_pass_over_x(cls) -> None:
    torch.manual_seed(0)
    model = cls(**SMALL).eval()
    x = torch.randn(16, 64)

    with torch.no_grad():
        terms, x_hat = model.score_batch(x)
        ref_terms, ref_x_hat = model.forward_pass(x)
        diffs = pathway_differences(model.pathway(x), model.pathway(ref_x_hat))

    torch.testing.assert_close(x_hat, ref_x_hat)
    torch.testing.assert_close(terms["recon"], ref_terms["recon"])
    torch.testing.assert_close(terms["sap"], sap_score(diffs))


@pytest.mark.parametrize("cls", [AutoEncoder, VariationalAutoEncoder])
def test_a_score_alone_costs_only_its_own_passes_and_keeps_its_value(cls) -> None:
    torch.manual_seed(0)
    model = cls(**SMALL).eval()
    model.fit_nap_statistics([(torch.randn(64, 64),)])
    x = torch.randn(16, 64)
    passes = []
    # the head ends every encoder pass, through forward() and through features() alike
    model.net.encoder.head.register_forward_hook(lambda *_: passes.append(1))

    with torch.no_grad():
        every, _ = model.score_batch(x)
        assert len(passes) == 2
        for name in model.score_types:
            passes.clear()
            alone, _ = model.score_batch(x, [name])
            torch.testing.assert_close(alone[name], every[name])
            assert len(passes) == (2 if name in ("sap", "nap") else 1)
    with pytest.raises(ValueError, match=r"types must be among .*, got \['mahalanobis'\]"):
        model.score_batch(x, ["mahalanobis"])


def test_batches_are_cut_on_the_trainers_device() -> None:
    dm = _digits(data_on_device=True)
    dm.setup("fit")
    # a stand-in Trainer whose accelerator is the meta device (no GPU in CI)
    dm.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("meta")),
        world_size=1,
        current_epoch=0,
    )

    train = dm.train_dataloader()
    x, y = next(iter(train))
    val_x, _ = next(iter(dm.val_dataloader()))

    assert x.device.type == y.device.type == val_x.device.type == "meta"
    assert x.shape == (32, 64)
    assert not train.pin_memory
    assert dm.datasets["train"].x.device.type == "cpu"


def test_batches_stay_on_the_host_for_a_cpu_trainer() -> None:
    on = _digits(data_on_device=True)
    off = _digits(data_on_device=False)
    for dm in (on, off):
        dm.setup("fit")
        dm.trainer = L.Trainer(accelerator="cpu", logger=False)

    x_on, _ = next(iter(on.val_dataloader()))
    x_off, _ = next(iter(off.val_dataloader()))

    assert x_on.device.type == "cpu"
    torch.testing.assert_close(x_on, x_off)


def test_data_on_device_refuses_workers() -> None:
    with pytest.raises(ValueError, match="data_on_device=True needs num_workers=0"):
        _digits(data_on_device=True, num_workers=2)


@pytest.mark.parametrize(("env", "expected"), [(None, 10), ("1", 1)])
def test_rae_redraws_the_progress_bar_every_ten_steps(monkeypatch, capsys, env, expected):
    if env is None:
        monkeypatch.delenv("TQDM_MINITERS", raising=False)
    else:
        monkeypatch.setenv("TQDM_MINITERS", env)

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(DIGITS_RAE), "--print_config"])

    assert os.environ["TQDM_MINITERS"] == str(expected)
    trainer = L.Trainer(accelerator="cpu", logger=False)
    assert trainer.progress_bar_callback.refresh_rate == expected


def test_every_datamodule_takes_data_on_device_from_the_config(tmp_path) -> None:
    for config in ("digits_rae", "tabular_rae", "mnist_rae_official"):
        args = ["--config", str(DIGITS_RAE.parent / f"{config}.yaml")]
        args += [f"--trainer.default_root_dir={tmp_path}", "--data.init_args.data_on_device=false"]
        cli = RAECLI(args=args, run=False)

        assert cli.datamodule.hparams.data_on_device is False
