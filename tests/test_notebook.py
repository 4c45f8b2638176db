"""The degradation-study notebook runs top to bottom on a small generated sweep table."""

from __future__ import annotations

from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
from nbclient import NotebookClient
from torch.utils.tensorboard import SummaryWriter

from rae_lightning.sweep import COLUMNS

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "degradation_study.ipynb"


def _write_tables(folder: Path) -> None:
    """A sweep-shaped table where the AE's loss grows with depth, and g_norm traces."""
    rng = np.random.default_rng(0)
    rows = []
    for model in ("ae", "rae"):
        for n_layers in (2, 4, 8):
            for seed in (0, 1):
                loss = 0.01 * (n_layers if model == "ae" else 1.0) * (1 + 0.1 * seed)
                row = dict.fromkeys(COLUMNS, 1.0)
                row |= {"model": model, "n_layers": n_layers, "seed": seed, "train_loss": loss}
                row |= {"val_auroc": 0.9, "test_auroc": 0.8 + (model == "rae") * 0.05}
                row["run"] = f"{model}_L{n_layers:02d}_s{seed}"
                rows.append(row)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(folder / "results.csv", index=False)

    steps = np.arange(20)
    traces = pd.concat(
        pd.DataFrame(
            {"seed": 0, "clipped": clipped, "step": steps, "g_norm": rng.lognormal(size=20)}
        )
        for clipped in (False, True)
    )
    traces.to_csv(folder / "clipping_g_norm.csv", index=False)

    # the fit logs of every run, where a sweep writes them
    for row in rows:
        log_dir = folder / "runs" / row["run"] / "lightning_logs" / "version_0"
        with SummaryWriter(str(log_dir)) as writer:
            for step in range(0, 30, 10):
                writer.add_scalar("train/loss", row["train_loss"] * (1 + 1 / (1 + step)), step)


def test_notebook_runs_on_a_small_table(tmp_path, monkeypatch) -> None:
    _write_tables(tmp_path)
    monkeypatch.setenv("RAE_SWEEP_DIR", str(tmp_path))
    monkeypatch.setenv("RAE_RUNS_DIR", str(tmp_path / "runs"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)

    client = NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs)
    assert "n_layers=8: AE train loss / RAE train loss = 8.00 (claim: >= 3) holds" in text
    assert "RAE mean test AUROC >= AE at every depth: True" in text
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 4
    assert "no run logs" not in text
