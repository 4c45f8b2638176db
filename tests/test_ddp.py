"""Two CPU processes (DDP over gloo) agree with one process on the same checkpoint."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import read_scalars

from rae_lightning import AutoEncoder, DigitsDataModule

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
    # 415 validation and 413 test samples: odd, so a padding sampler would repeat one
    "--data.init_args.anomaly_val_frac=0.505",
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

    # the NAP statistics and threshold that the DDP fit saved equal one process's on its weights
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = AutoEncoder.load_from_checkpoint(ckpt, map_location="cpu").eval()
    hparams = state["datamodule_hyper_parameters"]
    data = DigitsDataModule(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    data.setup("fit")
    assert (len(data.datasets["val"]), len(data.datasets["test"])) == (415, 413)
    model.fit_nap_statistics([(data.datasets["train"].x,)])
    for name, saved in state["state_dict"].items():
        if name.startswith("nap."):
            torch.testing.assert_close(model.state_dict()[name], saved, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        val = data.datasets["val"]
        model.choose_threshold(model(val.x), val.y)
    assert model.threshold.item() == pytest.approx(state["state_dict"]["threshold"].item())

    # predict: every test sample once, in order, as one process writes it
    rows = {}
    for name, extra in (("one", ["--trainer.devices=1"]), ("two", DDP)):
        out = tmp_path / f"{name}.csv"
        _rae(
            "predict", tmp_path / name, f"--ckpt_path={ckpt}", f"--predictions.path={out}", *extra
        )
        with out.open() as handle:
            rows[name] = list(csv.DictReader(handle))

    assert [int(r["index"]) for r in rows["two"]] == list(range(413))
    for a, b in zip(rows["two"], rows["one"], strict=True):
        assert (a["index"], a["decision"], a["label"]) == (b["index"], b["decision"], b["label"])
        assert float(a["score"]) == pytest.approx(float(b["score"]), rel=1e-5, abs=1e-7)
