"""Writing ``rae predict`` results: one CSV row per sample, gathered from every process."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from rae_lightning.files import atomic_write

COLUMNS = ("index", "score", "decision", "label")


class PredictionWriter(BasePredictionWriter):
    """Write the predictions of a ``predict`` run to a CSV file, in index order.

    One row per sample of the predict dataset, with the columns ``index`` (the sample's
    position in the dataset), ``score`` (the model's configured score), ``decision`` (1
    anomalous, 0 normal, at the threshold saved with the model; empty when the model has
    none) and ``label`` (1 anomaly, 0 normal; empty when unknown, that is -1 or absent).
    Under DDP every process keeps its rows and the first process writes them all, each
    sample once.

    The ``rae`` command registers it as ``predictions``: ``rae predict --predictions.path
    out.csv``. It only acts during ``predict``.

    Args:
        path: the CSV file; by default ``predictions.csv`` in the Trainer's log folder.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path) if path is not None else None
        self._rows: list[Tensor] = []
        self.written: Path | None = None

    def resolve_path(self, trainer: L.Trainer) -> Path:
        """Where the CSV goes: ``path``, or ``predictions.csv`` in the log folder."""
        if self.path is not None:
            return self.path
        return Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv"

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Tensor],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        score = prediction["score"].detach()
        if batch_indices is None:
            raise RuntimeError("the predict loop gave no batch indices; rows need an index")
        index = torch.as_tensor(batch_indices, device=score.device)
        label = prediction.get("label", torch.full_like(index, -1))
        decision = prediction.get("decision", torch.full_like(index, -1))
        # float64 keeps indices exact up to 2**53 and scores exact from float32
        columns = [index, score, decision, label]
        self._rows.append(torch.stack([c.to(score.device, torch.float64) for c in columns], 1))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = torch.cat(self._rows) if self._rows else torch.zeros(0, len(COLUMNS))
        rows = gather_rows(trainer, rows.to(pl_module.device, torch.float64))
        self._rows = []
        if not trainer.is_global_zero:
            return
        path = self.resolve_path(trainer)
        write_csv(path, rows)
        self.written = path
        rank_zero_info(f"Wrote {len(rows)} predictions to {path}")


def gather_rows(trainer: L.Trainer, rows: Tensor) -> Tensor:
    """Rows ``(n, 4)`` of every process, sorted by index with each index kept once: on CPU."""
    if trainer.world_size > 1:
        count = torch.tensor([len(rows)], device=rows.device)
        counts = trainer.strategy.all_gather(count).flatten().tolist()
        padded = rows.new_zeros(max(counts), rows.shape[1])
        padded[: len(rows)] = rows
        gathered = trainer.strategy.all_gather(padded)
        rows = torch.cat([part[:n] for part, n in zip(gathered, counts, strict=True)])
    rows = rows.cpu()
    _, first = np.unique(rows[:, 0].numpy(), return_index=True)
    return rows[torch.as_tensor(first)]


def write_csv(path: Path, rows: Tensor) -> None:
    """Write rows ``(n, 4)`` of (index, score, decision, label); -1 becomes an empty cell.

    The file is written beside its target and renamed over it, so a run stopped while
    writing leaves no half-written file under ``path``.
    """
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for index, score, decision, label in rows.tolist():
            writer.writerow(
                [
                    int(index),
                    f"{score:.9g}",
                    "" if decision < 0 else int(decision),
                    "" if label < 0 else int(label),
                ]
            )
