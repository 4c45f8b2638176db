"""The `rae-sweep` command: table, plots, resuming, the clipping comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import read_scalars

from rae_lightning import AutoEncoder, DigitsDataModule
from rae_lightning.sweep import (
    COLUMNS,
    RunSpec,
    g_norm_stats,
    logged_scalars,
    run_sweep,
    summary_markdown,
)

DIGITS_AE = Path(__file__).parents[1] / "configs" / "digits_ae.yaml"
QUICK = ["--", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3"]


def _sweep(out: Path, *extra: str) -> pd.DataFrame:
    args = ["--config", str(DIGITS_AE), "--seeds", "0", "--out", str(out)]
    return run_sweep([*args, "--models", "ae", "rae", "--n-layers", "3", *QUICK, *extra])


def test_sweep_writes_the_table_and_plots_and_skips_finished_runs(tmp_path, caplog) -> None:
    out = tmp_path / "sweep"
    first = _sweep(out)

    table = pd.read_csv(out / "results.csv")
    assert list(table.columns) == COLUMNS
    assert list(zip(table["model"], table["n_layers"], strict=True)) == [("ae", 3), ("rae", 3)]
    assert (table["steps"] == 3).all()
    for row in table.itertuples():
        logs = out / "runs" / row.run / "lightning_logs"
        # the table holds what the runs logged: test metrics of the test run, g_norm of fit
        (auroc,) = read_scalars(logs / "version_1", "test/auroc").values()
        assert row.test_auroc == pytest.approx(auroc, rel=1e-6)
        g_norm = list(read_scalars(logs / "version_0", "g_norm").values())
        assert row.g_norm_max == pytest.approx(max(g_norm), rel=1e-6)
        assert row.g_norm_median == pytest.approx(float(np.median(g_norm)), rel=1e-6)
    for name in ("depth_train_loss.png", "depth_auroc.png", "summary.md"):
        assert (out / name).stat().st_size > 0
    # fit and test each leave their own TensorBoard logs
    logs = out / "runs" / "rae_L03_s0" / "lightning_logs"
    assert len(read_scalars(logs / "version_0", "g_norm")) == 3
    assert len(read_scalars(logs / "version_1", "test/auroc")) == 1
    # the notebook reads the same logs through logged_scalars
    g_norm = logged_scalars(out / "runs" / "rae_L03_s0", "g_norm")
    assert g_norm.index.tolist() == [0, 1, 2]
    assert g_norm.max() == pytest.approx(table.loc[1, "g_norm_max"], rel=1e-6)
    assert logged_scalars(out / "runs" / "rae_L03_s0", "no/such/tag").empty

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    with caplog.at_level("INFO", logger="rae_lightning.sweep"):
        second = _sweep(out)

    assert caplog.text.count("skip ") == 2
    assert "run ae_L03_s0" not in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")} == stamps
    assert not list(out.glob("runs/*/lightning_logs/version_2"))
    pd.testing.assert_frame_equal(first, second)


def test_train_loss_resume_after_interruption_and_changed_settings(tmp_path, caplog) -> None:
    out = tmp_path / "sweep"
    table = _sweep(out)

    # train_loss: the eval-mode MSE of the final weights over the whole training set
    run_dir = out / "runs" / "ae_L03_s0"
    last = run_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    model = AutoEncoder.load_from_checkpoint(last).eval()
    data = DigitsDataModule(protocol="leave_one_out", classes=[1], seed=0)
    data.setup("fit")
    x = data.datasets["train"].x
    with torch.no_grad():
        expected = (x - model.net(x)).pow(2).mean().item()
    assert table.loc[0, "train_loss"] == pytest.approx(expected, rel=1e-5)

    # a run folder without result.json was interrupted: it is run again from scratch
    (run_dir / "result.json").unlink()
    with caplog.at_level("INFO", logger="rae_lightning.sweep"):
        _sweep(out)
    assert "restart ae_L03_s0" in caplog.text
    assert "skip rae_L03_s0" in caplog.text
    assert sorted(p.name for p in (run_dir / "lightning_logs").iterdir()) == [
        "version_0",
        "version_1",
    ]

    with pytest.raises(ValueError, match="holds a run made with args"):
        _sweep(out, "--trainer.limit_train_batches=2")


def test_clipping_comparison_writes_both_traces(tmp_path) -> None:
    out = tmp_path / "sweep"
    table = run_sweep(
        ["--clipping", "--config", str(DIGITS_AE), "--n-layers", "2", "4", "--seeds", "0"]
        + ["--clip-val", "0.5", "--out", str(out), *QUICK]
    )

    assert list(table["run"]) == ["rae_L04_s0_noclip", "rae_L04_s0_clip0.5"]
    assert math.isnan(table.loc[0, "gradient_clip_val"])
    assert table.loc[1, "gradient_clip_val"] == 0.5
    traces = pd.read_csv(out / "clipping_g_norm.csv")
    assert traces.groupby("clipped")["step"].apply(list).to_dict() == {
        False: [0, 1, 2],
        True: [0, 1, 2],
    }
    assert (out / "clipping_g_norm.png").stat().st_size > 0
    saved = json.loads((out / "clipping" / "rae_L04_s0_noclip" / "result.json").read_text())
    assert "--trainer.gradient_clip_val=null" in saved["args"]


def test_run_names_and_arguments() -> None:
    spec = RunSpec("rvae", 16, 2, clip=0.0)
    args = spec.cli_args("base.yaml", ["--trainer.max_epochs=5"])

    assert spec.name == "rvae_L16_s2_noclip"
    assert RunSpec("ae", 4, 0).name == "ae_L04_s0"
    assert "--model.class_path=rae_lightning.VariationalAutoEncoder" in args
    assert "--model.init_args.residual=true" in args
    assert args[-1] == "--trainer.max_epochs=5"


def test_g_norm_stats_and_summary() -> None:
    stats = g_norm_stats([(0, 3.0), (1, 1.0), (2, 2.0), (3, 10.0)])
    assert stats == {"g_norm_max": 10.0, "g_norm_median": 2.5, "g_norm_final": 10.0}
    assert math.isnan(g_norm_stats([])["g_norm_max"])

    rows = [
        {"model": m, "n_layers": n, "seed": s, "train_loss": loss, "val_auroc": 0.9}
        | {"test_auroc": 0.8 + s / 100, "g_norm_max": 1.0}
        for m, loss in [("ae", 0.4), ("rae", 0.1)]
        for n in (2, 8)
        for s in (0, 2)
    ]
    rows[0]["g_norm_max"] = 7.0  # ae, 2 layers, seed 0
    rows[1]["train_loss"] = 1.6  # ae, 2 layers, seed 2: mean 1.0, median 1.0
    rows[4]["train_loss"] = 0.3  # rae, 2 layers, seed 0: mean 0.2, median 0.2
    text = summary_markdown(pd.DataFrame(rows))
    assert text.splitlines()[0] == (
        "| n_layers | AE train loss | RAE train loss | AE / RAE (mean) | AE / RAE (median) "
        "| AE test AUROC | RAE test AUROC | AE largest g_norm | RAE largest g_norm |"
    )
    assert "| 2 | 1.0000 ± 0.8485 | 0.2000 ± 0.1414 | 5.0 | 5.0 | 0.810 ± 0.014 |" in text
    assert "| 8 | 0.4000 ± 0.0000 | 0.1000 ± 0.0000 | 4.0 | 4.0 | 0.810 ± 0.014 | " in text
    assert text.splitlines()[2].endswith("| 7 | 1 |")


def test_bad_arguments_fail_early(tmp_path) -> None:
    with pytest.raises(SystemExit):
        run_sweep(["--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        run_sweep(["--config", str(DIGITS_AE), "--out", str(tmp_path), "--", "--ckpt_path=x"])
