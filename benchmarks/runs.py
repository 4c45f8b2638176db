"""What the benchmark scripts share: one fit-and-test of a config through ``RAECLI``, and
an append-only CSV of finished runs."""

from __future__ import annotations

import csv
import logging
import tempfile
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("runs")


def fit_and_test_last(
    config: Path, seed: int, max_epochs: int, overrides: Sequence[str]
) -> tuple[Any, dict[str, float]]:
    """Fit ``config`` on one CPU thread with ``seed`` and test the last epoch's weights.

    ``overrides`` are command-line options on top of the config. Returns the CLI (its
    model and DataModule stay usable) and the test metrics.
    """
    import lightning as L
    import torch

    from rae_lightning.cli import RAECLI

    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "--config",
            str(config),
            f"--seed_everything={seed}",
            *overrides,
            f"--trainer.max_epochs={max_epochs}",
            f"--trainer.default_root_dir={tmp}",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
        cli = RAECLI(args=args, run=False)
        L.seed_everything(seed, verbose=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return cli, metrics


def append_row(path: Path, row: dict) -> None:
    """Append one run to the CSV, writing the header first if the file is new."""
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def run_missing(
    jobs: Sequence[tuple],
    key: Callable[[tuple], Hashable],
    done: dict[Hashable, dict],
    run_one: Callable[..., dict],
    row_key: Callable[[dict], Hashable],
    csv_path: Path,
    workers: int,
    max_epochs: int,
) -> list[dict]:
    """Run ``run_one(*job, max_epochs)`` for every job whose ``key`` is not in ``done``,
    ``workers`` at a time, appending each finished row to ``csv_path`` at once (so an
    interrupted benchmark resumes); returns the rows of all jobs, in job order."""
    todo = [job for job in jobs if key(job) not in done]
    log.info("%d runs, %d already in %s", len(jobs), len(jobs) - len(todo), csv_path)
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(run_one, *job, max_epochs) for job in todo]
        for future in futures:
            row = future.result()
            log.info("%s", row)
            append_row(csv_path, row)
            done[row_key(row)] = row
    return [done[key(job)] for job in jobs]
