"""The `rae` command: configs, fit then test, g_norm in TensorBoard, checkpoint lookup."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import GradNormRecorder, read_scalars

from rae_lightning import AnomalyDetector, NoveltyDataModule
from rae_lightning.checkpoints import CheckpointError
from rae_lightning.cli import RAECLI, find_best_checkpoint, main

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
DIGITS_RAE = Path(__file__).parents[1] / "configs" / "digits_rae.yaml"


def _quick(tmp_path: Path, *extra: str) -> list[str]:
    """Trainer overrides for a run of a few steps in tmp_path."""
    return [
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def test_configs_exist() -> None:
    names = {path.stem for path in CONFIGS}
    assert {"digits_ae", "digits_rae", "digits_vae", "digits_rvae"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_every_config_parses_and_instantiates(config: Path, tmp_path: Path) -> None:
    args = ["--config", str(config), f"--trainer.default_root_dir={tmp_path}"]
    cli = RAECLI(args=args, run=False)

    assert isinstance(cli.model, AnomalyDetector)
    assert isinstance(cli.datamodule, NoveltyDataModule)
    assert cli.model.hparams.input_dim == cli.datamodule.input_dim
    assert cli.trainer.gradient_clip_val is not None
    assert cli.trainer.gradient_clip_algorithm == "norm"


def test_g_norm_in_tensorboard_equals_the_pre_clip_norm(tmp_path: Path) -> None:
    # a clip value below every step's norm, so pre-clip and post-clip norms differ
    clip = 0.05
    extra = ("--trainer.log_every_n_steps=4", f"--trainer.gradient_clip_val={clip}")
    args = ["--config", str(DIGITS_RAE), *_quick(tmp_path, *extra)]
    cli = RAECLI(args=args, run=False)
    recorder = GradNormRecorder()
    cli.trainer.callbacks.append(recorder)

    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    logged = read_scalars(cli.trainer.logger.log_dir, "g_norm")
    assert sorted(logged) == list(range(6))
    for step, value in logged.items():
        assert value == pytest.approx(recorder.pre_clip[step], rel=1e-5)
        assert value > 2 * clip
        assert recorder.post_clip[step] == pytest.approx(clip, rel=1e-4)
    assert read_scalars(cli.trainer.logger.log_dir, "val/auroc")
    assert (Path(cli.trainer.logger.log_dir) / "config.yaml").is_file()


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_best_checkpoint_comes_from_the_newest_run_even_without_an_auroc(tmp_path: Path):
    root = tmp_path / "lightning_logs"
    _touch(root / "version_0/checkpoints/epoch003-auroc0.9000.ckpt")
    nan = _touch(root / "version_1/checkpoints/epoch000-aurocnan.ckpt")
    _touch(root / "version_1/checkpoints/last.ckpt")
    assert find_best_checkpoint(root) == nan

    _touch(root / "version_2/checkpoints/last.ckpt")
    with pytest.raises(CheckpointError, match="version_2 holds no checkpoint that can be told"):
        find_best_checkpoint(root)
    best = _touch(root / "version_2/checkpoints/epoch001-auroc0.5000.ckpt")
    _touch(root / "version_2/checkpoints/epoch000-aurocnan.ckpt")
    assert find_best_checkpoint(root) == best


def test_fit_then_test_takes_the_newest_best_checkpoint(tmp_path: Path, caplog) -> None:
    main(["fit", "--config", str(DIGITS_RAE), *_quick(tmp_path)])
    first = find_best_checkpoint(tmp_path / "lightning_logs")
    main(["fit", "--config", str(DIGITS_RAE), *_quick(tmp_path)])
    newest = find_best_checkpoint(tmp_path / "lightning_logs")
    assert first is not None and newest is not None
    assert first.parent.parent.name == "version_0"
    assert newest.parent.parent.name == "version_1"

    with caplog.at_level("INFO"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["test", "--config", str(DIGITS_RAE), *_quick(tmp_path)])

    assert f"Using the best checkpoint of the newest run: {newest}" in caplog.text
    # the fit run's checkpoint folder means nothing to test: no warning that it moved
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    test_logs = tmp_path / "lightning_logs" / "version_2"
    auroc = read_scalars(test_logs, "test/auroc")
    assert len(auroc) == 1
    assert 0.0 <= next(iter(auroc.values())) <= 1.0


def test_test_takes_an_explicit_checkpoint(tmp_path: Path, caplog) -> None:
    main(["fit", "--config", str(DIGITS_RAE), *_quick(tmp_path)])
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file()

    with caplog.at_level("INFO"):
        main(["test", "--config", str(DIGITS_RAE), *_quick(tmp_path), f"--ckpt_path={last}"])

    assert f"Using checkpoint {last}" in caplog.text


def test_test_without_any_run_says_what_to_do(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["test", "--config", str(DIGITS_RAE), *_quick(tmp_path)])

    assert exc.value.code == 2
    assert "run `rae fit` first or pass --ckpt_path" in capsys.readouterr().err


def test_console_script_runs_fit(tmp_path: Path) -> None:
    # the console script that `pip install` put beside this Python, as a user types it
    rae = Path(sys.executable).with_name("rae")
    script = str(rae) if rae.is_file() else shutil.which("rae")
    assert script is not None, "the rae console script is not installed"
    cmd = [script, "fit", "--config", str(DIGITS_RAE)]
    result = subprocess.run([*cmd, *_quick(tmp_path)], capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr[-2000:]
    assert "DigitsDataModule: protocol=leave_one_out" in result.stderr
    assert list((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("epoch*.ckpt"))
