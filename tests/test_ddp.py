"""Two CPU processes (DDP over gloo) agree with one process on the same checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import read_scalars

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "digits_rae.yaml"
COMMON = [
    "--trainer.accelerator=cpu",
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=6",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.n_layers=4",
    "--model.init_args.hidden_dim=32",
]
DDP = ["--trainer.strategy=ddp", "--trainer.devices=2"]


def _rae(subcommand: str, root: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "rae_lightning", subcommand, "--config", str(CONFIG)]
    cmd += [*COMMON, f"--trainer.default_root_dir={root}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def _metrics(root: Path, prefix: str) -> dict[str, float]:
    log_dir = root / "lightning_logs" / "version_0"
    tags = ["auroc", "auroc_sap", "auroc_nap", "loss", "threshold", "auprc", "f1"]
    found = {}
    for tag in tags:
        values = read_scalars(log_dir, f"{prefix}/{tag}")
        if values:
            found[tag] = values[max(values)]
    return found


def test_two_processes_match_one(tmp_path: Path) -> None:
    _rae("fit", tmp_path / "fit", *DDP)
    (ckpt,) = (tmp_path / "fit" / "lightning_logs" / "version_0" / "checkpoints").glob("epoch*")
    for name, extra in (("one", ["--trainer.devices=1"]), ("two", DDP)):
        _rae("validate", tmp_path / f"val_{name}", f"--ckpt_path={ckpt}", *extra)
        _rae("test", tmp_path / f"test_{name}", f"--ckpt_path={ckpt}", *extra)

    for stage in ("val", "test"):
        one = _metrics(tmp_path / f"{stage}_one", stage)
        two = _metrics(tmp_path / f"{stage}_two", stage)
        assert {"auroc", "auroc_nap", "auroc_sap"} <= set(one)
        assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
    # the DDP fit's own validation of the best epoch saw the same numbers
    fit_auroc = read_scalars(tmp_path / "fit" / "lightning_logs" / "version_0", "val/auroc")
    assert max(fit_auroc.values()) == pytest.approx(_metrics(tmp_path / "val_one", "val")["auroc"])
